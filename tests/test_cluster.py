"""The GPU cluster: cluster.yaml against Ray's own autoscaler schema and checks, configs/cluster.yaml against the
config tree and that cluster, and Hugging Face Hub ids as model specs (offline here: a clear error, no hang)."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray._private.label_utils import validate_node_label_syntax
from ray.autoscaler._private.util import prepare_config, validate_config

from sad_ray.config import load_config
from sad_ray.models import starter
from sad_ray.models.starter import HUB_MANIFEST, HubDownloadError, is_hub_id, resolve_model

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
CONFIG = ROOT / "configs" / "cluster.yaml"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
SHARED = "/mnt/shared"  # where cluster.yaml mounts the shared filesystem on every node


def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def ray_up_checks(cfg: dict) -> None:
    """What `ray up` checks before it talks to a cloud: the schema, then Ray's own rules on the filled-in config."""
    jsonschema.validate(cfg, SCHEMA)
    validate_config(prepare_config(copy.deepcopy(cfg)))


def gpu_types(cfg: dict) -> dict[str, dict]:
    return {name: t for name, t in cfg["available_node_types"].items() if t["resources"].get("GPU", 0) > 0}


# --- cluster.yaml ----------------------------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_own_checks() -> None:
    ray_up_checks(cluster())


def _misspelled_key(cfg: dict) -> None:
    cfg["max_worker"] = cfg.pop("max_workers")


def _string_max_workers(cfg: dict) -> None:
    cfg["max_workers"] = str(cfg["max_workers"])


def _fractional_gpu(cfg: dict) -> None:
    next(iter(gpu_types(cfg).values()))["resources"]["GPU"] = 0.5


def _unknown_node_key(cfg: dict) -> None:
    cfg["available_node_types"][cfg["head_node_type"]]["min_worker"] = 0


def _head_type_missing(cfg: dict) -> None:
    cfg["head_node_type"] = "no-such-type"


def _min_over_max(cfg: dict) -> None:
    for t in gpu_types(cfg).values():
        t["min_workers"] = cfg["max_workers"]


@pytest.mark.parametrize("breakage, error", [
    (_misspelled_key, "'max_worker' was unexpected"),
    (_string_max_workers, "is not of type 'integer'"),
    (_fractional_gpu, "0.5 is not of type 'integer'"),
    (_unknown_node_key, "'min_worker' was unexpected"),
    (_head_type_missing, "`head_node_type` must be one of `available_node_types`"),
    (_min_over_max, "smaller than the sum of `min_workers`"),
])
def test_broken_cluster_yaml_is_refused(breakage, error: str) -> None:
    cfg = cluster()
    breakage(cfg)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(error)):
        ray_up_checks(cfg)


def test_node_types_have_roles_and_bounds() -> None:
    cfg = cluster()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head runs the driver and MLflow; GPUs belong to workers"
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert any(t["resources"].get("GPU", 0) == 0 for t in workers.values()), "no CPU worker type"
    # The teacher's engines and training land on their own GPU types, each marked by a custom resource.
    marks = {name: {k for k in t["resources"] if k not in ("CPU", "GPU", "memory")} for name, t in gpu_types(cfg).items()}
    assert {m for ms in marks.values() for m in ms} >= {"teacher_gpu", "train_gpu"}, marks
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        validate_node_label_syntax(t.get("labels", {}))
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]


def test_every_node_installs_the_project_with_the_gpu_extra() -> None:
    cfg = cluster()
    pyproject_extras = set(re.findall(r"^(\w+) = \[", (ROOT / "pyproject.toml").read_text().split(
        "[project.optional-dependencies]")[1].split("\n[")[0], re.M))
    installs = [c for c in cfg["setup_commands"] if "pip install -e" in c]
    assert len(installs) == 1, cfg["setup_commands"]
    extras = set(re.search(r"\.\[([\w,]+)\]", installs[0]).group(1).split(","))
    assert {"gpu", "envs"} <= extras <= pyproject_extras
    # It installs from the working tree that file_mounts copies to every node.
    project_dir = re.search(r"cd (\S+) &&", installs[0]).group(1).replace("~", "/home/" + cfg["auth"]["ssh_user"])
    assert cfg["file_mounts"].get(project_dir) == "."


def _mlflow_server_args(cfg: dict) -> dict[str, str]:
    commands = cfg["head_setup_commands"] + cfg["head_start_ray_commands"]
    started = [c for c in commands if "mlflow server" in c]
    assert len(started) == 1, "the head must start one MLflow server"
    words = shlex.split(started[0].split("mlflow server", 1)[1].split(">")[0])
    return dict(zip(words[::2], words[1::2], strict=False))


