"""Student training on Ray Train, for real: a loss that falls, a worker killed mid-run, DeepSpeed ZeRO-2 on CPU,
and the set-up errors that must stop a run before any worker starts."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from sad_ray.method.curriculum import CurriculumConfig
from sad_ray.method.losses import LossConfig
from sad_ray.train.ray_train import TrainConfig, TrainSetupError, train_on_records
from tests.test_records import make_record


@pytest.fixture(scope="module")
def data(tmp_path_factory, starter_dir, starter_tokenizer):
    """Teacher-scored (top-20, the real starter) seed trajectories and a 2-layer student cut from the starter."""
    from sad_ray.envs.seed import seed_episodes
    from sad_ray.models.student import build_student
    from sad_ray.models.tokenizers import tokenizer_fingerprint
    from sad_ray.records import write_shard
    from sad_ray.rollout.engines import HFEngine
    from sad_ray.rollout.score import score_episodes

    root = tmp_path_factory.mktemp("train_ray")
    engine = HFEngine(starter_dir)
    records = list(score_episodes(seed_episodes(16), starter_tokenizer, engine, fmt="react", top_k=20,
                                  fingerprint=tokenizer_fingerprint(starter_tokenizer)))
    engine.close()
    write_shard(records[:8], root / "records" / "part-00000.parquet")
    write_shard(records[8:], root / "records" / "part-00001.parquet")
    build_student(starter_dir, root / "student-init", 2)
    return root


def mlflow_run(tmp_path: Path) -> tuple[str, str]:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("train-ray-test")
    return uri, client.create_run(exp).info.run_id


def loss_history(uri: str, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    import mlflow

    return [(m.step, m.value) for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key)]


# One run's settings, shared by the uninterrupted reference, the killed and crashed runs and the DeepSpeed run, so
# each can be compared with the reference step by step (same data, same seed, same schedule).
SAME_RUN = {"steps": 12, "batch_size": 2, "grad_accum": 2, "lr": 5e-4, "checkpoint_every": 3, "threads": 1}


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted DDP run of SAME_RUN: its loss at every step and its trained student."""
    tmp = tmp_path_factory.mktemp("reference")
    uri, run_id = mlflow_run(tmp)
    result = train_on_records(data / "records", data / "student-init", tmp / "out", TrainConfig(**SAME_RUN),
                           LossConfig(), CurriculumConfig(ramp=0.5), run_name="reference", tracking_uri=uri,
                           mlflow_run_id=run_id)
    losses = loss_history(uri, run_id)
    assert [s for s, _ in losses] == list(range(1, 13))
    return {"loss": dict(losses), "grad_norm": dict(loss_history(uri, run_id, "grad_norm")),
            "student": Path(result.student_dir)}


def assert_same_as_reference(reference, uri: str, run_id: str, student: Path, rtol: float, grad_rtol: float,
                             atol: float):
    """Every logged step's loss and gradient norm (a step run twice around a resume logs twice) and the final weights
    match the uninterrupted run's. The gradient norm is what shows a wrongly scaled gradient (AdamW would hide it
    from the loss); at step 1 both runs start from the same weights, so it must agree to float rounding."""
    from safetensors.torch import load_file

    for key, tol in (("loss", rtol), ("grad_norm", grad_rtol)):
        for step, value in loss_history(uri, run_id, key):
            want = reference[key][step]
            assert value == pytest.approx(want, rel=1e-4 if step == 1 else tol), (key, step, value, want)
    want = load_file(reference["student"] / "model.safetensors")
    got = load_file(student / "model.safetensors")
    assert got.keys() == want.keys()
    worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
    assert worst <= atol, f"weights differ from the uninterrupted run by up to {worst:g}"


