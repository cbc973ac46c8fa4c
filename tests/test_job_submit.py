"""`ray job submit -- python jobs/distill.py` against a running cluster: a local `ray start --head` started by the test
and stopped after it. The job uploads the working directory, trains a student on Ray Train on that cluster,
evaluates teacher and student through a Serve app there, and writes into MLflow; the test reads what it left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve.local import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster():
    """A one-node cluster as `ray start --head` makes it; the CLI's environment to reach it, its GCS address in
    HEAD_ADDRESS."""
    import ray

    # `ray stop` ends every Ray process on the machine: nothing of this session's may be running then.
    ray.shutdown()
    dashboard = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           # `ray start --head` turns token authentication on; the CLI must then use it (STACK.md).
           "RAY_AUTH_MODE": "token", "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    env["HEAD_ADDRESS"] = f"127.0.0.1:{port}"
    start = subprocess.run(
        [BIN / "ray", "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield env
    finally:
        subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_distill_runs_under_ray_job_submit(cluster, tmp_path, starter_dir):
    out, db = tmp_path / "out", tmp_path / "mlflow.db"
    # The starter teaches: the default's bootstrapped teacher would take this test 20 minutes to build.
    overrides = [f"paths.output_dir={out}", f"tracking.tracking_uri=sqlite:///{db}", "models.teacher=starter",
                 "data.episodes_per_env=1",
                 "data.envs=[alfworld]", "train.steps=2", "train.batch_size=1", "train.grad_accum=1", "train.checkpoint_every=2",
                 "eval.tasks=[1,0,0]", "eval.max_steps=2", "eval.forced_steps_per_episode=1",
                 "eval.max_new_tokens=24", "eval.engine=hf"]  # vLLM behind Serve: test_serve.py's app
    submit = subprocess.run(
        [BIN / "ray", "job", "submit", "--working-dir", str(REPO), "--", "python", "jobs/distill.py",
         "--config", "configs/default.yaml", *overrides],
        env=cluster, capture_output=True, text=True, timeout=1200)
    log = submit.stdout + submit.stderr
    assert submit.returncode == 0, log[-6000:]
    assert "succeeded" in log, log[-3000:]
    # The job's own summary, printed on the cluster and streamed back.
    assert "Evaluation through the Serve app" in log and "| teacher | 135M |" in log, log[-3000:]
    # A console a person can follow: the train worker's progress relayed to the driver, and none of Ray's actor
    # chatter (train controller, Ray Data, replicas), deprecation warnings or weight-loading bars; those stay in
    # Ray's log folder.
    assert "(train worker 0) train sad-seed0-" in log and "step 2/2" in log, log[-3000:]
    for noise in ("(TrainController", "(RayTrainWorker", "(SplitCoordinator", "(ServeReplica", "DeprecationWarning",
                  "Loading weights", "Requesting resources", "Creating initial MLflow database tables"):
        assert noise not in log, f"{noise!r} on the console:\n{log[-6000:]}"
    (teacher,) = out.glob("teacher-*")
    assert (teacher / "students" / "sad-seed0" / "sad_ray_train.json").is_file()
    episodes = [json.loads(line) for line in (teacher / "eval" / "episodes.jsonl").read_text().splitlines()]
    assert {e["agent"] for e in episodes} == {"teacher", "student-sad-seed0"}

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    stages = {r.data.tags.get("sad_ray.stage") for r in runs}
    assert {"train", "evaluate"} <= stages, stages


def test_a_job_without_ray_address_starts_its_own_cluster_beside_a_running_one(cluster):
    """Plain `ray.init()` joins the cluster `ray start` last started on the machine: a leftover of another checkout
    or test run, running other code. Our jobs join only the cluster RAY_ADDRESS names (`auto`: that one)."""
    probe = ("from sad_ray.console import init_ray; init_ray(); import ray; "
             "print('GCS', ray.get_runtime_context().gcs_address)")
    port = cluster["HEAD_ADDRESS"].rsplit(":", 1)[1]

    def gcs_port(**env) -> str:
        done = subprocess.run([sys.executable, "-c", probe], env={**cluster, **env}, cwd=REPO, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.split("GCS ", 1)[1].split()[0].rsplit(":", 1)[1]

    assert gcs_port() != port
    assert gcs_port(RAY_ADDRESS="auto") == port
