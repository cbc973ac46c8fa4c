"""The job on several Ray nodes, simulated on one machine with Ray's own multi-node test cluster
(`ray.cluster_utils.Cluster`: a head and worker nodes, each a real raylet with its own resources), logging through
a real `mlflow server` on loopback the way a cluster must (a sqlite file on one node is out of the others' reach),
with records, models and checkpoints on a real S3-compatible server on loopback, reached only by URI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from serve.local import free_port

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head (1 CPU) and two worker nodes (2 CPUs each, marked by a resource of their own, and room for two
    actors or workers each: a packed group would fit on one). Started after the S3 server: the nodes inherit its
    endpoint and credentials, as a real cluster's nodes have their own."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this session's local cluster, if an earlier module started one
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1}})
    nodes = {"head": c.head_node}
    for name in ("node_a", "node_b"):
        nodes[name] = c.add_node(num_cpus=2, resources={name: 1, "slot": 2})
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield {name: node.node_id for name, node in nodes.items()}
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on loopback with the lean settings of STACK.md; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [BIN / "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'store.db'}", "--artifacts-destination", str(root / "artifacts")],
        env=env, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("mlflow server did not come up:\n" + (root / "server.log").read_text()[-3000:])
        time.sleep(0.5)
    try:
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def actor_nodes(class_name: str) -> list[str]:
    """The node of every actor of a class this cluster ran (alive or finished), from Ray's state API."""
    from ray.util.state import list_actors

    return [a.node_id for a in list_actors(detail=True, limit=10000) if class_name in a.class_name]


def test_train_workers_spread_over_nodes_and_rank0_logs_through_the_mlflow_server(
        cluster, mlflow_server, s3_server, tmp_path, starter_dir, starter_tokenizer):
    """Two workers on two nodes train on records and a start model that live only on S3: they read the records
    through Ray Data, stage the model on their node, and Ray Train keeps the checkpoints there; the student is
    written back under the same run root."""
    import mlflow

    from sad_ray import storage
    from sad_ray.envs.seed import seed_episodes
    from sad_ray.method.curriculum import CurriculumConfig
    from sad_ray.method.losses import LossConfig
    from sad_ray.models.student import build_student
    from sad_ray.models.tokenizers import tokenizer_fingerprint
    from sad_ray.records import write_shard
    from sad_ray.rollout.engines import DemonstrationTeacher
    from sad_ray.rollout.score import score_episodes
    from sad_ray.train.ray_train import TrainConfig, train_on_records

    records = list(score_episodes(seed_episodes(8), starter_tokenizer, DemonstrationTeacher(), fmt="react", top_k=1,
                                  fingerprint=tokenizer_fingerprint(starter_tokenizer)))
    root = f"{s3_server}/multinode-train"
    write_shard(records, f"{root}/records/part-00000.parquet")
    build_student(starter_dir, tmp_path / "student-init", 1)
    storage.upload_dir(tmp_path / "student-init", f"{root}/student-init")
    client = mlflow.MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment("multinode")).info.run_id

    settings = TrainConfig(steps=2, batch_size=1, grad_accum=1, num_workers=2, threads=1, checkpoint_every=2,
                           cpus_per_worker=0.5, resources_per_worker={"slot": 1}, placement_strategy="SPREAD")
    def train():
        return train_on_records(f"{root}/records", f"{root}/student-init", f"{root}/out", settings,
                                LossConfig(objective="sft"), CurriculumConfig(c0=1.0, ramp=0.0), run_name="spread",
                                tracking_uri=mlflow_server, mlflow_run_id=run_id)

    result = train()
    assert result.steps == 2 and result.student_dir == f"{root}/out/student"
    assert {storage.name(p) for p in storage.list_files(result.student_dir)} >= {
        "config.json", "model.safetensors", "tokenizer.json", "sad_ray_train.json"}
    assert storage.is_dir(f"{root}/out/ray_train") and not (tmp_path / "out").exists()
    assert train() == result  # a rerun finds the finished student through the URI
    # Two workers on the two worker nodes, one each (packed, both would have fit on one).
    nodes = actor_nodes("RayTrainWorker")
    assert sorted(nodes) == sorted([cluster["node_a"], cluster["node_b"]]), nodes
    # Rank 0 logged every step through the server (the workers were never given a store file).
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]