def test_sad_training_lowers_the_loss_and_saves_a_student(tmp_path, data):
    uri, run_id = mlflow_run(tmp_path)
    settings = TrainConfig(steps=10, batch_size=4, lr=1e-3, checkpoint_every=5, threads=2)
    result = train_on_records(data / "records", data / "student-init", tmp_path / "out", settings,
                           LossConfig(objective="sad"), CurriculumConfig(ramp=0.5),
                           tracking_uri=uri, mlflow_run_id=run_id)
    history = loss_history(uri, run_id)
    assert [s for s, _ in history] == list(range(1, 11))  # rank 0 logged every step once
    first, last = np.mean([v for _, v in history[:2]]), np.mean([v for _, v in history[-2:]])
    assert last < 0.7 * first, history
    for key in ("loss_cot", "loss_act", "lr", "tokens_per_second", "curriculum/open_fraction",
                "curriculum/weight_entropy", "data_wait_fraction", "peak_memory_gb", "peak_own_memory_gb"):
        assert loss_history(uri, run_id, key), key
    assert result.steps == 10 and result.tokens > 0
    student = Path(result.student_dir)
    assert (student / "config.json").is_file() and (student / "tokenizer.json").is_file()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student)
    assert model.config.num_hidden_layers == 2
    # A rerun of a finished run returns the saved result without training.
    start = time.perf_counter()
    again = train_on_records(data / "records", data / "student-init", tmp_path / "out", settings,
                          LossConfig(objective="sad"), CurriculumConfig(ramp=0.5))
    assert again == result and time.perf_counter() - start < 5


KILL_A_WORKER = """
import json, os, signal, sys, threading, time
from pathlib import Path
import mlflow
from ray._private.worker import global_worker
from ray.util.state import list_actors
from sad_ray.method.curriculum import CurriculumConfig
from sad_ray.method.losses import LossConfig
from sad_ray.train.ray_train import TrainConfig, train_on_records

records, student, out, uri, run_id = sys.argv[1:6]
settings = TrainConfig(**json.loads(sys.argv[6]), max_failures=2)
result, errors = [], []

def run():
    try:
        result.append(train_on_records(Path(records), Path(student), Path(out), settings, LossConfig(),
                                    CurriculumConfig(ramp=0.5), run_name="killed", tracking_uri=uri,
                                    mlflow_run_id=run_id))
    except BaseException as exc:
        errors.append(repr(exc))

def steps():
    return [m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, "loss")]

thread = threading.Thread(target=run)
thread.start()
deadline = time.time() + 300
while time.time() < deadline and max(steps(), default=0) < 5:  # two steps past the first checkpoint
    time.sleep(0.2)
# This process's cluster only: another one on the machine is not ours.
dashboard = global_worker.node.address_info["webui_url"]
pids = [a.pid for a in list_actors(address=f"http://{dashboard}",
                                   filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
for pid in pids:
    os.kill(pid, signal.SIGKILL)
killed_at = max(steps())
thread.join(timeout=600)
print("RESULT", json.dumps({"pids": pids, "killed_at": killed_at, "errors": errors,
                            "steps": result[0].steps if result else None,
                            "student": result[0].student_dir if result else None}))
"""


