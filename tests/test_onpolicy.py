"""On-policy structured distillation (`loss.mode: on_policy`): the student plays with vLLM, the teacher scores and
steps in, Ray Train trains, the next round plays with the new weights; a killed round resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from sad_ray.records import read_records, write_shard
from tests.conftest import cache_dir
from tests.test_records import make_record

ROOT = Path(__file__).resolve().parents[1]


def job_args(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "distill.py"), "--config", str(ROOT / "configs" / "default.yaml"),
            f"paths.cache_dir={cache_dir()}", f"paths.output_dir={tmp / 'out'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "tracking.experiment=test",
            "models.teacher=starter", "models.student_layers=2", "precision=fp32", "eval.enabled=false",
            "loss.mode=on_policy", "on_policy.rounds=2", "on_policy.tasks_per_env=2", "on_policy.temperature=0",
            "on_policy.intervene_after=1", "rollout.envs=[hotpotqa]", "rollout.max_steps=3",
            "rollout.max_new_tokens=24", "rollout.engine.kind=vllm", "rollout.score_engine=hf",
            "rollout.cpus_per_actor=1", "records.top_k=5", "data.max_tokens=4096",
            "train.steps=4", "train.batch_size=1", "train.grad_accum=2", "train.lr=1e-3", "train.checkpoint_every=2",
            *extra]


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    client = mlflow.MlflowClient(uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """The job killed (SIGKILL, with everything it started) once round 2's training wrote its first checkpoint, then
    run again to the end."""
    tmp = tmp_path_factory.mktemp("onpolicy")
    args = job_args(tmp)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    out = tmp / "out"
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            if list(out.glob("teacher-*/ray_train/onpolicy-sad-seed0/round-002-*/checkpoint_*")):
                break
            assert proc.poll() is None, proc.stdout.read().decode()[-4000:]
            time.sleep(0.2)
        else:
            pytest.fail("round 2's training wrote no checkpoint in 15 minutes")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (root,) = out.glob("teacher-*/on_policy/onpolicy-sad-seed0-*")
    round1 = root / "round-001"
    assert (round1 / "round.json").is_file() and not (root / "round-002" / "round.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in (round1 / "records").iterdir()}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    summary, _ = json.JSONDecoder().raw_decode("\n".join(lines[lines.index("{"):]))  # the job's printed summary
    return tmp, root, before, summary


def test_two_rounds_play_score_train_and_reload_the_student(killed_and_resumed):
    from sad_ray.models.identity import teacher_id
    from sad_ray.models.starter import resolve_model

    tmp, root, _, summary = killed_and_resumed
    rounds = [json.loads((root / f"round-00{r}" / "round.json").read_text()) for r in (1, 2)]
    # Round 1's player is the student-init, round 2's the student round 1 trained; the run's student is round 2's.
    assert rounds[0]["player"].endswith("student-init")
    assert rounds[1]["player"] == rounds[0]["student_dir"] == str(root / "round-001" / "student")
    assert summary["student"] == rounds[1]["student_dir"] == str(root / "round-002" / "student")
    teacher = teacher_id(resolve_model("starter", cache_dir()))
    played = {r: read_records(root / f"round-00{r}" / "records") for r in (1, 2)}
    for r, records in played.items():
        assert records and {(x.policy, x.round, x.teacher_model) for x in records} == {("student", r, teacher)}
        assert rounds[r - 1]["episodes"] == 2 and rounds[r - 1]["records"] == len(records)

    # Greedy play of the same tasks: had round 2 not loaded round 1's weights, it would have written the same turns.
    def student_turns(records):
        return {x.id: [t["content"] for i, t in enumerate(x.turns) if t["role"] == "assistant"
                       and i not in x.teacher_turns] for x in records}

    assert student_turns(played[1]) != student_turns(played[2])
    # Each round's divergence on the student's own turns (reverse KL, the on-policy default), its success rate,
    # reasoning length and weight sync, per round in the job's MLflow run.
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    for key in ("success_rate", "divergence", "divergence_reason", "divergence_act", "reasoning_tokens_per_turn",
                "weight_sync_seconds"):
        history = metric_history(uri, summary["mlflow_run_id"], f"on_policy/{key}")
        assert [s for s, _ in history] == [1, 2], key
    assert all(v > 0 for _, v in metric_history(uri, summary["mlflow_run_id"], "on_policy/divergence"))
    assert all(v > 0 for _, v in metric_history(uri, summary["mlflow_run_id"], "on_policy/weight_sync_seconds"))
    run = mlflow.MlflowClient(uri).get_run(summary["mlflow_run_id"])
    assert run.data.params["loss.divergence"] == "reverse" and run.data.params["loss.mode"] == "on_policy"


def test_the_teacher_writes_the_turns_of_a_stuck_student(killed_and_resumed):
    """intervene_after=1: after a turn that got nowhere, the teacher writes the next one, and the records say
    which; those turns are the teacher's own greedy turns for that context."""
    from sad_ray.envs.react import context_window
    from sad_ray.models.starter import resolve_model
    from sad_ray.rollout.agent import parse_action, stalled
    from sad_ray.rollout.engines import EngineConfig, SamplingConfig, make_engine

    _, root, _, _ = killed_and_resumed
    records = read_records(root / "round-001" / "records")
    written = [(x, i) for x in records for i in x.teacher_turns]
    assert written, "the 2-layer student never got stuck?"
    for x, i in written:
        before = x.turns[i - 2]["content"], x.turns[i - 1]["content"]  # the turn before, and what it got
        assert x.turns[i]["role"] == "assistant" and stalled(parse_action(before[0]), before[1])
    teacher = make_engine(resolve_model("starter", cache_dir()), EngineConfig(kind="hf"), "fp32")
    x, i = written[0]
    (again,) = teacher.generate([context_window(list(x.turns[:i]), 3000)], SamplingConfig(max_new_tokens=24))
    assert again == x.turns[i]["content"]


