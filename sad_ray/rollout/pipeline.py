"""Teacher rollouts on Ray Data: tasks -> rollout actors (one engine each, many episodes in flight) -> records.

Each actor plays its batch of tasks with the agent loop, scores the finished trajectories with the same engine,
segments them and returns record rows; the driver validates each row and writes Parquet shards as they fill,
so a crash loses at most the shard in flight. Episodes that end without a record (failed, or every window
dropped) go to the folder's ledger, so a rerun skips the tasks already written and the ones already dropped:
greedy play would fail them the same way again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from sad_ray.envs.base import Task
from sad_ray.records import (
    SCHEMA,
    ShardWriter,
    dropped_episodes,
    episode_id,
    finished_episodes,
    record_from_row,
)
from sad_ray.resources import check_resources
from sad_ray.rollout.agent import Intervention, PlayConfig, PlayStats, generated_tokens, play
from sad_ray.rollout.engines import EngineConfig, SamplingConfig, make_engine
from sad_ray.rollout.score import score_episodes

log = logging.getLogger(__name__)

# Rows leaving an actor, by `row_kind`: "episode" (one per finished episode: id, env, task_type, success, steps,
# generated_tokens, and drop_reason when it is not kept), "record" (the record's columns) and "drop" (a window of
# a kept episode that did not become a record, with its drop_reason). One channel, so the driver counts outcomes.
# Episode rows also carry `load_seconds`: how long the actor took to load the player's weights into its engine
# (on-policy rounds report it as the weight sync).
ROW_SCHEMA = (SCHEMA.append(pa.field("drop_reason", pa.string())).append(pa.field("generated_tokens", pa.int64()))
              .append(pa.field("row_kind", pa.string())).append(pa.field("load_seconds", pa.float64())))


@dataclass(frozen=True)
class RolloutConfig:
    envs: tuple[str, ...] = ("alfworld", "webshop", "hotpotqa")
    tasks_per_env: int = 8
    split: Literal["train", "val", "test"] = "train"
    # Which finished episodes become records.
    keep: Literal["success", "all"] = "success"
    actors: int = 1
    # Fractional CPUs keep the actor pool from starving other Ray work on a 2-core box (STACK.md deadlock).
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    # Custom Ray resources per actor: {teacher_gpu: 2} keeps the engines on cluster.yaml's gpu-teacher nodes.
    resources_per_actor: dict[str, float] = field(default_factory=dict)
    tasks_per_batch: int = 8
    max_in_flight: int = 8
    max_steps: int = 30
    max_new_tokens: int = 96
    temperature: float = 0.0
    # Long episodes: the agent sees the system prompt, the first observation and the recent steps that fit in
    # this many characters, and records are cut into the same windows (sad_ray.envs.react.context_window).
    context_chars: int | None = 3000
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Which engine computes the teacher's top-k: the one that plays ("same"), or a transformers copy of the
    # teacher in the same actor ("hf"): on CPU, vLLM generates ~6x faster but its prompt-logprob prefill is
    # slower than one HF forward pass (bench/rollout.py), so "hf" is the faster mix there.
    score_engine: Literal["same", "hf"] = "same"

    def __post_init__(self) -> None:
        if self.actors < 1 or self.tasks_per_batch < 1 or self.max_in_flight < 1 or self.tasks_per_env < 1:
            raise ValueError("actors, tasks_per_env, tasks_per_batch and max_in_flight must be >= 1")
        if self.cpus_per_actor <= 0 and self.gpus_per_actor <= 0:
            raise ValueError("an actor needs cpus_per_actor > 0 or gpus_per_actor > 0")
        check_resources("resources_per_actor", self.resources_per_actor)


@dataclass(frozen=True)
class RecordRecipe:
    """How a played episode becomes records: segmentation format and rules (config `segment.*`), the teacher's top-k
    (`records.top_k`) and the longest record kept (`data.max_tokens`)."""

    fmt: str = "react"
    on_unparsed: str = "reason"
    drop_with_issues: bool = False
    top_k: int = 20
    max_tokens: int = 2048
    # Who plays (`policy` of the records): "teacher", or "student" in on-policy round `round` (>= 1).
    policy: str = "teacher"
    round: int = 0
    # On-policy only: the teacher writes an episode's next turn after this many turns that got nowhere (0: never).
    intervene_after: int = 0


class RolloutActor:
    """Holds the engine that plays and the teacher's engine that scores (one engine when the teacher plays); each
    call plays a batch of tasks and returns their record rows."""

    def __init__(self, teacher_dir: str, cfg: RolloutConfig, seg: RecordRecipe, env_kwargs: dict[str, dict],
                 precision: str = "auto", player_dir: str | None = None):
        from transformers import AutoTokenizer

        from sad_ray.models.identity import teacher_id
        from sad_ray.models.tokenizers import tokenizer_fingerprint
        from sad_ray.storage import stage

        self.cfg, self.seg, self.env_kwargs = cfg, seg, env_kwargs
        teacher_dir = str(stage(teacher_dir))  # a URI is copied to this node once; the folder keeps its name
        # What the records name as their teacher: the model's folder name and weights fingerprint.
        self.teacher_id = teacher_id(teacher_dir)
        trust = cfg.engine.trust_remote_code
        # The masks need a fast HF tokenizer with offsets, whatever wrapper the engine keeps.
        self.tokenizer = AutoTokenizer.from_pretrained(teacher_dir, trust_remote_code=trust)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        score_cfg = replace(cfg.engine, kind="hf") if cfg.score_engine == "hf" else cfg.engine
        if player_dir is None:
            start = time.perf_counter()
            self.engine = make_engine(teacher_dir, cfg.engine, precision)
            self.load_seconds = time.perf_counter() - start
            self.scorer = self.engine if score_cfg.kind == cfg.engine.kind else make_engine(teacher_dir, score_cfg,
                                                                                          precision)
            return
        # Another model plays (on-policy: the student) and the teacher scores its turns at its own positions,
        # which needs the same token ids on both sides.
        self.scorer = make_engine(teacher_dir, score_cfg, precision)
        # The weight sync of an on-policy round: the new student's weights from storage (staged to this node)
        # into a ready engine.
        start = time.perf_counter()
        player_dir = str(stage(player_dir))
        player = tokenizer_fingerprint(AutoTokenizer.from_pretrained(player_dir, trust_remote_code=trust))
        if player != self.fingerprint:
            raise ValueError(f"the player {player_dir} and the teacher {teacher_dir} have different tokenizers "
                             f"({player[:12]} vs {self.fingerprint[:12]}): the teacher can only score a player's "
                             f"turns token by token when both use the same vocabulary")
        self.engine = make_engine(player_dir, cfg.engine, precision)
        self.load_seconds = time.perf_counter() - start

    def __call__(self, batch: pa.Table) -> pa.Table:
        from sad_ray.envs import make_env

        tasks = [Task(**row) for row in batch.to_pylist()]
        rows: list[dict[str, Any]] = []
        play_cfg = PlayConfig(max_in_flight=self.cfg.max_in_flight, sampling=SamplingConfig(
            temperature=self.cfg.temperature, max_new_tokens=self.cfg.max_new_tokens),
            context_chars=self.cfg.context_chars)
        kept = []

        def finished(ep, reason: str | None) -> None:
            rows.append({"id": ep.id, "env": ep.env, "task_type": ep.task_type, "success": ep.success,
                         "steps": ep.steps, "drop_reason": reason, "row_kind": "episode",
                         "generated_tokens": generated_tokens(self.tokenizer, ep), "load_seconds": self.load_seconds,
                         "teacher_turns": list(ep.teacher_turns)})

        def dropped(ep, reason: str) -> None:
            rows.append({"id": ep.id, "env": ep.env, "task_type": ep.task_type, "success": ep.success,
                         "drop_reason": reason, "row_kind": "drop"})

        def new_env(name: str):
            return make_env(name, **{"max_steps": self.cfg.max_steps, **self.env_kwargs.get(name, {})})

        # The teacher steps in with its greedy turn, whatever the player samples at: its best move out of the stall
        # (sampled at temperature 1, the quick teacher's turns often ran to max_new_tokens in the scorer's
        # transformers copy, and a round's play took over 3x as long).
        intervention = (Intervention(self.scorer, self.seg.intervene_after,
                                     replace(play_cfg.sampling, temperature=0.0))
                        if self.seg.intervene_after else None)
        # All environments' tasks share one in-flight batch: bigger engine batches, one pass.
        for ep in play(self.engine, new_env, tasks, play_cfg, PlayStats(), intervention):
            if self.cfg.keep == "success" and not ep.success:
                finished(ep, "failed_episode")
            else:
                finished(ep, None)
                kept.append(ep)
        for record in score_episodes(
            kept, self.tokenizer, self.scorer, fmt=self.seg.fmt, top_k=self.seg.top_k,
            fingerprint=self.fingerprint, on_unparsed=self.seg.on_unparsed,
            drop_with_issues=self.seg.drop_with_issues, max_tokens=self.seg.max_tokens, on_drop=dropped,
            context_chars=self.cfg.context_chars, teacher_model=self.teacher_id, policy=self.seg.policy,
            round=self.seg.round,
        ):
            rows.append({**record.to_row(), "drop_reason": None, "row_kind": "record"})
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def rollout_tasks(cfg: RolloutConfig, env_kwargs: dict[str, dict]) -> list[Task]:
    from sad_ray.envs import make_env

    tasks: list[Task] = []
    for name in cfg.envs:
        env = make_env(name, **env_kwargs.get(name, {}))
        tasks.extend(env.tasks(cfg.split, cfg.tasks_per_env))
        env.close()
    return tasks


@dataclass
class RolloutReport:
    written: int = 0
    skipped_existing: int = 0  # tasks with records already, or dropped by an earlier run (in the ledger)
    skipped_dropped: int = 0  # of those, the ones the ledger skips
    steps: int = 0
    generated_tokens: int = 0
    dropped: Counter = field(default_factory=Counter)
    won_by_env: Counter = field(default_factory=Counter)
    episodes_by_env: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    supervised_tokens: int = 0
    shards: list[str] = field(default_factory=list)
    load_seconds: float = 0.0  # the slowest actor's load of the player's weights into its engine
    teacher_turns: int = 0  # turns the teacher wrote into the player's episodes (interventions)
    reasoning_tokens: int = 0  # [REASON] tokens of the records written

    @property
    def episodes(self) -> int:
        return sum(self.episodes_by_env.values())

    @property
    def won(self) -> int:
        return sum(self.won_by_env.values())

    def metrics(self) -> dict[str, float]:
        out = {
            "rollout/episodes": self.episodes, "rollout/records_written": self.written,
            "rollout/skipped_existing": self.skipped_existing, "rollout/skipped_dropped": self.skipped_dropped,
            "rollout/seconds": self.seconds,
        }
        if not self.episodes:  # a rerun with nothing left to play: no rate to report, not a rate of zero
            return out
        out.update({
            "rollout/success_rate": self.won / self.episodes,
            "rollout/generated_tokens_per_second": self.generated_tokens / self.seconds if self.seconds else 0.0,
            "rollout/env_steps_per_second": self.steps / self.seconds if self.seconds else 0.0,
        })
        out.update({f"rollout/dropped/{k}": v for k, v in self.dropped.items()})
        out.update({f"rollout/success_rate/{env}": self.won_by_env[env] / n for env, n in self.episodes_by_env.items()})
        return out


def run_rollouts(
    teacher_dir: str | Path,
    out_dir: str | Path,
    cfg: RolloutConfig,
    seg: RecordRecipe = RecordRecipe(),
    env_kwargs: dict[str, dict] | None = None,
    records_per_shard: int = 256,
    tasks: Sequence[Task] | None = None,
    precision: str = "auto",
    player_dir: str | Path | None = None,
) -> RolloutReport:
    """Run the rollout stage on the current Ray cluster (starting a local one if none is up); the engines run in
    `precision` (auto | bf16 | fp16 | fp32), resolved in each actor for the hardware it landed on. The teacher
    plays and scores; with `player_dir` that model plays (on-policy distillation: the student) and the teacher
    scores its turns (`cfg.score_engine` "hf": a transformers copy of the teacher, else an engine of `cfg.engine`'s
    kind), so the records carry the teacher's distribution at the player's own tokens."""
    import ray

    env_kwargs = env_kwargs or {}
    report = RolloutReport()
    start = time.perf_counter()
    # A failed episode is dropped only while `keep` is "success"; with keep "all" the ledger's failures are replayed.
    redo = () if cfg.keep == "success" else ("failed_episode",)
    done = finished_episodes(out_dir, redo)
    all_tasks = list(tasks) if tasks is not None else rollout_tasks(cfg, env_kwargs)
    todo = [t for t in all_tasks if t.id not in done]
    report.skipped_existing = len(all_tasks) - len(todo)
    ledger = dropped_episodes(out_dir)  # a small file: re-reading it spares a second pass over the shards
    report.skipped_dropped = sum(t.id in ledger and ledger[t.id] not in redo for t in all_tasks)
    if not todo:
        log.info("rollout: all %d tasks are done in %s (%d of them dropped)", len(all_tasks), out_dir,
                 report.skipped_dropped)
        return report
    from sad_ray.console import Progress, init_ray

    init_ray()
    ds = ray.data.from_items([asdict(t) for t in todo]).map_batches(
        RolloutActor,
        fn_constructor_args=(str(teacher_dir), cfg, seg, env_kwargs, precision,
                             None if player_dir is None else str(player_dir)),
        batch_size=cfg.tasks_per_batch,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
        # Each engine on another node where it can (tests/test_multinode.py): engines side by side use their
        # nodes' cores or GPUs; resources_per_actor says which nodes may hold one.
        scheduling_strategy="SPREAD",
        # A lost actor (its node gone) restarts wherever it fits and its batch is replayed: the driver writes only
        # whole batches it received, so a replayed episode is never written twice (tests/test_node_loss.py).
        # Ray Data's own defaults today; spelled out because the design rests on them.
        max_restarts=-1, max_task_retries=-1,
        **({"resources": dict(cfg.resources_per_actor)} if cfg.resources_per_actor else {}),
    )
    progress = Progress("rollout", len(todo), "episodes")
    with ShardWriter(out_dir, records_per_shard) as writer:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            _write_batch(batch.to_pylist(), writer, report)
            played = sum(report.episodes_by_env.values())
            progress.update(played, f"won {sum(report.won_by_env.values())}, {report.written} records")
    report.shards = [str(p) for p in writer.written]
    report.seconds = time.perf_counter() - start
    return report


def _write_batch(rows: list[dict[str, Any]], writer: ShardWriter, report: RolloutReport) -> None:
    """One actor batch: count outcomes, write the records, and ledger the episodes that wrote none."""
    episodes: dict[str, dict[str, Any]] = {}
    written: Counter = Counter()
    window_drops: dict[str, set[str]] = {}
    for row in rows:
        reason, kind = row.pop("drop_reason"), row.pop("row_kind")
        if kind != "episode":
            row.pop("load_seconds")
        tokens = row.pop("generated_tokens")
        if reason is not None:
            report.dropped[reason] += 1
        if kind == "episode":
            report.generated_tokens += int(tokens or 0)
            report.episodes_by_env[row["env"]] += 1
            report.won_by_env[row["env"]] += bool(row["success"])
            report.steps += int(row["steps"] or 0)
            report.load_seconds = max(report.load_seconds, float(row.pop("load_seconds") or 0.0))
            report.teacher_turns += len(row.pop("teacher_turns") or ())
            episodes[row["id"]] = {**row, "reason": reason}
        elif kind == "drop":
            window_drops.setdefault(episode_id(row["id"]), set()).add(reason)
        else:
            record = record_from_row(row, "rollout actor output")
            writer.add(record)
            written[episode_id(record.id)] += 1
            report.written += 1
            report.supervised_tokens += int(record.supervised.sum())
            report.reasoning_tokens += record.reasoning_length
    for ep, row in episodes.items():
        # A kept episode with no record here and no dropped window either may have its records in a later
        # block: leave it out of the ledger (at worst a rerun plays it again).
        reason = row["reason"] or "+".join(sorted(window_drops.get(ep, ())))
        if not written[ep] and reason:
            writer.drop(ep, reason, env=row["env"], task_type=row["task_type"], success=bool(row["success"]),
                        steps=int(row["steps"] or 0))