def test_a_killed_worker_streaming_through_its_buffer_resumes_exactly(tmp_path, data):
    """train.buffer_records: the worker streams its 16 records through a 6-record buffer (the curriculum picks what
    leaves). The worker is SIGKILLed mid-run; Ray Train restarts it from the last checkpoint, with the checkpointed
    buffer read back from its shard, and every step's loss, gradient norm and the final weights match an
    uninterrupted buffered run. (The whole-shard curriculum's restore is shown by the crashed-job and node-loss
    tests. The kill runs in its own process, so the killed worker's cluster cannot disturb the suite.)"""
    import subprocess
    import sys

    buffered = {**SAME_RUN, "buffer_records": 6}
    steps = buffered["steps"]
    ref_uri, ref_run = mlflow_run(tmp_path / "ref")
    ref = train_on_records(data / "records", data / "student-init", tmp_path / "ref" / "out",
                           TrainConfig(**buffered), LossConfig(), CurriculumConfig(ramp=0.5), run_name="buffered",
                           tracking_uri=ref_uri, mlflow_run_id=ref_run)
    reference = {"loss": dict(loss_history(ref_uri, ref_run)), "grad_norm": dict(loss_history(ref_uri, ref_run,
                                                                                              "grad_norm")),
                 "student": Path(ref.student_dir)}
    assert sorted(reference["loss"]) == list(range(1, steps + 1))
    # The buffer moved through the whole shard (16 records), six at a time.
    position = loss_history(ref_uri, ref_run, "train/stream_position")
    assert position[0][1] > 6 and position[-1][1] == 16, position
    assert all(0 < v <= 1 for _, v in loss_history(ref_uri, ref_run, "curriculum/buffer_fill"))

    uri, run_id = mlflow_run(tmp_path)
    script = tmp_path / "kill.py"
    script.write_text(KILL_A_WORKER)
    done = subprocess.run([sys.executable, str(script), str(data / "records"), str(data / "student-init"),
                           str(tmp_path / "out"), uri, run_id, json.dumps(buffered)],
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                          capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    # The script started its own local cluster (sad_ray.console.init_ray) without Ray's token notice on the console.
    assert "Token authentication is enabled" not in done.stdout + done.stderr
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["pids"], "no Ray Train worker process found"
    assert not out["errors"], out["errors"]
    killed_at = out["killed_at"]
    assert 5 <= killed_at < steps and out["steps"] == steps
    resumed = loss_history(uri, run_id, "train/resumed_from_step")
    assert resumed, "the run never resumed from a checkpoint"
    resumed_from = int(resumed[0][1])
    assert resumed_from >= 3 and resumed_from % 3 == 0 and resumed_from <= killed_at
    logged = [s for s, _ in loss_history(uri, run_id)]
    # Every step ran; only the steps between the checkpoint and the kill ran twice.
    assert sorted(set(logged)) == list(range(1, steps + 1))
    repeated = sorted({s for s in logged if logged.count(s) > 1})
    assert all(resumed_from < s <= killed_at + 1 for s in repeated), (repeated, resumed_from, killed_at)
    assert json.loads((Path(out["student"]) / "sad_ray_train.json").read_text())["result"]["steps"] == steps
    # Resumed exactly: model, optimizer, schedule, buffer, stream position and RNG all came back from the checkpoint.
    assert_same_as_reference(reference, uri, run_id, Path(out["student"]), rtol=1e-4, grad_rtol=1e-4, atol=1e-5)


def test_two_ddp_workers_train_on_disjoint_shards(tmp_path, data, caplog):
    import logging

    import torch

    from sad_ray.records import read_records

    caplog.set_level(logging.INFO, logger="sad_ray")
    # Gradient checkpointing under DDP: recomputation must not break gradient synchronisation.
    settings = TrainConfig(steps=4, batch_size=2, lr=1e-3, checkpoint_every=2, num_workers=2,
                               cpus_per_worker=0.5, threads=1, gradient_checkpointing=True)
    result = train_on_records(data / "records", data / "student-init", tmp_path / "out", settings,
                           LossConfig(objective="sad"), CurriculumConfig(ramp=0.5))
    assert result.steps == 4 and np.isfinite(result.loss)
    (ckpt,) = [p for p in (tmp_path / "out" / "ray_train").glob("train-*/checkpoint_2*")
               if json.loads((p / "progress.json").read_text())["step"] == 4]
    shards = [torch.load(ckpt / f"worker-{rank}.pt", weights_only=False)["sampler"]["order_ids"] for rank in (0, 1)]
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == {r.id for r in read_records(data / "records")}
    assert (ckpt / "state.pt").is_file() and (ckpt / "hf" / "config.json").is_file()
    # Both workers' log lines reach the driver (Ray's own forwarding is off), rank 0's progress with them.
    relayed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("(train worker ")]
    assert any(m.startswith("(train worker 0) train train-") and "step 4/4" in m for m in relayed), relayed
    assert any(m.startswith("(train worker 1) precision for training (rank 1)") for m in relayed), relayed


# -------------------------------------------------------------------------------- set-up errors, before Ray