def test_mlflow_server_runs_on_the_head_for_every_node() -> None:
    cfg = cluster()
    assert not any("mlflow server" in c for c in cfg["setup_commands"] + cfg["worker_setup_commands"]
                   + cfg["worker_start_ray_commands"]), "one server, on the head"
    args = _mlflow_server_args(cfg)
    assert args["--host"] == "0.0.0.0"
    assert args["--backend-store-uri"].startswith("sqlite:///")
    assert args["--artifacts-destination"].startswith(SHARED + "/")
    # The jobs log to it by a name every node resolves to the head, which MLflow must accept as a Host header.
    uri = urlparse(load_config(CONFIG).tracking.tracking_uri)
    assert args["--port"] == str(uri.port)
    assert uri.hostname in args["--allowed-hosts"].split(",")
    assert any(uri.hostname in c and "/etc/hosts" in c and "RAY_HEAD_IP" in c for c in cfg["setup_commands"])


# --- configs/cluster.yaml --------------------------------------------------------------------------------------


def test_cluster_config_is_the_papers_scale() -> None:
    cfg = load_config(CONFIG)
    assert (cfg.models.teacher, cfg.models.student) == ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct")
    assert is_hub_id(cfg.models.teacher) and is_hub_id(cfg.models.student)
    assert cfg.data.source == "rollouts" and cfg.rollout.engine.kind == "vllm"
    assert cfg.rollout.engine.tensor_parallel_size > 1
    # vLLM's workers use the GPUs the actor holds: one per tensor-parallel rank.
    assert cfg.rollout.gpus_per_actor == cfg.rollout.engine.tensor_parallel_size
    assert (cfg.train.strategy, cfg.train.zero_stage, cfg.train.use_gpu) == ("deepspeed", 3, True)
    assert cfg.eval.engine == "vllm" and cfg.eval.num_gpus >= 1 and cfg.eval.replicas >= 1
    assert urlparse(cfg.tracking.tracking_uri).scheme == "http"
    assert cfg.paths.cache_dir.startswith(SHARED + "/") and cfg.paths.output_dir.startswith(SHARED + "/")


def test_cluster_config_fits_the_cluster() -> None:
    """The teacher's engines and the Serve replicas fit the teacher GPU type, the Ray Train workers the training one."""
    cfg, nodes = load_config(CONFIG), cluster()
    by_mark = {mark: t for t in gpu_types(nodes).values() for mark in t["resources"] if mark.endswith("_gpu")}
    teacher, train = by_mark["teacher_gpu"], by_mark["train_gpu"]
    assert cfg.rollout.gpus_per_actor <= teacher["resources"]["GPU"]
    assert cfg.rollout.cpus_per_actor <= teacher["resources"]["CPU"]
    assert cfg.rollout.actors * cfg.rollout.gpus_per_actor <= teacher["max_workers"] * teacher["resources"]["GPU"]
    assert 2 * cfg.eval.replicas * cfg.eval.num_gpus <= teacher["max_workers"] * teacher["resources"]["GPU"]
    assert cfg.train.num_workers <= train["max_workers"] * train["resources"]["GPU"]
    assert cfg.train.cpus_per_worker * train["resources"]["GPU"] <= train["resources"]["CPU"]
    # Each stage asks for its node type's mark, one unit per GPU it takes, so nothing lands on the other type.
    assert cfg.rollout.resources_per_actor == {"teacher_gpu": cfg.rollout.gpus_per_actor}
    assert cfg.train.resources_per_worker == {"train_gpu": 1}
    assert cfg.eval.resources == {"teacher_gpu": cfg.eval.num_gpus}
    from serve.local import eval_app_args

    for spec in eval_app_args(cfg, {"teacher": cfg.models.teacher, "student": "/s/student"}, None).models:
        assert spec.resources == {"teacher_gpu": cfg.eval.num_gpus}
        assert spec.tensor_parallel_size <= spec.num_gpus
    assert any("mount" in c and f" {SHARED})" in c for c in nodes["setup_commands"]), "the shared filesystem"


