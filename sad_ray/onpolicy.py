"""On-policy structured agent distillation (`loss.mode: on_policy`): rounds in which the student plays, the teacher
scores every turn the student wrote, and the student trains on those records with the span-wise objective.

Round r = 1 .. `on_policy.rounds`:
  1. the player (round 1: the student-init; then the student round r-1 trained) plays `on_policy.tasks_per_env`
     training tasks of each of `rollout.envs` on Ray Data rollout actors (section `rollout`'s engine, vLLM by
     default), sampling at `on_policy.temperature`. Failed episodes are kept: their turns are what on-policy
     learning is for. With `on_policy.intervene_after`, the teacher writes an episode's next turn after that many
     turns that got nowhere, and the records say which (`teacher_turns`);
  2. the teacher scores every turn at the student's own tokens (`rollout.score_engine`), segmented into
     [REASON]/[ACT] by the same rules as off-policy; the records carry `policy: student` and `round: r`;
  3. the student trains `train.steps` steps on them under Ray Train from the player's weights, with the configured
     objective (reverse KL by default here), λ_r/λ_a and curriculum; with `on_policy.fraction` < 1 a fresh sample of
     the teacher's off-policy records joins the round's records in that proportion (GKD's λ);
  4. round r+1's rollout actors load the trained weights from storage into new engines: the weight sync, timed in
     each actor (`on_policy/weight_sync_seconds`).

Everything a run writes is under the teacher's folder, in one folder per run and settings (`<run>-<key>`, the key a
hash of every setting that shapes the rounds), so changed settings start afresh and never mix with old rounds:

    on_policy/<run>-<key>/round-<r>/records/     the player's episodes, scored by the teacher (with the ledger)
    on_policy/<run>-<key>/round-<r>/mixed/       the teacher's records drawn for this round (fraction < 1)
    on_policy/<run>-<key>/round-<r>/student/     the student after round r; the last round's is the run's student
    on_policy/<run>-<key>/round-<r>/round.json   the round's figures, written last

A killed run resumes where it stopped: finished rounds are read back from their round.json, a round's rollouts
skip the episodes already written (sad_ray.rollout.pipeline), its training resumes from its last Ray Train
checkpoint (sad_ray.train.ray_train), and a round whose student is written goes straight to its figures.
Each round's figures go to the job's MLflow run as `on_policy/*` metrics at step r; the rollout and training of a
round are child runs of their own (`rollout-<run>-round-<r>`, `train-<run>/round-<r>`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sad_ray import storage, tracking
from sad_ray.config import Config, to_flat_dict
from sad_ray.records import ShardWriter, dropped_episodes, episode_id, iter_records, shard_paths

if TYPE_CHECKING:
    from sad_ray.records import TrajectoryRecord
    from sad_ray.stages import TeacherFolders

log = logging.getLogger(__name__)

ROUND_FILE = "round.json"
MIXED_FILE = "mixed.json"
# What marks the teacher's records copied into a round's mix, so their ids never meet the student's own.
MIXED_PREFIX = "teacher/"


def settings_key(cfg: Config, student_init: Path | str) -> str:
    """12 hex digits over every setting that shapes the rounds and the model they start from."""
    keep = {"loss", "curriculum", "train", "on_policy", "rollout", "records", "segment", "precision", "environments"}
    flat = {k: str(v) for k, v in to_flat_dict(cfg).items() if k.split(".")[0] in keep}
    flat["data.max_tokens"] = str(cfg.data.max_tokens)
    flat["student_init"] = str(student_init)
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]


def run_on_policy(cfg: Config, folders: TeacherFolders, student_init: Path | str, name: str | None = None) -> dict:
    """Every round of the on-policy run `name` (default `onpolicy-<objective>-seed<seed>`), the finished ones read
    back; returns the summary the distill job and the experiment read (`student_dir`: the last round's student,
    `seconds`: play, scoring, divergence and training of every round together; each round's figures in `rounds`)."""
    from sad_ray.stages import training_run_name

    op = cfg.on_policy
    name = name or training_run_name(cfg)
    key = settings_key(cfg, student_init)
    root = folders.file(f"on_policy/{name}-{key}")
    log.info("on-policy %s: %d rounds in %s", name, op.rounds, root)
    player: Path | str = student_init
    rounds: list[dict[str, Any]] = []
    for r in range(1, op.rounds + 1):
        rdir = storage.join(root, f"round-{r:03d}")
        done = storage.join(rdir, ROUND_FILE)
        if storage.is_file(done):
            figures = json.loads(storage.read_bytes(done))
            log.info("on-policy %s: round %d was finished (%s); reusing it", name, r, rdir)
        else:
            figures = play_and_train_round(cfg, folders, r, player, rdir, f"{name}/round-{r:03d}", r == op.rounds)
            storage.write_bytes(done, (json.dumps(figures, indent=2) + "\n").encode())
            tracking.log_metrics(round_metrics(figures), step=r)
        rounds.append(figures)
        player = figures["student_dir"]
    last = rounds[-1]
    return {
        "student_dir": last["student_dir"], "run_identity": f"{name}-{key}", "on_policy_dir": str(root),
        "steps": sum(f["train"]["steps"] for f in rounds), "loss": last["train"]["loss"],
        "tokens_per_second": last["train"]["tokens_per_second"],
        "seconds": sum(f["rollout_seconds"] + f["train_seconds"] + f["divergence_seconds"] for f in rounds),
        "registered": last["train"].get("registered", {}), "rounds": rounds,
    }


def round_metrics(figures: dict[str, Any]) -> dict[str, float]:
    """The figures of a round that MLflow plots across rounds."""
    names = ("success_rate", "episodes", "records", "mixed_records", "divergence", "divergence_reason",
             "divergence_act", "reasoning_tokens_per_turn", "weight_sync_seconds", "teacher_turns",
             "rollout_seconds", "train_seconds")
    return {f"on_policy/{k}": float(figures[k]) for k in names if figures.get(k) is not None}


def play_and_train_round(cfg: Config, folders: TeacherFolders, r: int, player: Path | str, rdir: Path | str,
                         train_name: str, register: bool) -> dict[str, Any]:
    from sad_ray.rollout.pipeline import RecordRecipe, run_rollouts
    from sad_ray.stages import env_kwargs, stage_train

    op = cfg.on_policy
    records = storage.join(rdir, "records")
    rcfg = dataclasses.replace(cfg.rollout, tasks_per_env=op.tasks_per_env, split="train", keep="all",
                               temperature=op.temperature)
    recipe = RecordRecipe(fmt=cfg.segment.format, on_unparsed=cfg.segment.on_unparsed,
                          drop_with_issues=cfg.segment.drop_trajectories_with_issues, top_k=cfg.records.top_k,
                          max_tokens=cfg.data.max_tokens, policy="student", round=r,
                          intervene_after=op.intervene_after)
    play_file = storage.join(rdir, "play.json")  # this round's play figures, once every episode is written
    start = time.perf_counter()
    if storage.is_file(play_file):
        played = json.loads(storage.read_bytes(play_file))
    else:
        with tracking.stage_run("rollout", {"round": r, "player": str(player), "policy": "student",
                                            **{f"rollout.{k}": v for k, v in to_flat_dict(rcfg).items()}},
                                name=f"rollout-{train_name}"):
            report = run_rollouts(folders.teacher, records, rcfg, recipe, env_kwargs(cfg),
                                  cfg.records.records_per_shard, precision=cfg.precision, player_dir=player)
            tracking.log_metrics(report.metrics())
        played = {"weight_sync_seconds": report.load_seconds, "teacher_turns": report.teacher_turns,
                  "seconds": time.perf_counter() - start}
        storage.write_bytes(play_file, json.dumps(played).encode())
    rollout_seconds = played["seconds"]  # the attempt that finished the play (a resumed one: its own part)
    start = time.perf_counter()
    outcome = play_outcome(records, sample=op.divergence_records)
    log.info("on-policy round %d: the player won %d of %d episodes; %d records", r, outcome["won"],
             outcome["episodes"], outcome["records"])
    if not outcome["records"]:
        raise RuntimeError(f"on-policy round {r}: the player's {outcome['episodes']} episodes in {records} left no "
                           f"record to train on (every one dropped: {outcome['dropped']}); see data.max_tokens and "
                           f"the segment section")

    sample = outcome.pop("sample")
    divergence = turn_divergence(player, sample, cfg) if sample else {}
    divergence_seconds = time.perf_counter() - start

    folders_to_train: list[Path | str] = [records]
    mixed = 0
    if op.fraction < 1.0:
        mixed = mix_in_teacher_records(folders.records, rdir, outcome["records"], op.fraction,
                                       seed=cfg.train.seed * 1000 + r)
        if mixed:
            folders_to_train.append(storage.join(rdir, "mixed"))
    start = time.perf_counter()
    train = stage_train(cfg, folders, player, name=train_name, records=folders_to_train,
                        final=storage.join(rdir, "student"), register=register)
    train_seconds = time.perf_counter() - start
    return {
        "round": r, "player": str(player), "student_dir": train["student_dir"], "records_dir": str(records),
        "episodes": outcome["episodes"], "won": outcome["won"],
        "success_rate": outcome["won"] / outcome["episodes"] if outcome["episodes"] else None,
        "records": outcome["records"], "mixed_records": mixed, "dropped": outcome["dropped"],
        "reasoning_tokens_per_turn": outcome["reasoning_tokens_per_turn"],
        "teacher_turns": played["teacher_turns"], "weight_sync_seconds": played["weight_sync_seconds"],
        **divergence, "divergence_seconds": divergence_seconds, "rollout_seconds": rollout_seconds,
        "train_seconds": train_seconds,
        "train": {k: train.get(k) for k in ("steps", "loss", "loss_cot", "loss_act", "seconds", "tokens_per_second",
                                            "run_identity", "registered")},
    }


def play_outcome(records: Path | str, sample: int = 0) -> dict[str, Any]:
    """A round's play read back from its folder in one pass (so a resumed round counts every episode, not just the
    rest): episodes, won, records, the episodes that left no record by reason, [REASON] tokens per student turn,
    and `sample`: the first `sample` records by id (the round's divergence is measured on them)."""
    won: dict[str, bool] = {}
    steps: dict[str, int] = {}
    reasoning = n = 0

    def counted(recs):
        nonlocal reasoning, n
        for rec in recs:
            ep = episode_id(rec.id)
            won[ep], steps[ep] = rec.success, rec.steps
            reasoning += rec.reasoning_length
            n += 1
            yield rec

    chosen: list[TrajectoryRecord] = []
    if storage.exists(records) and shard_paths(records):
        recs = counted(iter_records(records))
        chosen = heapq.nsmallest(sample, recs, key=lambda rec: rec.id)
        for _ in recs:  # nsmallest(0, ...) reads nothing
            pass
    dropped: dict[str, int] = {}
    for ep, reason in dropped_episodes(records).items() if storage.exists(records) else ():
        if ep not in won:
            dropped[reason] = dropped.get(reason, 0) + 1
            won[ep] = False
    turns = sum(steps.values())
    return {"episodes": len(won), "won": sum(won.values()), "records": n, "dropped": dropped,
            "reasoning_tokens_per_turn": reasoning / turns if turns else 0.0, "sample": chosen}


def mix_in_teacher_records(teacher_records: Path | str, rdir: Path | str, own: int, fraction: float,
                           seed: int) -> int:
    """Copy a sample of the teacher's off-policy records into `rdir/mixed` so that the round's own `own` records
    are `fraction` of what it trains on; returns how many (read back when an earlier attempt finished the copy)."""
    marker, mixed = storage.join(rdir, MIXED_FILE), storage.join(rdir, "mixed")
    if storage.is_file(marker):
        return int(json.loads(storage.read_bytes(marker))["records"])
    if not storage.exists(teacher_records) or not shard_paths(teacher_records):
        raise FileNotFoundError(f"on_policy.fraction {fraction} mixes the teacher's records into each round, and "
                                f"there are none in {teacher_records}: run with the data section's source (the "
                                f"records stage) first, or set on_policy.fraction: 1")
    want = round(own * (1.0 - fraction) / fraction)
    pool = [rec.id for rec in iter_records(teacher_records) if rec.split == "train"]
    chosen = set(random.Random(seed).sample(sorted(pool), min(want, len(pool))))
    if want > len(pool):
        log.warning("on-policy: the mix wants %d of the teacher's records, there are %d; using all of them",
                    want, len(pool))
    storage.remove_dir(mixed)  # an earlier attempt's partial copy
    with ShardWriter(mixed) as writer:
        for rec in iter_records(teacher_records):
            if rec.id in chosen:
                writer.add(dataclasses.replace(rec, id=MIXED_PREFIX + rec.id))
    storage.write_bytes(marker, json.dumps({"records": len(chosen), "from": str(teacher_records)}).encode())
    return len(chosen)


def turn_divergence(model_dir: Path | str, records: Sequence[TrajectoryRecord], cfg: Config) -> dict[str, float]:
    """The player's divergence from the teacher on the round's turns (its own, and any the teacher wrote when it
    stepped in), in `loss.divergence` (reverse KL by default), as token means over the [REASON] and [ACT] spans of
    `records` and over both: measured in a Ray task that asks for what a training worker does."""
    import ray

    from sad_ray.console import init_ray

    init_ray()
    t = cfg.train
    task = ray.remote(_divergence).options(num_cpus=t.cpus_per_worker, num_gpus=1 if t.use_gpu else 0,
                                           resources=dict(t.resources_per_worker) or None)
    return ray.get(task.remote(str(model_dir), list(records), cfg.loss, cfg.precision, t.threads))


def _divergence(model_dir: str, records: list, loss_cfg, precision: str, threads: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sad_ray.method.losses import LossConfig
    from sad_ray.precision import resolve_precision
    from sad_ray.train.step import SupervisedHead, collate, forward_loss

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    local = storage.stage(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(local)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = SupervisedHead(AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)).to(device).eval()
    # Both spans, unweighted: the divergence itself, whatever the objective trains.
    measure = LossConfig(objective="sad", mode=loss_cfg.mode, divergence=loss_cfg.divergence,
                         temperature=loss_cfg.temperature, beta=loss_cfg.beta)
    sums = {"reason": 0.0, "act": 0.0}
    counts = {"reason": 0, "act": 0}
    with torch.no_grad():
        for rec in records:
            batch = {k: v.to(device) for k, v in collate([rec], pad).items()}
            out = forward_loss(model, batch, measure, len(tokenizer), resolve_precision(precision, device))
            sums["reason"] += float(out.loss_cot) * out.n_reason
            sums["act"] += float(out.loss_act) * out.n_act
            counts["reason"] += out.n_reason
            counts["act"] += out.n_act
    total = counts["reason"] + counts["act"]
    return {"divergence": (sums["reason"] + sums["act"]) / total if total else 0.0,
            "divergence_reason": sums["reason"] / counts["reason"] if counts["reason"] else 0.0,
            "divergence_act": sums["act"] / counts["act"] if counts["act"] else 0.0}