def test_empty_or_missing_records_stop_before_training(tmp_path, data):
    (tmp_path / "empty").mkdir()
    s = TrainConfig(steps=1)
    with pytest.raises(TrainSetupError, match="holds no record shards"):
        train_on_records(tmp_path / "empty", data / "student-init", tmp_path / "out", s, LossConfig(), CurriculumConfig())
    with pytest.raises(TrainSetupError, match="does not exist"):
        train_on_records(tmp_path / "nope", data / "student-init", tmp_path / "out", s, LossConfig(), CurriculumConfig())


def test_an_invalid_record_is_named_before_training(tmp_path, data):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sad_ray.records import SCHEMA, read_shard_table

    table = read_shard_table(data / "records" / "part-00000.parquet")
    rows = table.to_pylist()
    rows[3]["tail_logprob"] = [0.5] * len(rows[3]["tail_logprob"])  # mass above 1
    (tmp_path / "bad").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp_path / "bad" / "part-00000.parquet")
    with pytest.raises(TrainSetupError, match=rf"record '{rows[3]['id']}'.*tail_logprob"):
        train_on_records(tmp_path / "bad", data / "student-init", tmp_path / "out", TrainConfig(steps=1),
                      LossConfig(), CurriculumConfig())
    assert not (tmp_path / "out").exists()


def test_a_missing_model_or_another_tokenizer_stops_before_training(tmp_path, data):
    from sad_ray.records import write_shard

    s = TrainConfig(steps=1)
    with pytest.raises(TrainSetupError, match="not a Hugging Face directory"):
        train_on_records(data / "records", tmp_path / "no-model", tmp_path / "out", s, LossConfig(), CurriculumConfig())
    write_shard([make_record(f"r{i}", seed=i) for i in range(4)], tmp_path / "other" / "part-00000.parquet")
    with pytest.raises(TrainSetupError, match="not the tokenizer the records were made with"):
        train_on_records(tmp_path / "other", data / "student-init", tmp_path / "out", s, LossConfig(), CurriculumConfig())


def test_records_of_another_teacher_are_refused_naming_the_file(tmp_path):
    from sad_ray.records import write_shard
    from sad_ray.train.ray_train import scan_records

    write_shard([make_record(f"a{i}", seed=i, teacher="mine@00") for i in range(2)],
                tmp_path / "r" / "part-00000.parquet")
    assert scan_records(tmp_path / "r", teacher="mine@00").teacher == "mine@00"
    assert scan_records(tmp_path / "r").teacher == "mine@00"
    write_shard([make_record("b0", teacher="other@11")], tmp_path / "r" / "part-00001.parquet")
    with pytest.raises(TrainSetupError, match=r"records in \S*part-00001.parquet were made by teacher other@11; "
                                              r"this run's teacher is mine@00"):
        scan_records(tmp_path / "r", teacher="mine@00")
    # Without an expected teacher the records must still agree on one.
    with pytest.raises(TrainSetupError, match=r"records in \S*part-00001.parquet were made by teacher other@11, "
                                              r"those in \S*part-00000.parquet by teacher mine@00"):
        scan_records(tmp_path / "r")
    # The trainer refuses them before it looks at the model or starts a worker.
    with pytest.raises(TrainSetupError, match="this run's teacher is mine@00"):
        train_on_records(tmp_path / "r", tmp_path / "no-model", tmp_path / "out", TrainConfig(steps=1),
                      LossConfig(), CurriculumConfig(), teacher="mine@00")
    assert not (tmp_path / "out").exists()


def test_a_broken_shard_is_refused_or_skipped_by_name(tmp_path):
    """A truncated shard and a shard of another schema version: refused naming the file (the default), or left
    out with a warning, so the workers read only the good shards."""
    import pyarrow.parquet as pq

    from sad_ray.records import read_shard_table, write_shard
    from sad_ray.train.ray_train import scan_records

    good = write_shard([make_record(f"g{i}", seed=i) for i in range(3)], tmp_path / "r" / "part-00000.parquet")
    cut = write_shard([make_record(f"c{i}", seed=i) for i in range(3)], tmp_path / "r" / "part-00001.parquet")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a copy cut off mid-file
    table = read_shard_table(good)
    future = table.replace_schema_metadata({**table.schema.metadata, b"sad_ray.schema_version": b"99"})
    pq.write_table(future, tmp_path / "r" / "part-00002.parquet")
    with pytest.raises(TrainSetupError, match=r"part-00001.parquet.*not a readable Parquet file.*bad_shards=skip"):
        scan_records(tmp_path / "r")
    summary = scan_records(tmp_path / "r", bad_shards="skip")
    assert summary.records == 3 and summary.shards == (str(good),)
    assert [Path(p).name for p in summary.skipped] == ["part-00001.parquet", "part-00002.parquet"]
    (tmp_path / "r" / "part-00000.parquet").unlink()
    with pytest.raises(TrainSetupError, match="2 shards skipped"):
        scan_records(tmp_path / "r", bad_shards="skip")


