"""The experiment runner (jobs/experiment.py): arms trained from one teacher, records and student-init, evaluated
through a real Serve app, stored, resumed, and the report regenerated from the stored results alone."""

from __future__ import annotations

import json
import shutil

import pytest

from sad_ray.config import ConfigError, load_config
from sad_ray.envs.base import Episode
from sad_ray.eval.evaluate import AgentRun
from tests.conftest import cache_dir

# Two arms keep the test to one training run and two Serve apps; a third would add both and show nothing new.
ARMS = "experiment.arms=[{name: sad, set: [loss.objective=sad]}, {name: untrained, train: false}]"


def small_config(tmp_path, *extra):
    return load_config(None, [
        f"paths.cache_dir={cache_dir()}", f"paths.output_dir={tmp_path / 'out'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=test-experiment",
        "models.teacher=starter", "data.source=demos", "data.envs=[webshop, hotpotqa]", "data.episodes_per_env=2",
        "data.max_tokens=1600", "models.student_layers=2", "records.top_k=8", "train.steps=2", "train.batch_size=1",
        "train.grad_accum=1", "train.checkpoint_every=2",
        "eval.envs=[webshop, hotpotqa]", "eval.tasks=[1, 1]", "eval.max_steps=2", "eval.max_new_tokens=24",
        "eval.forced_steps_per_episode=1", "eval.engine=hf", "eval.in_flight=2",
        "experiment.name=smoke", "experiment.baseline=untrained", ARMS,
        f"experiment.results_dir={tmp_path / 'results'}", f"experiment.report={tmp_path / 'docs' / 'RESULTS.md'}",
        *extra,
    ])


def test_a_grid_that_cannot_run_is_refused_before_any_work(tmp_path):
    from sad_ray.experiment import run_experiment

    with pytest.raises(ConfigError, match="arm names must be distinct"):
        load_config(None, ["experiment.arms=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match="baseline 'kd' is not an arm"):
        load_config(None, ["experiment.arms=[{name: a}]", "experiment.baseline=kd"])
    with pytest.raises(ConfigError, match="arm name must be"):
        load_config(None, ["experiment.arms=[{name: 'a b'}]"])
    bad = small_config(tmp_path, "experiment.arms=[{name: typo, set: [loss.objectiv=sad]}]", "experiment.baseline=")
    with pytest.raises(ConfigError, match=r"experiment.arms\[typo\].set: unknown key loss.objectiv"):
        run_experiment(bad, serve_models=None)
    with pytest.raises(ConfigError, match="--arms: no arm 'sadd'"):
        run_experiment(small_config(tmp_path), serve_models=None, only=["sadd"])
    assert not (tmp_path / "out").exists()  # nothing was started


def _episode(task: str, env: str, won: bool) -> Episode:
    return Episode(id=task, env=env, task_type="t", split="test", turns=[{"role": "assistant", "content": "x"}],
                   success=won, steps=1)


def test_an_arms_seeds_pool_into_one_run_that_pairs_by_seed_and_task():
    from sad_ray.eval.metrics import paired_difference
    from sad_ray.experiment import ArmRuns, pooled

    def arm(name, wins):
        return ArmRuns(name, {seed: AgentRun(f"{name}-seed{seed}", 10, [_episode(f"t{i}", "webshop", w)
                                                                        for i, w in enumerate(ws)])
                              for seed, ws in wins.items()})

    a = pooled(arm("sad", {0: [1, 1, 0], 1: [1, 0, 0]}))
    b = pooled(arm("token_kd", {0: [1, 0, 0], 1: [1, 0, 0]}))
    assert [e.id for e in a.episodes] == ["s0/t0", "s0/t1", "s0/t2", "s1/t0", "s1/t1", "s1/t2"]
    assert [e.id for e in a.episodes] == [e.id for e in b.episodes]  # the same (seed, task) pairs
    diff = paired_difference([e.success for e in a.episodes], [e.success for e in b.episodes])
    assert diff.value == pytest.approx(1 / 6)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    from sad_ray.experiment import run_experiment
    from serve.local import serve_models_for

    tmp = tmp_path_factory.mktemp("experiment")
    cfg = small_config(tmp)
    first = run_experiment(cfg, serve_models_for(cfg), only=["sad"])  # a first chunk
    trained = {p: p.stat().st_mtime_ns for p in (tmp / "out").glob("teacher-*/students/smoke/*/sad_ray_train.json")}
    rest = run_experiment(cfg, serve_models_for(cfg))  # the rest, reusing the first chunk
    return tmp, cfg, first, rest, trained


def test_arms_run_in_chunks_and_a_rerun_only_adds_what_is_missing(grid):
    tmp, cfg, first, rest, trained = grid
    assert first["ran"] == ["sad-seed0"]
    assert rest["ran"] == ["sad-seed0", "untrained-seed0"]
    (teacher,) = (tmp / "out").glob("teacher-*")
    # Each trained arm is its own student, kept beside the others under the experiment's name.
    assert sorted(p.name for p in (teacher / "students" / "smoke").iterdir()) == ["sad-seed0"]
    manifest = json.loads((tmp / "results" / "manifest.json").read_text())
    assert sorted(manifest["runs"]) == ["sad-seed0", "untrained-seed0"]
    sad = manifest["runs"]["sad-seed0"]
    assert sad["config"]["loss"]["objective"] == "sad"
    assert sad["train"]["steps"] == 2 and sad["train"]["mlflow_run_id"] and sad["host"]["cpu_model"]
    assert manifest["runs"]["untrained-seed0"]["train"] == {}
    # The second call trained nothing again and played no agent again: the stored keys and results stand.
    keys = {p.parent.name: p.read_text() for p in (tmp / "results" / "agents").glob("*/key")}
    assert sorted(keys) == ["sad-seed0", "teacher", "untrained-seed0"]
    import mlflow

    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.run_name for r in runs if r.data.tags.get("sad_ray.stage") == "train"} == {"train-smoke/sad-seed0"}
    assert len(trained) == 1 and all(p.stat().st_mtime_ns == t for p, t in trained.items())  # sad not retrained
    evaluations = [r for r in runs if r.data.tags.get("sad_ray.stage") == "evaluate"]
    assert len(evaluations) == 3  # 1 + 2 calls, of which 2 played (sad's second found its stored results)


def test_the_report_is_regenerated_from_the_stored_results_alone(grid):
    from sad_ray.experiment import report_only

    tmp, cfg, *_ = grid
    report = tmp / "docs" / "RESULTS.md"
    text = report.read_text()
    assert "### Headline: each arm minus untrained, task by task" in text  # a section of its own
    for env in ("webshop", "hotpotqa", "all"):  # sad paired with the baseline's play of the same tasks
        assert f"| sad | {env} | 1 |" in text if env != "all" else "| sad | all | 2 |" in text
    assert "| teacher | all | all |" in text and "| sad | all | all |" in text
    assert "Per-seed success" in text and "### Compute" in text and "### MLflow" in text
    assert (tmp / "docs" / "RESULTS-plots" / "smoke" / "success_vs_latency.png").is_file()
    # Everything the job wrote besides the stored results gone: the report comes back the same.
    shutil.rmtree(tmp / "out")
    report.unlink()
    report_only(cfg)
    assert report.read_text() == text
    # Another experiment's section in the same file is kept when this one is regenerated.
    other = "<!-- experiment other: regenerated, do not edit -->\n## Other\n<!-- /experiment other -->\n"
    report.write_text(text + "\n" + other)
    report_only(cfg)
    assert report.read_text() == text + "\n" + other