# --- Hugging Face Hub ids as model specs ---------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No request leaves this process: huggingface_hub reads HF_HUB_OFFLINE once, at import."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.timeout(60)
def test_hub_id_offline_is_a_clear_error(offline, tmp_path: Path) -> None:
    with pytest.raises(HubDownloadError) as excinfo:
        resolve_model("sad-ray-test/does-not-exist", tmp_path)
    message = str(excinfo.value)
    assert "'sad-ray-test/does-not-exist'" in message and "could not be downloaded" in message
    assert "local Hugging Face directory" in message
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__  # no trace from deep inside
    assert isinstance(excinfo.value, FileNotFoundError)  # what callers already catch for a missing model
    assert not any(p.name.startswith(".does-not-exist.tmp") or p.name == "does-not-exist"
                   for p in (tmp_path / "hub" / "sad-ray-test").iterdir())


def test_model_specs_that_are_not_hub_ids(offline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not any(map(is_hub_id, ("starter", "bootstrap:x", "/abs/org/name", "~/org/name", "a/b/c", "./a", "a/..",
                                   "-a/b", "org/", "models:/sad-ray-student/3")))
    # A local directory wins over the Hub id it looks like.
    local = tmp_path / "org" / "name"
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("org/name", tmp_path / "cache") == Path("org/name")
    # A path that is not an id keeps its old error.
    with pytest.raises(FileNotFoundError, match="model directory .* does not exist"):
        resolve_model(str(tmp_path / "nope" / "x" / "y"), tmp_path / "cache")


def _fake_hub(monkeypatch: pytest.MonkeyPatch, repo_files: list[str]) -> list[dict]:
    """The Hub as huggingface_hub would answer for a repo holding `repo_files` (no network)."""
    import types

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls: list[dict] = []

    def snapshot_download(repo_id, *, revision, local_dir, allow_patterns):
        calls.append({"repo_id": repo_id, "revision": revision})
        for name in filter_repo_objects(repo_files, allow_patterns=allow_patterns):
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / name).write_text("{}" if name.endswith(".json") else name)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda self, repo_id: types.SimpleNamespace(sha="c0ffee" * 6 + "c0ff"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hub_download_keeps_safetensors_config_and_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_hub(monkeypatch, [
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
        "vocab.json", "merges.txt", "pytorch_model.bin", "README.md", "original/consolidated.00.pth", "LICENSE"])
    path = resolve_model("org/model", tmp_path)
    assert path == tmp_path / "hub" / "org" / "model"
    assert sorted(p.name for p in path.iterdir()) == sorted([
        HUB_MANIFEST, "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
        "vocab.json", "merges.txt"])
    manifest = json.loads((path / HUB_MANIFEST).read_text())
    assert manifest["repo_id"] == "org/model" and manifest["revision"] == calls[0]["revision"]
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".model.tmp")] == []
    # Once downloaded it is reused as it is, without the Hub.
    assert resolve_model("org/model", tmp_path) == path and len(calls) == 1


def test_hub_repo_without_safetensors_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hub(monkeypatch, ["config.json", "tokenizer.json", "pytorch_model.bin"])
    with pytest.raises(HubDownloadError, match=r"'org/pickled' has no config.json or no \*\.safetensors weights \(fetched: config.json, tokenizer.json\)"):
        resolve_model("org/pickled", tmp_path)
    assert not (tmp_path / "hub" / "org" / "pickled").exists()
    assert starter.hub_model_dir(tmp_path, "org/pickled") == tmp_path / "hub" / "org" / "pickled"


def test_eval_students_take_hub_ids(offline, tmp_path: Path) -> None:
    """`eval.students` names a Hub model like `models.student` does: from the cache when it is there, else a clear
    download error; a name that is none of the three kinds says which kinds there are."""
    from sad_ray.eval.job import student_agents

    cached = tmp_path / "hub" / "sad-ray-test" / "tiny"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    (cached / HUB_MANIFEST).write_text(json.dumps({"repo_id": "sad-ray-test/tiny", "files": ["config.json"]}))
    cfg = load_config(None, [f"paths.cache_dir={tmp_path}", "eval.students=[sad-ray-test/tiny, models:/s/1]"])
    agents = student_agents(cfg, tmp_path / "students")
    assert [(a.name, a.source) for a in agents] == [("tiny", str(cached)), ("s-v1", "models:/s/1")]
    with pytest.raises(HubDownloadError, match="'sad-ray-test/absent' is not a local directory"):
        student_agents(load_config(None, [f"paths.cache_dir={tmp_path}", "eval.students=[sad-ray-test/absent]"]),
                       tmp_path / "students")
    with pytest.raises(FileNotFoundError, match=r"eval.students: \./nowhere/x/y is neither .* nor a Hugging Face"):
        student_agents(load_config(None, [f"paths.cache_dir={tmp_path}", "eval.students=[./nowhere/x/y]"]),
                       tmp_path / "students")
