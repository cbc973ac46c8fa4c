"""The distill job end to end on the embedded default, shrunk: real teacher, real student, real MLflow store."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from sad_ray.config import load_config
from sad_ray.records import read_records
from sad_ray.stages import load_episodes, run_distill
from tests.conftest import cache_dir


def small_config(tmp_path, *extra):
    return load_config(None, [
        f"paths.cache_dir={cache_dir()}", f"paths.output_dir={tmp_path / 'out'}",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=test",
        "models.teacher=starter", "data.source=demos", "data.envs=[webshop, hotpotqa]", "data.episodes_per_env=2", "data.max_tokens=1600",
        "models.student_layers=2", "records.top_k=8", "records.records_per_shard=2",
        "train.steps=3", "train.batch_size=2", "curriculum.ramp=0.67", *extra,
    ])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    cfg = small_config(tmp)
    return tmp, cfg, run_distill(cfg)


def test_the_job_writes_validated_records_and_a_student(first_run):
    tmp, cfg, summary = first_run
    from sad_ray.models.identity import teacher_id

    # Everything derived from the teacher is in its folder, named by its id; the student by objective and seed.
    tid = teacher_id(summary["teacher"])
    root = tmp / "out" / f"teacher-smollm2-135m-instruct-{tid.split('@')[1][:12]}"
    assert summary["teacher_id"] == tid and tid.startswith("smollm2-135m-instruct@")
    assert (Path(summary["records"]), Path(summary["student_init"]), Path(summary["student"])) == (
        root / "records", root / "student-init", root / "students" / "sad-seed0")
    assert json.loads((root / "student-init" / "sad_ray_student.json").read_text())["teacher_id"] == tid
    records = read_records(summary["records"])
    assert {r.teacher_model for r in records} == {tid}
    from sad_ray.envs import make_env
    from sad_ray.records import episode_id

    expected = {t.id for name in ("webshop", "hotpotqa") for t in make_env(name).tasks("train", 2)}
    # Every episode is in; the long WebShop ones (over rollout.context_chars) as several windows.
    assert {episode_id(r.id) for r in records} == expected and len(expected) == 4
    assert any("#w" in r.id for r in records if r.env == "webshop")
    assert not any("#w" in r.id for r in records if r.env == "hotpotqa")
    assert {r.env for r in records} == {"webshop", "hotpotqa"}
    assert len(list(Path(summary["records"]).glob("part-*.parquet"))) == -(-len(records) // 2)
    for r in records:
        assert r.reasoning_length > 0 and r.action_length > 0 and r.top_k == 8
        assert r.teacher_entropy > 0
        assert len(r.input_ids) <= cfg.data.max_tokens
    assert summary["records_written_now"] == len(records)
    assert summary["dropped"] == {}
    assert summary["train"]["steps"] == 3
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(summary["student"])
    assert student.config.num_hidden_layers == 2


def test_every_stage_is_a_child_run_in_mlflow(first_run):
    tmp, cfg, summary = first_run
    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    client = mlflow.MlflowClient()
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.params["loss.objective"] == "sad"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage = {c.data.tags["sad_ray.stage"]: c for c in children}
    assert set(by_stage) == {"models", "records", "train"}
    assert by_stage["train"].info.run_name == "train-sad-seed0"
    # The student is in the model registry, pointing at the train run's artifacts, tagged with what it is.
    registered = json.loads((Path(summary["student"]) / "sad_ray_registered.json").read_text())
    version = client.get_model_version(registered["name"], registered["version"])
    assert version.run_id == by_stage["train"].info.run_id
    assert {k: version.tags.get(k) for k in ("sad_ray.objective", "sad_ray.seed", "sad_ray.teacher",
                                            "sad_ray.run_identity")} == {
        "sad_ray.objective": "sad", "sad_ray.seed": "0", "sad_ray.teacher": summary["teacher_id"],
        "sad_ray.run_identity": summary["train"]["run_identity"]}
    n_records = len(read_records(summary["records"]))
    assert by_stage["records"].data.metrics["records_written"] == n_records
    assert by_stage["models"].data.metrics["student_params"] < by_stage["models"].data.metrics["teacher_params"]
    history = client.get_metric_history(by_stage["train"].info.run_id, "loss_cot")
    assert [m.step for m in history] == [1, 2, 3]
    assert "curriculum/open_fraction" in by_stage["train"].data.metrics


def test_a_rerun_resumes_instead_of_redoing(first_run):
    tmp, cfg, summary = first_run
    before = len(read_records(summary["records"]))
    again = run_distill(cfg)
    assert again["records_written_now"] == 0
    assert again["train"] == summary["train"]
    assert again["mlflow_run_id"] == summary["mlflow_run_id"]
    assert len(read_records(summary["records"])) == before


def test_a_token_kd_run_keeps_the_sad_student_and_is_its_own_run(first_run):
    tmp, cfg, summary = first_run
    sad = Path(summary["student"])
    sad_trained = (sad / "sad_ray_train.json").read_text()
    kd = run_distill(small_config(tmp, "loss.objective=token_kd", "train.steps=1"))
    # Same teacher, same records; the student lands beside the SAD one, which is left as it was.
    assert kd["records"] == summary["records"] and kd["records_written_now"] == 0
    assert Path(kd["student"]) == sad.parent / "token_kd-seed0"
    assert (sad / "sad_ray_train.json").read_text() == sad_trained
    assert kd["train"]["run_identity"] != summary["train"]["run_identity"]
    # A new parent run that says what it ran (the SAD one still says sad), with a child run of its own.
    client = mlflow.MlflowClient(cfg.tracking.tracking_uri)
    assert kd["mlflow_run_id"] != summary["mlflow_run_id"]
    parent = client.get_run(kd["mlflow_run_id"])
    assert parent.data.params["loss.objective"] == "token_kd"
    assert parent.data.tags["sad_ray.teacher"] == summary["teacher_id"]
    assert client.get_run(summary["mlflow_run_id"]).data.params["loss.objective"] == "sad"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    (train,) = [c for c in children if c.data.tags["sad_ray.stage"] == "train"]
    assert train.info.run_name == "train-token_kd-seed0"
    # Two versions of the registered student, each tagged with its objective.
    name = cfg.tracking.register_student_as
    kd_version = client.get_model_version(name, kd["train"]["registered"]["version"])
    sad_version = client.get_model_version(name, summary["train"]["registered"]["version"])
    assert kd_version.version != sad_version.version and kd_version.run_id == train.info.run_id
    assert (kd_version.tags["sad_ray.objective"], sad_version.tags["sad_ray.objective"]) == ("token_kd", "sad")
    assert kd_version.tags["sad_ray.run_identity"] == kd["train"]["run_identity"]


def test_a_new_teacher_rebuilds_student_init_and_records_and_keeps_the_old_ones(first_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from sad_ray.models.identity import SIDECAR, model_fingerprint, teacher_id
    from sad_ray.records import TeacherMismatchError, episode_id

    tmp, cfg, summary = first_run
    # "Another teacher": the starter with one weight tensor changed, in a folder of its own.
    other = tmp_path / "other-teacher"
    shutil.copytree(summary["teacher"], other, ignore=shutil.ignore_patterns(SIDECAR))
    (weights_file,) = other.glob("*.safetensors")
    weights = load_file(weights_file)
    name = "model.layers.0.mlp.down_proj.weight"  # layer 0 is one the 2-layer student keeps
    weights[name] = weights[name] * 0.9
    save_file(weights, weights_file, metadata={"format": "pt"})
    old_root = Path(summary["records"]).parent

    def snapshot(root: Path) -> dict[str, tuple[int, int]]:
        return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
                for sub in ("records", "student-init", "students") for p in (root / sub).rglob("*") if p.is_file()}

    old = snapshot(old_root)
    new = run_distill(small_config(tmp, f"models.teacher={other}"))
    tid = teacher_id(other)
    assert new["teacher_id"] == tid != summary["teacher_id"]
    new_root = Path(new["records"]).parent
    assert new_root.parent == old_root.parent and new_root != old_root
    # A student cut from the new teacher, and every record scored again by it.
    info = json.loads((Path(new["student_init"]) / "sad_ray_student.json").read_text())
    assert info["teacher_id"] == tid and info["recipe"] == {"student_layers": 2}
    assert model_fingerprint(new["student_init"]) != model_fingerprint(summary["student_init"])
    records = read_records(new["records"])
    assert {r.teacher_model for r in records} == {tid} and new["records_written_now"] == len(records)
    assert {episode_id(r.id) for r in records} == {episode_id(r.id) for r in read_records(summary["records"])}
    assert new["train"]["run_identity"] != summary["train"]["run_identity"]
    # Nothing of the old teacher's was touched.
    assert snapshot(old_root) == old
    # A shard of the new teacher's records in the old teacher's folder is refused, with the file named.
    stray = old_root / "records" / "part-09999.parquet"
    shutil.copy(next(Path(new["records"]).glob("part-*.parquet")), stray)
    try:
        with pytest.raises(TeacherMismatchError, match=re.escape(
                f"records in {stray} were made by teacher {tid}; this run's teacher is {summary['teacher_id']}")):
            run_distill(cfg)
    finally:
        stray.unlink()


def test_more_episodes_on_a_rerun_add_only_the_new_ones(first_run, tmp_path):
    tmp, cfg, _ = first_run
    # Same output folder, one more episode per environment: only those are scored.
    bigger = small_config(tmp, "data.episodes_per_env=3")

    from sad_ray.records import episode_id

    before = read_records(first_run[2]["records"])
    summary = run_distill(bigger)
    after = read_records(summary["records"])
    # Only the two new episodes (one per environment) were scored; their records are added to the old ones.
    new = {episode_id(r.id) for r in after} - {episode_id(r.id) for r in before}
    assert len(new) == 2 and summary["records_written_now"] == len(after) - len(before) >= 2
    # The data changed, so the student was trained again (a new run), not returned from the old one.
    assert summary["train"]["checkpoint"] != first_run[2]["train"]["checkpoint"]


def test_bad_trajectory_files_are_named_with_line_and_field(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"id": "a", "env": "x", "task_type": "t", "split": "train", "turns": []}) + "\n"
                    + json.dumps({"id": "b", "env": "x", "task_type": "t", "split": "train", "turns": "oops"}) + "\n")
    with pytest.raises(ValueError, match=r"chats.jsonl:2: field 'turns' must be a list"):
        list(load_episodes(path))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"chats.jsonl:1: not valid JSON"):
        list(load_episodes(path))
    cfg = small_config(tmp_path, "data.source=jsonl", f"data.trajectories={tmp_path / 'missing.jsonl'}")
    with pytest.raises(FileNotFoundError, match="data.trajectories"):
        run_distill(cfg)


# The README's example line of a `data.source: jsonl` file.
EXAMPLE_LINE = (
    '{"id": "my-hotpotqa-0", "env": "hotpotqa", "task_type": "comparison", "split": "train", "turns": ['
    '{"role": "user", "content": "Question: Were Scott Derrickson and Ed Wood of the same nationality?"}, '
    '{"role": "assistant", "content": "Thought: I need both nationalities.\\nAction: search[Scott Derrickson]"}, '
    '{"role": "user", "content": "Scott Derrickson (born July 16, 1966) is an American director."}, '
    '{"role": "assistant", "content": "Thought: Ed Wood was American too.\\nAction: finish[yes]"}], '
    '"success": true, "reward": 1.0, "steps": 2}'
)


@pytest.mark.parametrize("lines, message", [
    ([EXAMPLE_LINE, EXAMPLE_LINE.replace('"role": "user", "content"', '"role": "user", "text"', 1)],
     "chats.jsonl:2: field turns[0] has no 'content' key"),
    ([EXAMPLE_LINE.replace('"success": true', '"success": "false"')],
     "chats.jsonl:1: field 'success' must be a bool, got 'false'"),
    ([EXAMPLE_LINE.replace('"steps": 2', '"steps": true')], "chats.jsonl:1: field 'steps' must be an int, got True"),
    ([EXAMPLE_LINE, "", EXAMPLE_LINE], "chats.jsonl:3: id 'my-hotpotqa-0' is already on line 1"),
    (["", "  "], "chats.jsonl: no episodes; expected one JSON object a line"),
])
def test_every_bad_trajectory_line_is_named_before_anything_is_read(tmp_path, lines, message):
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        list(load_episodes(path))


def test_the_readme_example_line_loads(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(EXAMPLE_LINE + "\n")
    (episode,) = load_episodes(path)
    assert (episode.id, episode.env, episode.task_type, episode.split) == ("my-hotpotqa-0", "hotpotqa", "comparison",
                                                                          "train")
    assert len(episode.turns) == 4 and episode.success is True and episode.reward == 1.0 and episode.steps == 2
    assert episode.turns[1]["content"] == "Thought: I need both nationalities.\nAction: search[Scott Derrickson]"


def test_the_seed_source_and_jsonl_files_feed_the_same_stage(tmp_path):
    from sad_ray.envs.seed import seed_episode

    chats = tmp_path / "chats.jsonl"
    ep = seed_episode(0)
    chats.write_text(json.dumps({"id": "mine-0", "env": "household", "task_type": ep.task_type, "split": "train",
                                 "turns": list(ep.turns), "success": True, "reward": 1.0, "steps": ep.steps}) + "\n")
    cfg = small_config(tmp_path, "data.source=jsonl", f"data.trajectories={chats}", "train.steps=1",
                       "train.batch_size=1")
    summary = run_distill(cfg)
    (record,) = read_records(summary["records"])
    assert record.id == "mine-0" and record.env == "household" and summary["train"]["steps"] == 1


def test_hf_engine_scores_match_the_full_distribution(starter_dir, starter_tokenizer):
    from sad_ray.envs.seed import seed_episode
    from sad_ray.method.masks import build_masks
    from sad_ray.rollout.engines import HFEngine

    engine = HFEngine(starter_dir)
    m = build_masks(starter_tokenizer, list(seed_episode(1).turns), "react")
    sup = m.reason_mask | m.act_mask
    ((ids, lp, tail),) = engine.score([m.input_ids], [sup], 20)
    assert ids.shape == (int(sup.sum()), 20)
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.as_tensor(m.input_ids[None], dtype=torch.long)).logits[0, :-1]
    full = torch.log_softmax(logits.double(), -1)[torch.as_tensor(sup[1:])]
    ref_lp, ref_ids = full.topk(20, dim=-1)
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    np.testing.assert_allclose(lp, ref_lp.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.exp(tail), 1 - ref_lp.exp().sum(-1).numpy(), atol=1e-4)


def test_a_teacher_that_keeps_too_few_rollouts_is_topped_up_with_scored_demonstrations(tmp_path):
    """The untrained starter wins no WebShop task in one step: every rollout is dropped, and with
    data.min_records the failed tasks get the expert's demonstrations, scored by the same teacher."""
    from sad_ray.records import dropped_episodes, episode_id

    cfg = small_config(tmp_path, "data.source=rollouts", "data.envs=[webshop]", "data.min_records=2",
                       "rollout.envs=[webshop]", "rollout.tasks_per_env=2", "rollout.max_steps=1",
                       "rollout.engine.kind=hf", "rollout.cpus_per_actor=1", "train.steps=1")
    summary = run_distill(cfg)
    records = read_records(summary["records"])
    assert set(dropped_episodes(summary["records"]).values()) == {"failed_episode"}
    played = set(dropped_episodes(summary["records"]))
    assert {episode_id(r.id) for r in records} == played and len(played) == 2  # the same tasks, demonstrated
    assert all(r.success and r.teacher_model == summary["teacher_id"] for r in records)
    assert summary["records_written_now"] == len(records) >= 2 and summary["train"]["steps"] == 1
    # A rerun finds enough records: nothing is played or scored again.
    assert run_distill(cfg)["records_written_now"] == 0
