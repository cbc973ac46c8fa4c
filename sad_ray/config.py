"""One configuration tree of frozen dataclasses, loaded from YAML and overridden from the command line.

Unknown keys and values of the wrong type are errors that name the full key (``loss.temperature``), so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from sad_ray.eval.evaluate import EvalConfig
from sad_ray.method.curriculum import CurriculumConfig
from sad_ray.method.losses import LossConfig
from sad_ray.rollout.engines import EngineConfig
from sad_ray.rollout.pipeline import RolloutConfig
from sad_ray.train.ray_train import TrainConfig


class ConfigError(ValueError):
    """A configuration file or override that does not fit the config tree."""


@dataclass(frozen=True)
class PathsConfig:
    # Models, downloaded wheels and other things that are reused across runs.
    cache_dir: str = "~/.cache/sad-ray"
    # Everything one run writes: records, checkpoints, the student.
    output_dir: str = "outputs/default"


@dataclass(frozen=True)
class ModelsConfig:
    # "auto" (the bootstrapped teacher if jobs/bootstrap_teacher.py made one, else the starter), "starter"
    # (SmolLM2-135M-Instruct, provisioned offline), "bootstrap[:<name>]", a local Hugging Face directory, or a
    # Hugging Face Hub id ("Qwen/Qwen2.5-7B-Instruct": not a local path; needs the Hub, then cached under
    # `paths.cache_dir`/hub; sad_ray.models.starter.resolve_model).
    teacher: str = "auto"
    # Empty: build the student from the teacher by keeping `student_layers` of its layers. Else any spec the
    # teacher takes but "auto".
    student: str = ""
    student_layers: int = 6
    trust_remote_code: bool = False


@dataclass(frozen=True)
class SegmentConfig:
    format: Literal["auto", "react", "alfworld", "webshop", "paper", "think_tag"] = "react"
    # What becomes of assistant text that matches no rule: supervised as reasoning, or not at all.
    on_unparsed: Literal["reason", "drop"] = "reason"
    # Drop a whole trajectory when any turn had a segmentation problem.
    drop_trajectories_with_issues: bool = False


@dataclass(frozen=True)
class RecordsConfig:
    top_k: int = 20
    records_per_shard: int = 256


@dataclass(frozen=True)
class DataConfig:
    # Where the teacher chats come from: expert demonstrations played in the built-in environments ("demos"),
    # the teacher's own rollouts ("rollouts"),
    # a JSON-lines file of chats ("jsonl", one episode a line:
    # {"id", "env", "task_type", "split", "turns": [{"role", "content"}, ...], "success", "reward", "steps"}),
    # or the scripted household seed trajectories ("seed").
    # "rollouts": the teacher plays the environments (section `rollout`) on Ray Data.
    # "auto": rollouts when the teacher is a bootstrapped one (it can play), else demos.
    source: Literal["auto", "demos", "rollouts", "jsonl", "seed"] = "auto"
    envs: tuple[str, ...] = ("alfworld", "webshop", "hotpotqa")
    episodes_per_env: int = 8
    trajectories: str = ""
    seed_episodes: int = 24
    # Longer trajectories are dropped (counted as too_long).
    max_tokens: int = 2048
    # With source rollouts: when the teacher's rollouts keep fewer records than this, the tasks without records
    # get the expert's demonstrations, scored by the teacher (0: never).
    min_records: int = 0

    def __post_init__(self) -> None:
        if self.source == "jsonl" and not self.trajectories:
            raise ValueError("source 'jsonl' needs trajectories (a JSON-lines file)")
        if self.source in ("demos", "auto"):
            from sad_ray.envs import ENVIRONMENTS

            unknown = [e for e in self.envs if e not in ENVIRONMENTS]
            if unknown or not self.envs:
                raise ValueError(f"envs must name some of {', '.join(ENVIRONMENTS)}, got {list(self.envs)}")
        if self.episodes_per_env < 1 or self.seed_episodes < 1 or self.max_tokens < 16:
            raise ValueError("episodes_per_env and seed_episodes must be >= 1, max_tokens >= 16")


@dataclass(frozen=True)
class BootstrapConfig:
    """`jobs/bootstrap_teacher.py`: fine-tune a base model on expert demonstrations into a teacher that plays."""

    base: str = "starter"
    # The teacher lands in <cache_dir>/teachers/<name>; `models.teacher: bootstrap` resolves to it.
    name: str = "react-teacher"
    envs: tuple[str, ...] = ("alfworld", "webshop", "hotpotqa")
    # Training demonstrations and held-out evaluation tasks per environment, in the order of `envs`.
    # 1000 ALFWorld games: with 360 the teacher fitted them (loss ~0.08) and won 47% of held-out games; 120 more
    # steps on 1000 took it to 70% (README, "A teacher that plays").
    demos: tuple[int, ...] = (1000, 60, 60)
    eval_tasks: tuple[int, ...] = (60, 15, 15)
    eval_max_new_tokens: int = 100
    # Evaluation replays a growing context every turn: a larger KV cache keeps prefills affordable on CPU.
    eval_engine: EngineConfig = field(default_factory=lambda: EngineConfig(kv_cache_gib=4.0))
    eval_in_flight: int = 16
    # All demonstrations open from the start: a curriculum that holds back the long ALFWorld windows left the first
    # teacher (80 steps, c0 0.3) winning 2/12 held-out games (README, "A teacher that plays").
    curriculum: CurriculumConfig = field(default_factory=lambda: CurriculumConfig(c0=1.0, ramp=0.0))
    # Step limit in evaluation; null keeps each environment's own (ALFWorld 50, WebShop 15, HotPotQA 8).
    eval_max_steps: int | None = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=360, batch_size=4, grad_accum=1, lr=2e-4, warmup_steps=4, schedule="cosine", checkpoint_every=20))
    register_as: str = "sad-ray-teacher"
    # `models.teacher: auto` in jobs/distill.py builds this teacher when it does not exist yet (else auto falls
    # back to the starter, which plays almost nothing). The default preset allows it.
    auto: bool = False

    def __post_init__(self) -> None:
        if len(self.demos) != len(self.envs) or len(self.eval_tasks) != len(self.envs):
            raise ValueError(f"demos and eval_tasks need one count per env ({len(self.envs)}: {list(self.envs)})")
        if any(n < 0 for n in (*self.demos, *self.eval_tasks)) or not any(self.demos):
            raise ValueError("demos and eval_tasks must be >= 0, with some demos")
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")


@dataclass(frozen=True)
class TrackingConfig:
    # MLflow 3 defaults to a sqlite store; the plain file store is in maintenance mode.
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "sad-ray"
    # The trained student is registered in MLflow's model registry under this name.
    register_student_as: str = "sad-ray-student"
    run_name: str = ""


@dataclass(frozen=True)
class ServeConfig:
    """What jobs/distill.py does with the student at its end: leave it served, or print the command that serves it."""

    keep: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    # Clients must send `Authorization: Bearer $<api_key_env>` when that variable is set where the job runs.
    api_key_env: str = "SAD_RAY_SERVE_API_KEY"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1-65535, got {self.port}")


@dataclass(frozen=True)
class ALFWorldSettings:
    # A folder of ALFWorld's own games (what `alfworld-download` fetches: json_2.1.1/...). Empty: $ALFWORLD_DATA
    # when set, else games generated offline into <cache_dir>/alfworld.
    data_dir: str = ""


@dataclass(frozen=True)
class HotpotQASettings:
    # HotPotQA's own questions: one file (split by id) or one per split ({train: hotpot_train_v1.1.json, test:
    # ...}), with a corpus to search (corpus_path: {title: [sentences]} JSON); without one, each question's own
    # `context` paragraphs. Empty: the built-in offline questions and corpus (countries, cities, states).
    questions_path: str | dict[str, str] = ""
    corpus_path: str = ""

    def __post_init__(self) -> None:
        if self.corpus_path and not self.questions_path:
            raise ValueError("corpus_path needs questions_path: the built-in questions use the built-in corpus")


@dataclass(frozen=True)
class WebShopSettings:
    num_products: int = 1000  # the offline catalogue's size and seed
    catalogue_seed: int = 0


@dataclass(frozen=True)
class EnvironmentsConfig:
    """Where each environment's tasks come from, for every stage that plays them (`environments.*`)."""

    alfworld: ALFWorldSettings = field(default_factory=ALFWorldSettings)
    hotpotqa: HotpotQASettings = field(default_factory=HotpotQASettings)
    webshop: WebShopSettings = field(default_factory=WebShopSettings)


ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ArmConfig:
    """One arm: `set` overrides the experiment's config (`key.sub=value`, as on the command line) for every seed."""

    name: str = ""
    set: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    train: bool = True  # false: the untrained student (the teacher's student-init) as a reference row
    note: str = ""  # what the arm asks, for the report

    def __post_init__(self) -> None:
        if not ARM_NAME.match(self.name) or self.name == "teacher":
            raise ValueError(f"arm name must be letters, digits, '_', '.', '-' (and not 'teacher'), got {self.name!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"arm {self.name}: seeds must be distinct and at least one, got {list(self.seeds)}")
        if not self.train and len(self.seeds) != 1:
            raise ValueError(f"arm {self.name}: an untrained arm has one seed (nothing random), got {list(self.seeds)}")


@dataclass(frozen=True)
class OnPolicyConfig:
    """`on_policy`: the rounds of `loss.mode: on_policy` (sad_ray/onpolicy.py). The student plays `tasks_per_env`
    training tasks of each of `rollout.envs` per round (the rest of section `rollout` says how: engine, actors, step
    limit), the teacher scores its turns, and the student trains `train.steps` steps on them before the next round
    plays with the new weights."""

    rounds: int = 2
    tasks_per_env: int = 8
    # The student samples its turns at this temperature (on-policy distillation learns from the student's own
    # distribution; 0 plays greedily).
    temperature: float = 1.0
    # The share of each round's training records that are the student's own (GKD's λ); the rest are a sample of
    # the teacher's off-policy records (the `data` section's), drawn anew each round. 1: on-policy only.
    fraction: float = 1.0
    # The teacher writes an episode's next turn (greedily) after this many consecutive turns that got nowhere (no
    # parseable action, or "Nothing happens." / "Invalid action"); the records' teacher_turns list them. 0: never.
    intervene_after: int = 0
    # Records of each round on which the teacher-student divergence of the round's player is measured.
    divergence_records: int = 32

    def __post_init__(self) -> None:
        for name in ("rounds", "tasks_per_env"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1] (0 would be loss.mode off_policy), got {self.fraction}")
        if self.temperature < 0 or self.intervene_after < 0 or self.divergence_records < 0:
            raise ValueError("temperature, intervene_after and divergence_records must be >= 0")


@dataclass(frozen=True)
class ExperimentConfig:
    """`experiment`: the grid jobs/experiment.py runs (sad_ray/experiment.py)."""

    name: str = "sad-vs-kd"
    arms: tuple[ArmConfig, ...] = ()
    baseline: str = ""  # the arm every other is compared with, task by task (token_kd); empty: no differences
    results_dir: str = ""  # each finished (arm, seed)'s stored results are copied here (kept in the repository)
    report: str = ""  # the Markdown file regenerated from results_dir (docs/RESULTS.md); empty: none
    title: str = "Does SAD beat token-level distillation?"

    def __post_init__(self) -> None:
        if not ARM_NAME.match(self.name):
            raise ValueError(f"name must be letters, digits, '_', '.', '-', got {self.name!r}")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arm names must be distinct, got {names}")
        if self.baseline and self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not an arm ({', '.join(names)})")


@dataclass(frozen=True)
class Config:
    # The one numeric precision of training autocast, every engine (vLLM, transformers, evaluation, serving) and
    # DeepSpeed. auto: bf16 where the hardware runs it natively (a CUDA device with bf16, or a CPU with
    # avx512_bf16 / amx_bf16), else fp32 (on AVX2-only CPUs bf16 is 20x+ slower to train; sad_ray/precision.py).
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    paths: PathsConfig = field(default_factory=PathsConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)  # the rounds of loss.mode on_policy
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    environments: EnvironmentsConfig = field(default_factory=EnvironmentsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)  # jobs/experiment.py's grid


def resolve_auto(cfg: Config) -> Config:
    """Settle `models.teacher: auto` and `data.source: auto` against what exists on this machine."""
    teacher, source = cfg.models.teacher, cfg.data.source
    if teacher == "auto":
        from sad_ray.models.starter import TEACHER_MANIFEST, bootstrapped_teacher_dir

        home = bootstrapped_teacher_dir(Path(cfg.paths.cache_dir), cfg.bootstrap.name)
        teacher = f"bootstrap:{cfg.bootstrap.name}" if (home / TEACHER_MANIFEST).is_file() else "starter"
        if teacher == "starter":
            logging.getLogger(__name__).warning(
                "models.teacher auto: no bootstrapped teacher %r in %s, so the untrained starter teaches (it wins "
                "almost no task); build one with jobs/bootstrap_teacher.py or set bootstrap.auto: true",
                cfg.bootstrap.name, home.parent)
    if source == "auto":
        source = "rollouts" if teacher.startswith("bootstrap") else "demos"
    return dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, teacher=teacher),
                               data=dataclasses.replace(cfg.data, source=source))


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """The config from a YAML file (or the defaults), then `key.sub=value` overrides applied in order."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top, not {type(loaded).__name__}")
        raw = loaded or {}
    _apply(raw, overrides)
    try:
        return _build(Config, raw, "")
    except ConfigError as exc:
        sources = ([str(path)] if path is not None else []) + (["command-line overrides"] if overrides else [])
        where = f" (from {' + '.join(sources)})" if sources else ""
        raise ConfigError(f"{exc}{where}") from None


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """`cfg` with `key.sub=value` overrides applied in order, as on the command line."""
    raw = to_dict(cfg)
    _apply(raw, overrides)
    return _build(Config, raw, "")


def _apply(raw: dict[str, Any], overrides: typing.Sequence[str]) -> None:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        _set_path(raw, key.strip().split("."), yaml.safe_load(value) if value.strip() else "")


def section_from_dict(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """One config section (a dataclass) from plain data, as a stored result keeps it."""
    return _build(cls, raw, f"{prefix}.")


def to_flat_dict(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{"loss.temperature": 1.0, ...}`: what MLflow logs as parameters."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(to_flat_dict(value, key + "."))
        else:
            out[key] = value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts and lists, ready for YAML."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _set_path(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys[: i + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _build(cls: type, raw: Any, prefix: str, base: Any = None) -> Any:
    """Build `cls` from `raw`; a nested section starts from its parent's default (`base`), not the class's."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s}; {where} takes: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name in raw:
        tp, f = hints[name], fields[name]
        if dataclasses.is_dataclass(tp) and isinstance(raw[name], dict):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else (
                f.default if f.default is not dataclasses.MISSING else None)
            kwargs[name] = _build(tp, raw[name], f"{prefix}{name}.", default)
        else:
            kwargs[name] = _coerce(tp, raw[name], f"{prefix}{name}")
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as exc:
        # Dataclasses validate their own cross-field rules in __post_init__; say where they live.
        raise ConfigError(f"{where}: {exc}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key} has an unsupported type")
    if origin is dict:  # e.g. Ray custom resources: {teacher_gpu: 1}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        key_type, value_type = get_args(tp)
        return {_coerce(key_type, k, f"{key} key {k!r}"): _coerce(value_type, v, f"{key}.{k}")
                for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key} must have {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=False)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string; it is a number to anyone else
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key} has a type the loader does not know: {tp!r}")