def test_rollout_actors_spread_over_nodes(cluster, s3_server, tmp_path, starter_dir):
    """Two rollout actors on two nodes, each staging the teacher from S3 on its node; the records go to S3."""
    from sad_ray import storage
    from sad_ray.records import read_records
    from sad_ray.rollout.engines import EngineConfig
    from sad_ray.rollout.pipeline import RecordRecipe, RolloutConfig, run_rollouts

    cfg = RolloutConfig(envs=("hotpotqa",), tasks_per_env=4, keep="all", max_steps=1, max_new_tokens=8,
                        tasks_per_batch=1, actors=2, cpus_per_actor=1.0, resources_per_actor={"slot": 1},
                        engine=EngineConfig(kind="hf", max_model_len=4096))
    root = f"{s3_server}/multinode-rollout"
    storage.upload_dir(starter_dir, f"{root}/{starter_dir.name}")
    report = run_rollouts(f"{root}/{starter_dir.name}", f"{root}/records", cfg, RecordRecipe(top_k=2, max_tokens=4096))
    assert report.episodes == 4 and len(read_records(f"{root}/records")) == report.written
    assert all(p.startswith(f"{root}/records/part-") for p in report.shards)
    nodes = actor_nodes("MapWorker")
    assert sorted(nodes) == sorted([cluster["node_a"], cluster["node_b"]]), nodes


def test_the_distill_job_keeps_its_whole_run_root_on_s3_and_a_rerun_reuses_it(
        cluster, mlflow_server, s3_server, tmp_path, monkeypatch):
    """`paths.output_dir` as a URI: the job's student-init, records, checkpoints, student, samples and run marker
    are all written through it (nothing under the driver's working folder), the student is registered through the
    MLflow server, and a rerun finds every finished stage there."""
    import mlflow

    from sad_ray import storage
    from sad_ray.stages import run_distill
    from serve.local import serve_models_for
    from tests.test_pipeline import small_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAD_RAY_STAGING_DIR", str(tmp_path / "staged"))
    root = f"{s3_server}/multinode-job"
    cfg = small_config(tmp_path, f"paths.output_dir={root}", f"tracking.tracking_uri={mlflow_server}",
                       "tracking.experiment=multinode-job", "train.steps=2", "train.checkpoint_every=2",
                       # Teacher and student served on the worker nodes (the head has no slot), one episode each.
                       "eval.tasks=[0,0,1]", "eval.max_steps=2", "eval.max_new_tokens=16", "eval.engine=hf",
                       "eval.forced_episodes=0", "eval.resources={slot: 1}", "eval.num_cpus=0.5")
    first = run_distill(cfg, serve_models_for(cfg))
    (teacher,) = storage.list_dirs(root)
    assert isinstance(teacher, str) and storage.name(teacher).startswith("teacher-smollm2")
    assert first["student"] == f"{teacher}/students/sad-seed0" and first["records"] == f"{teacher}/records"
    assert {storage.name(p) for p in storage.list_dirs(teacher)} == {
        "records", "student-init", "students", "ray_train", "eval"}
    # The evaluation staged both agents from S3 on the worker nodes it served them on, and left its results there.
    assert {storage.name(p) for p in storage.list_files(f"{teacher}/eval")} >= {"episodes.jsonl", "summary.md"}
    episodes = [json.loads(line) for line in storage.read_bytes(f"{teacher}/eval/episodes.jsonl").splitlines()]
    assert sorted(e["agent"] for e in episodes) == ["student-sad-seed0", "teacher"]
    from ray.util.state import list_actors

    actors = list_actors(detail=True, limit=10000)
    models = {a.class_name.rsplit(":", 1)[1]: a.node_id for a in actors if ":model" in a.class_name}
    assert sorted(models) == ["model0-teacher", "model1-student-sad-seed0"], models
    assert set(models.values()) <= {cluster["node_a"], cluster["node_b"]}, (models, cluster)
    # One HTTP proxy, on the head where the driver is (Serve's default would bind one per replica node, every one
    # on the same address here).
    assert [a.node_id for a in actors if "ProxyActor" in a.class_name] == [cluster["head"]]
    assert {storage.name(p) for p in storage.list_files(teacher)} == {"teacher.json", "records_sample.jsonl"}
    assert {storage.name(p) for p in storage.list_files(first["student"])} >= {
        "model.safetensors", "sad_ray_train.json", "sad_ray_registered.json"}
    assert storage.list_files(root, "mlflow_run_id.distill.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["staged"]  # the driver kept only its staged copies
    client = mlflow.MlflowClient(mlflow_server)
    (version,) = client.search_model_versions(f"name='{cfg.tracking.register_student_as}'")
    assert first["train"]["registered"]["version"] == version.version

    again = run_distill(cfg, serve_models_for(cfg))
    assert again["records_written_now"] == 0 and again["mlflow_run_id"] == first["mlflow_run_id"]
    assert again["eval"] == first["eval"]  # read back from S3, not played again
    assert again["train"]["registered"] == first["train"]["registered"]  # not trained or registered again
    assert len(client.search_model_versions(f"name='{cfg.tracking.register_student_as}'")) == 1
