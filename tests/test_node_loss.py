"""A worker node lost mid-stage, on Ray's own multi-node test cluster (`ray.cluster_utils.Cluster`, real raylets).

Each test starts its stage on a "victim" node (the only one with the `slot` resource the stage's actors or workers
ask for), waits until the stage has made durable progress (a shard or a checkpoint on disk), removes the victim
(its raylet and every process on it are killed), adds a rescue node as an autoscaler would, and checks what the
stage made of it:

- rollouts: Ray Data restarts the lost actor on the rescue node and replays the batch it held (its actors restart
  without limit and their tasks retry); the driver alone writes shards, whole records only, so every task ends
  with exactly one outcome: its records or its ledger line, never twice, never half.
- training: Ray Train restarts the worker group on the rescue node from the last checkpoint; the run ends with
  every optimiser step done once past that checkpoint, and its final loss matches an uninterrupted run's.
"""

from __future__ import annotations

import threading
import time

import pytest

pytestmark = pytest.mark.slow

SLOT = {"slot": 1}


@pytest.fixture
def cluster():
    """A head that holds no stage (1 CPU, no `slot`) and a victim node with room for two actors or workers."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this session's local cluster, if an earlier module started one
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    victim = c.add_node(num_cpus=2, resources={"slot": 2})
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c, victim
    finally:
        ray.shutdown()
        c.shutdown()


def run_in_thread(fn) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def wait_for(what: str, check, thread: threading.Thread, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if not thread.is_alive():
            pytest.fail(f"the stage ended before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f} s")
        time.sleep(0.2)


def lose_node(c, victim) -> float:
    """Kill the victim, then add a rescue node with its resources (as an autoscaler would); returns when the
    victim was removed."""
    c.remove_node(victim, allow_graceful=False)
    lost_at = time.monotonic()
    c.add_node(num_cpus=2, resources={"slot": 2})
    c.wait_for_nodes()
    return lost_at


def finish(thread: threading.Thread, box: dict, timeout: float = 600.0):
    thread.join(timeout)
    assert not thread.is_alive(), f"the stage did not finish within {timeout:.0f} s of the node loss"
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_a_node_lost_mid_rollout_replays_its_batch_and_writes_each_episode_once(cluster, tmp_path, starter_dir):
    from sad_ray.records import dropped_episodes, episode_id, read_records, shard_paths
    from sad_ray.rollout.engines import EngineConfig
    from sad_ray.rollout.pipeline import RecordRecipe, RolloutConfig, run_rollouts

    c, victim = cluster
    out = tmp_path / "records"
    cfg = RolloutConfig(envs=("hotpotqa",), tasks_per_env=10, keep="all", max_steps=1, max_new_tokens=8,
                        tasks_per_batch=1, actors=1, cpus_per_actor=1.0, resources_per_actor=SLOT,
                        engine=EngineConfig(kind="hf", max_model_len=4096))
    thread, box = run_in_thread(lambda: run_rollouts(starter_dir, out, cfg, RecordRecipe(top_k=2, max_tokens=4096),
                                                     records_per_shard=1))
    wait_for("first shard", lambda: bool(shard_paths(out)) if out.is_dir() else False, thread)
    before = len(shard_paths(out))
    lost_at = lose_node(c, victim)
    report = finish(thread, box)
    recovered = time.monotonic() - lost_at

    records = read_records(out)  # every shard reads back whole and valid
    ids = [r.id for r in records]
    assert len(ids) == len(set(ids)), "a record was written twice"
    written = {episode_id(i) for i in ids}
    ledgered = set(dropped_episodes(out))
    assert not written & ledgered, "an episode has both records and a ledger line"
    assert len(written | ledgered) == 10, (written, ledgered)
    assert report.episodes == 10 and len(shard_paths(out)) > before
    print(f"rollout: node lost after {before} shard(s); the stage finished {recovered:.1f} s later")


def test_a_node_lost_mid_training_resumes_from_the_last_checkpoint(cluster, tmp_path, starter_dir, starter_tokenizer):
    import mlflow

    from sad_ray.envs.seed import seed_episodes
    from sad_ray.method.curriculum import CurriculumConfig
    from sad_ray.method.losses import LossConfig
    from sad_ray.models.student import build_student
    from sad_ray.models.tokenizers import tokenizer_fingerprint
    from sad_ray.records import write_shard
    from sad_ray.rollout.engines import DemonstrationTeacher
    from sad_ray.rollout.score import score_episodes
    from sad_ray.train.ray_train import TrainConfig, train_on_records

    c, victim = cluster
    records = list(score_episodes(seed_episodes(8), starter_tokenizer, DemonstrationTeacher(), fmt="react", top_k=1,
                                  fingerprint=tokenizer_fingerprint(starter_tokenizer)))
    write_shard(records, tmp_path / "records" / "part-00000.parquet")
    build_student(starter_dir, tmp_path / "student-init", 1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("node-loss")
    steps = 8
    settings = TrainConfig(steps=steps, batch_size=1, grad_accum=2, lr=5e-4, threads=1, checkpoint_every=2,
                           cpus_per_worker=1.0, resources_per_worker=SLOT, max_failures=2)

    def train(name: str):
        run_id = client.create_run(exp).info.run_id
        return run_id, train_on_records(tmp_path / "records", tmp_path / "student-init", tmp_path / name, settings,
                                        LossConfig(objective="sft"), CurriculumConfig(ramp=0.5), run_name=name,
                                        tracking_uri=uri, mlflow_run_id=run_id)

    thread, box = run_in_thread(lambda: train("lost"))
    wait_for("checkpoint", lambda: any((tmp_path / "lost").glob("ray_train/*/checkpoint_*/progress.json")), thread)
    # A checkpoint on disk is registered by Ray Train's controller a moment later (it polls the workers every 0.1 s
    # here); a node lost in between restarts the run from nothing, which is right but not what this test is about.
    time.sleep(1.0)
    lost_at = lose_node(c, victim)
    run_id, result = finish(thread, box)
    recovered = time.monotonic() - lost_at

    def history(run: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in client.get_metric_history(run, key)]

    resumed = history(run_id, "train/resumed_from_step")
    assert resumed, "the run never resumed from a checkpoint"
    resumed_from = int(resumed[0][1])
    assert resumed_from >= 2 and resumed_from % 2 == 0
    logged = [s for s, _ in history(run_id, "loss")]
    assert result.steps == steps and sorted(set(logged)) == list(range(1, steps + 1))
    # Only steps after the checkpoint it resumed from ran twice (the ones the lost worker did before it died).
    repeated = sorted({s for s in logged if logged.count(s) > 1})
    assert all(s > resumed_from for s in repeated), (repeated, resumed_from)

    ref_id, reference = train("reference")  # the same run on the rescue node, uninterrupted
    assert result.loss == pytest.approx(reference.loss, rel=1e-3), (result.loss, reference.loss)
    ref = dict(history(ref_id, "loss"))
    for step, value in history(run_id, "loss"):
        assert value == pytest.approx(ref[step], rel=1e-3), (step, value, ref[step])
    print(f"train: node lost, resumed from step {resumed_from}, {len(repeated)} step(s) recomputed, "
          f"finished {recovered:.1f} s after the loss")