def test_the_run_identity_covers_teacher_start_weights_data_and_objective(tmp_path):
    import dataclasses
    import shutil

    from sad_ray.train.ray_train import DataSummary, run_identity
    from tests.test_identity import flip_a_weight_byte, tiny_model

    summary = DataSummary(records=4, fingerprint="f", bounds=([0.0] * 3, [1.0] * 3), ids_digest="d", teacher="t@1")
    student = tiny_model(tmp_path / "student-init")

    def identity(summary=summary, student=student, settings=None, loss=None):
        return run_identity(summary, student, settings or TrainConfig(), loss or LossConfig(), CurriculumConfig())

    base = identity()
    # The start model counts by content: the same weights in another folder are the same run ...
    moved = shutil.copytree(student, tmp_path / "elsewhere")
    assert identity(student=moved) == base
    # ... one changed weight is another.
    flip_a_weight_byte(moved / "model-00001-of-00002.safetensors")
    assert identity(student=moved) != base
    assert identity(summary=dataclasses.replace(summary, teacher="t@2")) != base
    assert identity(summary=dataclasses.replace(summary, ids_digest="e")) != base
    assert identity(loss=LossConfig(objective="token_kd")) != base
    assert identity(settings=TrainConfig(seed=1)) != base
    assert identity(settings=TrainConfig(checkpoint_every=7)) == base  # how a run goes, not what it computes


def test_a_batch_larger_than_the_data_is_refused(tmp_path, data):
    with pytest.raises(TrainSetupError, match="fewer than train.batch_size"):
        train_on_records(data / "records", data / "student-init", tmp_path / "out",
                      TrainConfig(steps=1, batch_size=16, grad_accum=2), LossConfig(), CurriculumConfig())


def test_too_many_workers_for_the_cpus_is_refused(tmp_path, data):
    import ray

    cpus = ray.cluster_resources().get("CPU", 2) if ray.is_initialized() else os.cpu_count()
    with pytest.raises(TrainSetupError, match="cpus_per_worker"):
        train_on_records(data / "records", data / "student-init", tmp_path / "out",
                      TrainConfig(steps=1, batch_size=1, num_workers=2, cpus_per_worker=float(cpus)),
                      LossConfig(), CurriculumConfig())


RUN_TRAINING = """
import json
import sys
from pathlib import Path
from sad_ray.method.curriculum import CurriculumConfig
from sad_ray.method.losses import LossConfig
from sad_ray.train.ray_train import TrainConfig, train_on_records

records, student, out, uri, run_id, strategy, same_run = sys.argv[1:8]
settings = TrainConfig(**json.loads(same_run), strategy=strategy)
r = train_on_records(Path(records), Path(student), Path(out), settings, LossConfig(), CurriculumConfig(ramp=0.5),
                  run_name="crash", tracking_uri=uri, mlflow_run_id=run_id)
print("STEPS", r.steps)
print("STUDENT", r.student_dir)
"""


