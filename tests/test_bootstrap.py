"""The bootstrapped teacher, end to end and shrunk: demonstrations -> Ray Train -> vLLM evaluation -> registry."""

from __future__ import annotations

import json
import time

import mlflow
import pytest

from sad_ray.config import load_config, resolve_auto


def tiny(tmp_path, base) -> list[str]:
    return [
        f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'out'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=bootstrap-test",
        f"bootstrap.base={base}", "bootstrap.demos=[4, 2, 2]", "bootstrap.eval_tasks=[2, 1, 1]",
        "bootstrap.eval_max_steps=2", "bootstrap.eval_max_new_tokens=16", "bootstrap.train.steps=2",
        "bootstrap.train.batch_size=2", "bootstrap.train.grad_accum=1", "bootstrap.train.checkpoint_every=2",
        "bootstrap.train.warmup_steps=0",
    ]


@pytest.fixture(scope="module")
def base(tmp_path_factory, starter_dir):
    from sad_ray.models.student import build_student

    return build_student(starter_dir, tmp_path_factory.mktemp("base") / "model", 2).path


def test_bootstrap_trains_evaluates_registers_and_is_reused(tmp_path, base):
    from sad_ray.bootstrap import MANIFEST, run_bootstrap, teacher_home
    from sad_ray.models.starter import resolve_model
    from sad_ray.records import read_records

    cfg = load_config(None, tiny(tmp_path, base))
    # Nothing bootstrapped yet: auto means the starter and scored demonstrations.
    before = resolve_auto(cfg)
    assert (before.models.teacher, before.data.source) == ("starter", "demos")

    summary = run_bootstrap(cfg)
    home = teacher_home(cfg)
    assert summary["teacher"] == str(home) and not summary["reused"]
    assert (home / "config.json").is_file() and (home / "tokenizer.json").is_file()
    manifest = json.loads((home / MANIFEST).read_text())
    assert set(manifest["success_rate"]) == {"alfworld", "webshop", "hotpotqa"}
    assert manifest["eval_episodes"] == 4 and manifest["train"]["steps"] == 2
    # The demonstrations became one-hot records of the training split, windowed like rollouts.
    records = read_records(home.parent / f"{cfg.bootstrap.name}.work" / manifest["settings_hash"] / "records")
    assert {r.split for r in records} == {"train"} and {r.top_k for r in records} == {1}
    assert {r.teacher_model for r in records} == {"expert-demonstrations"}
    # Every evaluation episode is kept whole, to read the failures from.
    played = [json.loads(line) for line in
              (home.parent / f"{cfg.bootstrap.name}.work" / manifest["settings_hash"] / "eval_episodes.jsonl")
              .read_text().splitlines()]
    assert len(played) == 4 and {p["env"] for p in played} == set(manifest["success_rate"])
    assert all(p["turns"][0]["role"] == "system" and isinstance(p["won"], bool) for p in played)

    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    version = client.get_model_version(cfg.bootstrap.register_as, manifest["registered_version"])
    assert version.run_id and version.tags["sad_ray.model_dir"] == str(home)
    stages = {r.data.tags.get("sad_ray.stage") for r in client.search_runs(
        [client.get_experiment_by_name("bootstrap-test").experiment_id])}
    assert {"demonstrations", "train", "eval", "register"} <= stages

    # Same settings: reused at once; the teacher is what `bootstrap` and `auto` now resolve to.
    start = time.perf_counter()
    again = run_bootstrap(cfg)
    assert again["reused"] and time.perf_counter() - start < 10
    assert resolve_model("bootstrap", tmp_path / "cache") == home
    after = resolve_auto(cfg)
    assert (after.models.teacher, after.data.source) == ("bootstrap:react-teacher", "rollouts")

    # The main job with bootstrap.auto builds the preset's teacher first (here it exists: reused) and distills
    # from it.
    from sad_ray.stages import run_distill

    job = load_config(None, tiny(tmp_path, base) + [
        "bootstrap.auto=true", "data.source=demos", "data.envs=[webshop]", "data.episodes_per_env=2",
        "models.student_layers=1", "records.top_k=4", "train.steps=1", "train.batch_size=1"])
    distilled = run_distill(job)
    assert distilled["bootstrap"]["reused"] and distilled["teacher"] == str(home)
    assert distilled["teacher_id"].startswith("react-teacher@") and distilled["train"]["steps"] == 1


def test_a_missing_bootstrapped_teacher_is_a_clear_error(tmp_path):
    from sad_ray.models.starter import resolve_model

    with pytest.raises(FileNotFoundError, match="run `python jobs/bootstrap_teacher.py` first"):
        resolve_model("bootstrap:nope", tmp_path)


def test_bootstrap_counts_must_match_the_environments(tmp_path):
    from sad_ray.config import ConfigError

    with pytest.raises(ConfigError, match="one count per env"):
        load_config(None, ["bootstrap.demos=[1, 2]"])


def test_demonstrations_play_on_ray_tasks_and_come_back_in_task_order(tmp_path, base):
    """Chunks of two tasks, several in flight: the episodes are the ones a sequential expert plays, in order."""
    from sad_ray.bootstrap import env_tasks
    from sad_ray.envs import make_env
    from sad_ray.envs.react import demonstration
    from sad_ray.rollout.demos import play_demonstrations
    from sad_ray.stages import env_kwargs

    cfg = load_config(None, tiny(tmp_path, base))
    tasks = env_tasks(cfg, "train", (5, 2, 2))
    played = list(play_demonstrations(tasks, env_kwargs(cfg), chunk=2))
    assert [e.id for e in played] == [t.id for t in tasks]
    envs = {}
    for task, episode in zip(tasks, played, strict=True):
        env = envs.setdefault(task.env, make_env(task.env, **env_kwargs(cfg).get(task.env, {})))
        assert episode.turns == demonstration(env, task).turns, task.id
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        next(play_demonstrations(tasks, {}, chunk=0))
