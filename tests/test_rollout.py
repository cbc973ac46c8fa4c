"""Rollouts on Ray Data with real engines in real environments, streamed into validated record shards."""

from __future__ import annotations

import pytest

from sad_ray.models.identity import teacher_id
from sad_ray.records import dropped_episodes, read_records
from sad_ray.rollout.engines import EngineConfig
from sad_ray.rollout.pipeline import RecordRecipe, RolloutConfig, run_rollouts


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():  # an earlier test (a training run) started Ray in this process
        ray.shutdown()
    ray.init("local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def small(kind: str, **kw) -> RolloutConfig:
    return RolloutConfig(**{
        "envs": ("hotpotqa", "webshop"), "tasks_per_env": 2, "keep": "all", "max_steps": 2, "max_new_tokens": 16,
        "tasks_per_batch": 4, "max_in_flight": 4, "engine": EngineConfig(kind=kind, max_model_len=4096), **kw,
    })


# vLLM playing and scoring with one engine is the rollout job's case (below, rollout.score_engine=same).
@pytest.mark.parametrize("kind,scorer", [("hf", "same"), ("vllm", "hf")])
def test_rollouts_write_validated_shards_and_resume(ray_local, starter_dir, tmp_path, kind, scorer):
    out = tmp_path / "records"
    report = run_rollouts(starter_dir, out, small(kind, score_engine=scorer), RecordRecipe(top_k=5, max_tokens=4096),
                          records_per_shard=3)
    assert report.episodes == 4
    assert report.written + sum(report.dropped.values()) == 4
    records = read_records(out)
    assert len(records) == report.written >= 1
    assert len(report.shards) == -(-report.written // 3)
    for r in records:
        assert r.env in ("hotpotqa", "webshop") and 1 <= r.steps <= 2 and r.top_k == 5
        assert r.teacher_model == teacher_id(starter_dir)  # the folder name and its weights' fingerprint
    again = run_rollouts(starter_dir, out, small(kind, score_engine=scorer), RecordRecipe(top_k=5, max_tokens=4096))
    assert again.skipped_existing == report.written and again.written + sum(again.dropped.values()) == 4 - report.written


def test_only_successful_episodes_are_kept_by_default(ray_local, starter_dir, tmp_path):
    # The untrained starter does not solve WebShop in one step: every episode is dropped and counted.
    report = run_rollouts(starter_dir, tmp_path / "r", small("hf", envs=("webshop",), max_steps=1, keep="success"),
                          RecordRecipe(top_k=5, max_tokens=4096))
    assert report.written == 0 and report.dropped == {"failed_episode": 2}
    assert not list((tmp_path / "r").glob("part-*.parquet"))
    # The failures are in the folder's ledger, so a rerun does not play them again (greedy play would fail them
    # the same way) ...
    assert set(dropped_episodes(tmp_path / "r").values()) == {"failed_episode"}
    again = run_rollouts(starter_dir, tmp_path / "r", small("hf", envs=("webshop",), max_steps=1, keep="success"),
                         RecordRecipe(top_k=5, max_tokens=4096))
    assert again.episodes == 0 and again.skipped_existing == again.skipped_dropped == 2
    assert "rollout/success_rate" not in again.metrics()  # nothing played: no rate, rather than a rate of 0
    # ... unless the settings now keep failed episodes: then they are played and written.
    kept = run_rollouts(starter_dir, tmp_path / "r", small("hf", envs=("webshop",), max_steps=1, keep="all"),
                        RecordRecipe(top_k=5, max_tokens=4096))
    assert kept.episodes == 2 and kept.written == 2 and kept.skipped_existing == 0


def test_the_rollout_job_plays_all_three_environments_with_vllm(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import mlflow

    from tests.conftest import cache_dir

    root = Path(__file__).resolve().parents[1]
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, str(root / "jobs" / "rollout.py"), "--config", str(root / "configs" / "default.yaml"),
            f"paths.cache_dir={cache_dir()}", f"paths.output_dir={tmp_path / 'out'}", f"tracking.tracking_uri={db}",
            "rollout.tasks_per_env=1", "rollout.keep=all", "rollout.max_steps=2", "rollout.max_new_tokens=16",
            "rollout.engine.kind=vllm", "rollout.score_engine=same", "rollout.cpus_per_actor=1", "records.top_k=5", "data.max_tokens=4096",
            "models.teacher=starter"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # Into the teacher's folder, where the distill and train jobs look for its records.
    (records_dir,) = (tmp_path / "out").glob("teacher-smollm2-135m-instruct-*/records")
    records = read_records(records_dir)
    assert {r.env for r in records} == {"alfworld", "webshop", "hotpotqa"}
    mlflow.set_tracking_uri(db)
    (run,) = mlflow.search_runs(experiment_names=["sad-ray"], filter_string="tags.`sad_ray.stage` = 'rollout'",
                                output_format="list")
    assert run.data.metrics["rollout/episodes"] == 3
    assert run.data.metrics["rollout/records_written"] == 3
    assert run.data.metrics["rollout/generated_tokens_per_second"] > 0
    assert run.data.params["rollout.engine.kind"] == "vllm"
    bad = subprocess.run(args[:4] + ["rollout.engine.kind=onnx"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "rollout.engine.kind must be one of" in bad.stderr


def test_a_student_plays_and_the_teacher_scores_its_own_turns(ray_local, starter_dir, tmp_path):
    """On-policy rollouts: the episodes are the player's (a one-layer student of the starter), the top-k at its
    tokens are the teacher's (not the player's), and the records name the teacher."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from sad_ray.method.losses import predicting_rows
    from sad_ray.models.student import build_student

    student = build_student(starter_dir, tmp_path / "student", 6).path
    cfg, recipe = small("hf", envs=("hotpotqa",)), RecordRecipe(top_k=5, max_tokens=4096)
    run_rollouts(starter_dir, tmp_path / "on-policy", cfg, recipe, player_dir=student, precision="fp32")
    run_rollouts(starter_dir, tmp_path / "teacher", cfg, recipe, precision="fp32")
    played, taught = read_records(tmp_path / "on-policy"), read_records(tmp_path / "teacher")
    assert played and {r.teacher_model for r in played} == {teacher_id(starter_dir)}

    def replies(records):
        return {r.id: [t["content"] for t in r.turns if t["role"] == "assistant"] for r in records}

    assert replies(played) != replies(taught)  # the student's turns, not the teacher's

    def top_logprobs(model_dir, record):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ids = torch.as_tensor(record.input_ids, dtype=torch.long)[None]
        rows = predicting_rows(torch.as_tensor(record.reason_mask)[None], torch.as_tensor(record.act_mask)[None])
        with torch.no_grad():
            return torch.log_softmax(model(ids).logits[rows], dim=-1).topk(5, dim=-1).values.numpy()

    record = played[0]
    teacher_gap = np.abs(top_logprobs(starter_dir, record) - record.topk_logprobs).max()
    student_gap = np.abs(top_logprobs(student, record) - record.topk_logprobs).max()
    assert teacher_gap < 1e-2 < 1.0 < student_gap  # the teacher's distribution at the student's tokens


def test_a_player_with_another_tokenizer_is_refused(starter_dir, tmp_path):
    import shutil

    from sad_ray.rollout.pipeline import RolloutActor

    other = tmp_path / "other"
    shutil.copytree(starter_dir, other)
    vocab = other / "tokenizer.json"
    vocab.write_text(vocab.read_text().replace('"<|im_start|>"', '"<|im_begin|>"'))
    with pytest.raises(ValueError, match="different tokenizers"):
        RolloutActor(str(starter_dir), small("hf"), RecordRecipe(), {}, "fp32", player_dir=str(other))