def test_a_killed_round_resumes_at_its_step_and_finished_rounds_are_reused(killed_and_resumed):
    tmp, root, before, summary = killed_and_resumed
    # Round 1 was not played again: its record files are the ones the killed run wrote.
    assert {p.name: p.stat().st_mtime_ns for p in (root / "round-001" / "records").iterdir()} == before
    # Round 2's training went on from its checkpoint instead of starting over.
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    # (the killed attempt's child run, then the rerun's)
    killed, rerun = sorted((r for r in client.search_runs(
        [client.get_experiment_by_name("test").experiment_id], "tags.`sad_ray.stage` = 'train'")
        if r.info.run_name == "train-onpolicy-sad-seed0/round-002"), key=lambda r: r.info.start_time)
    assert not metric_history(uri, killed.info.run_id, "train/resumed_from_step")
    resumed = metric_history(uri, rerun.info.run_id, "train/resumed_from_step")
    assert resumed and resumed[-1][1] >= 2
    assert summary["train"]["steps"] == 8  # two rounds of train.steps


def test_the_teacher_records_mixed_in_are_the_configured_share(tmp_path):
    from sad_ray.onpolicy import MIXED_PREFIX, mix_in_teacher_records

    teacher = tmp_path / "teacher"
    write_shard([make_record(f"t{i}", seed=i) for i in range(10)], teacher / "part-00000.parquet")
    # 6 records of the student's own at fraction 0.75: 2 of the teacher's make them three quarters of 8.
    assert mix_in_teacher_records(teacher, tmp_path / "round", 6, 0.75, seed=1) == 2
    mixed = read_records(tmp_path / "round" / "mixed")
    assert len(mixed) == 2 and all(x.id.startswith(MIXED_PREFIX) and x.policy == "teacher" for x in mixed)
    # Read back, not drawn again, on a rerun; another round draws its own.
    assert mix_in_teacher_records(teacher, tmp_path / "round", 6, 0.75, seed=2) == 2
    assert [x.id for x in read_records(tmp_path / "round" / "mixed")] == [x.id for x in mixed]
    with pytest.raises(FileNotFoundError, match="on_policy.fraction 0.5 mixes the teacher's records"):
        mix_in_teacher_records(tmp_path / "none", tmp_path / "other", 6, 0.5, seed=1)
