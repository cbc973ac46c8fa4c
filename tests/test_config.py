"""The config tree: YAML + command-line overrides, with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sad_ray.config import Config, ConfigError, load_config, to_dict, to_flat_dict

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_the_shipped_yaml_load():
    assert load_config() == Config()
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert cfg.loss.objective == "sad" and cfg.records.top_k == 20
    assert cfg.curriculum.weights == (1.0, 1.0, 1.0)


def test_overrides_are_typed_and_applied_in_order(tmp_path):
    cfg = load_config(None, ["train.steps=7", "loss.temperature=2", "loss.objective=token_kd",
                             "curriculum.weights=[1, 0, 2]", "train.steps=9", "models.trust_remote_code=true"])
    assert cfg.train.steps == 9
    assert cfg.loss.temperature == 2.0 and isinstance(cfg.loss.temperature, float)
    assert cfg.loss.objective == "token_kd"
    assert cfg.curriculum.weights == (1.0, 0.0, 2.0)
    assert cfg.models.trust_remote_code is True


def test_round_trip_through_yaml(tmp_path):
    import yaml

    cfg = load_config(None, ["loss.divergence=reverse", "paths.output_dir=/tmp/x"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(path) == cfg
    flat = to_flat_dict(cfg)
    assert flat["loss.divergence"] == "reverse" and flat["paths.output_dir"] == "/tmp/x"


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.stepz=3", r"unknown key train\.stepz"),
        ("trian.steps=3", r"unknown key trian"),
        ("train.steps=many", r"train\.steps must be an integer"),
        ("train.steps=3.5", r"train\.steps must be an integer"),
        ("models.trust_remote_code=yes please", r"models\.trust_remote_code must be true or false"),
        ("loss.objective=magic", r"loss.*objective must be one of"),
        ("segment.format=xml", r"segment\.format must be one of"),
        ("curriculum.weights=[1, 2]", r"curriculum\.weights must have 3 items"),
        ("loss.temperature=0", r"loss.*temperature"),
        ("curriculum.c0=0", r"curriculum.*c0"),
        ("train=3", r"train must be a mapping"),
        ("train.steps.x=3", r"train\.steps must be an integer"),
        ("nonsense", r"key\.sub=value"),
        ("data.source=jsonl", r"data: source 'jsonl' needs trajectories"),
        ("data.envs=[alfworld, minecraft]", r"data: envs must name some of alfworld, webshop, hotpotqa"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top"):
        load_config(bad)
    bad.write_text("train:\n  steps: ten\n")
    with pytest.raises(ConfigError, match=r"train\.steps must be an integer.*bad\.yaml"):
        load_config(bad)


def test_the_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    gpu = load_config(root / "gpu.yaml")
    assert gpu.train.strategy == "deepspeed" and gpu.train.zero_stage == 3 and gpu.train.use_gpu
    assert gpu.rollout.gpus_per_actor == 1 and gpu.precision == "auto"
    default = load_config(root / "default.yaml")
    assert default.train.strategy == "ddp" and default.models.teacher == "auto"


def test_a_nested_override_keeps_the_sections_own_defaults():
    cfg = load_config(None, ["bootstrap.train.steps=5"])
    # bootstrap.train has its own defaults (not TrainConfig'); overriding one key keeps the others.
    assert cfg.bootstrap.train.steps == 5
    assert cfg.bootstrap.train.schedule == "cosine" and cfg.bootstrap.train.checkpoint_every == 20


def test_exponent_notation_is_a_number():
    assert load_config(None, ["train.lr=1e-4"]).train.lr == 1e-4
    with pytest.raises(ConfigError, match="train.lr must be a number"):
        load_config(None, ["train.lr=fast"])