@pytest.mark.parametrize("strategy", ["deepspeed"])  # DDP's resume is shown by the killed-worker and node-loss tests
def test_a_crashed_job_resumes_when_rerun(tmp_path, data, strategy, reference):
    """The whole driver is killed (SIGKILL) mid-run; running the same command again continues from the last
    checkpoint instead of starting over (DeepSpeed restores through its own `load_checkpoint`), and ends where the
    uninterrupted DDP run ended: for DeepSpeed ZeRO-2 (grad_accum 2) that is also its step-by-step match with DDP."""
    import subprocess
    import sys

    uri, run_id = mlflow_run(tmp_path)
    script = tmp_path / "train.py"
    script.write_text(RUN_TRAINING)
    root = Path(__file__).resolve().parents[1]
    args = [sys.executable, str(script), str(data / "records"), str(data / "student-init"), str(tmp_path / "out"),
            uri, run_id, strategy, json.dumps(SAME_RUN)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    staged_before = set(Path(tempfile.gettempdir()).glob("sad-ray-ckpt-*"))
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and max([s for s, _ in loss_history(uri, run_id)], default=0) < 5:
            time.sleep(0.2)
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
        proc.wait()
    killed_at = max(s for s, _ in loss_history(uri, run_id))
    assert 5 <= killed_at < 12
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "STEPS 12" in done.stdout
    resumed = loss_history(uri, run_id, "train/resumed_from_step")
    assert resumed and 3 <= resumed[0][1] <= killed_at
    logged = [s for s, _ in loss_history(uri, run_id)]
    assert sorted(set(logged)) == list(range(1, 13))
    if strategy == "deepspeed":
        assert list((tmp_path / "out" / "ray_train").glob("crash-*/checkpoint_*/deepspeed")), "no DeepSpeed checkpoint"
    student = Path(next(line for line in done.stdout.splitlines() if line.startswith("STUDENT "))[len("STUDENT "):])
    # DDP resumes bit for bit. DeepSpeed's flattened ZeRO buffers sum in another order: step 1 agrees to 2e-5 and the
    # runs drift apart slowly under autocast (measured, bf16 on a Xeon with AMX: loss within 0.3% and gradient norms
    # within 4% by step 12, weights within 3.4e-3).
    tol = {"ddp": (1e-4, 1e-4, 1e-5), "deepspeed": (1e-2, 0.1, 2e-2)}[strategy]
    assert_same_as_reference(reference, uri, run_id, student, *tol)
    # If the kill caught a rank staging a checkpoint, the resumed run reused and removed that folder: no new one.
    assert set(Path(tempfile.gettempdir()).glob("sad-ray-ckpt-*")) <= staged_before


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path, data, reference):
    """The run's storage is a small filesystem (a tmpfs with room for one and a half checkpoints): the second
    checkpoint's copy fails with ENOSPC and the run stops with the OS error. The first checkpoint is intact and is
    the only one Ray Train registered; once there is room, the same run removes the half-written folder, resumes
    from the first checkpoint and ends as the uninterrupted run did."""
    import subprocess

    import torch

    from sad_ray.train.ray_train import CHECKPOINT_SNAPSHOT

    # (checkpoint_* matches Ray Train's checkpoint_manager_snapshot.json too: a size of 0 would make tmpfs unbounded)
    kept = [d for d in (reference["student"].parent / "ray_train").glob("reference-*/checkpoint_*") if d.is_dir()]
    size = min(sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) for d in kept)  # a step's, not the last
    assert size > 0, kept
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"a small filesystem could not be mounted here (needs root): {mount.stderr.strip()}")
    try:
        uri, run_id = mlflow_run(tmp_path)

        def train():
            return train_on_records(data / "records", data / "student-init", mnt / "out",
                                    TrainConfig(**SAME_RUN, max_failures=0), LossConfig(), CurriculumConfig(ramp=0.5),
                                    run_name="full", tracking_uri=uri, mlflow_run_id=run_id)

        with pytest.raises(Exception) as failed:  # noqa: PT011 - Ray wraps the worker's OSError
            train()
        assert "No space left on device" in str(failed.value), str(failed.value)[-2000:]
        (run_dir,) = mnt.glob("out/ray_train/full-*")
        snapshot = json.loads((run_dir / CHECKPOINT_SNAPSHOT).read_text())
        (good,) = [run_dir / r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]]
        assert json.loads((good / "progress.json").read_text())["step"] == 3
        torch.load(good / "state.pt", weights_only=False, map_location="cpu")  # reads back whole
        def folders() -> set[Path]:
            return {d for d in run_dir.glob("checkpoint_*") if d.is_dir()}

        partial = folders() - {good}
        assert partial, "the second checkpoint left nothing behind: was the disk full?"

        resize = subprocess.run(["mount", "-o", f"remount,size={size * 4}", str(mnt)], capture_output=True, text=True)
        assert resize.returncode == 0, resize.stderr
        result = train()
        assert result.steps == 12
        assert not partial & folders(), "the half-written checkpoint was left behind"
        assert [int(v) for _, v in loss_history(uri, run_id, "train/resumed_from_step")] == [3]
        assert_same_as_reference(reference, uri, run_id, Path(result.student_dir), rtol=1e-4, grad_rtol=1e-4,
                                 atol=1e-5)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_only_checkpoints_ray_train_registered_survive_a_rerun(tmp_path, caplog):
    """The clean-up a rerun does before Ray Train starts: folders its snapshot does not name go, named ones stay;
    a snapshot it cannot read (another Ray's format) or none at all removes nothing."""
    import logging

    from sad_ray.train.ray_train import CHECKPOINT_SNAPSHOT, drop_unregistered_checkpoints

    run = tmp_path / "run-abc"
    for name in ("checkpoint_1", "checkpoint_2", "checkpoint_3"):
        (run / name).mkdir(parents=True)
        (run / name / "state.pt").write_bytes(b"x")
    assert drop_unregistered_checkpoints(run) == []  # no snapshot: nothing is known, nothing removed
    (run / CHECKPOINT_SNAPSHOT).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="sad_ray"):
        assert drop_unregistered_checkpoints(run) == []
    assert "no checkpoint folder removed" in caplog.text
    (run / CHECKPOINT_SNAPSHOT).write_text(json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": "checkpoint_1"}, {"checkpoint_dir_name": "checkpoint_2"}]}))
    assert drop_unregistered_checkpoints(run) == [str(run / "checkpoint_3")]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_1", "checkpoint_2", CHECKPOINT_SNAPSHOT]


def test_a_checkpoint_is_restored_only_onto_the_records_its_curriculum_was_built_on(tmp_path):
    """The guard the old restore defeated (it compared the sampler's order with itself): a worker whose shard holds
    other records, or the same records in another curriculum order, is refused, naming the checkpoint."""
    import torch

    from sad_ray.method.curriculum import CurriculumSampler
    from sad_ray.train.ray_train import _restore, _save, _Worker

    def worker(ids, complexity):
        module = torch.nn.Linear(2, 2)
        opt = torch.optim.AdamW(module.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        sampler = CurriculumSampler(np.asarray(complexity, dtype=float), CurriculumConfig(c0=1.0, ramp=0.0), 2, 10)
        return _Worker(records=[], ids=ids, sampler=sampler, tokenizer=None, pad_id=0, module=module, model=module,
                       optimizer=opt, scheduler=sched, scaler=None, engine=None, precision="fp32",
                       device=torch.device("cpu"), load_seconds=0.0)

    saved = worker(["a", "b", "c", "d"], [0.1, 0.2, 0.3, 0.4])
    saved.sampler.next_batch()
    saved.sampler.update(np.array([0, 1]), np.array([1.0, 2.0]))
    _save(tmp_path, 1, saved, 0, {"loss": 1.0})

    same = worker(["a", "b", "c", "d"], [0.1, 0.2, 0.3, 0.4])
    assert _restore(tmp_path, same, 0) == 1
    assert same.sampler.step == 1
    np.testing.assert_array_equal(same.sampler.running_loss, saved.sampler.running_loss)
    with pytest.raises(TrainSetupError, match=rf"checkpoint {tmp_path} was made on other data"):
        _restore(tmp_path, worker(["a", "b", "c", "e"], [0.1, 0.2, 0.3, 0.4]), 0)
    with pytest.raises(ValueError, match="built on different data"):  # same records, scored in another order
        _restore(tmp_path, worker(["a", "b", "c", "d"], [0.4, 0.3, 0.2, 0.1]), 0)
    with pytest.raises(TrainSetupError, match="no state for worker 1"):
        _restore(tmp_path, same, 1)

