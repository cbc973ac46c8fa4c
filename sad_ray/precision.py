"""One numeric precision for training autocast, every engine and DeepSpeed, picked from the hardware.

`auto` picks bf16 only where the hardware runs it natively: a CUDA device that supports it, or a CPU whose flags
include `avx512_bf16` or `amx_bf16`. Elsewhere it picks fp32: on an AVX2-only CPU bf16 is emulated, and measured
20x+ slower than fp32 for training and 2.7x slower in vLLM (shared/STACK.md). `torch.backends.mkldnn` is available
on both kinds of CPU, so it cannot tell them apart; the CPU flags can.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Iterable
from functools import lru_cache
from typing import Literal

log = logging.getLogger(__name__)

Precision = Literal["auto", "bf16", "fp16", "fp32"]
Resolved = Literal["bf16", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")
# CPU flags (as /proc/cpuinfo spells them) under which bf16 matrix multiplies run in hardware.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def check_precision(value: str, key: str = "precision") -> str:
    if value not in PRECISIONS:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, PRECISIONS))}, got {value!r}")
    return value


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this host (Linux /proc/cpuinfo); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_precision(
    setting: str,
    device: Literal["cpu", "cuda"] = "cpu",
    *,
    flags: Iterable[str] | None = None,
    cuda_bf16: bool | None = None,
) -> Resolved:
    """The precision `setting` means on this device: `auto` -> bf16 where native (see module doc), else fp32.

    `flags` (CPU flags) and `cuda_bf16` (whether the CUDA device supports bf16) default to this host's; tests pass
    them to decide for another machine.
    """
    check_precision(setting)
    if setting != "auto":
        return setting  # type: ignore[return-value]
    if device == "cuda":
        if cuda_bf16 is None:
            import torch

            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp32"
    have = cpu_flags() if flags is None else frozenset(flags)
    return "bf16" if have & BF16_CPU_FLAGS else "fp32"


def dtype_name(precision: Resolved) -> str:
    """The dtype name engines take (vLLM's `dtype=`, transformers' `torch_dtype` attribute name)."""
    return _DTYPE_NAMES[precision]


def torch_dtype(precision: Resolved):
    import torch

    return getattr(torch, _DTYPE_NAMES[precision])


def host_summary(setting: str, device: Literal["cpu", "cuda"] = "cpu") -> dict[str, str]:
    """What to log next to any timing: the setting, what it resolved to, and why (CPU model, bf16 flags)."""
    resolved = resolve_precision(setting, device)
    summary = {"precision": setting, "precision_resolved": resolved, "device": device, "cpu_model": cpu_model(),
               "cpu_bf16_flags": ",".join(sorted(cpu_flags() & BF16_CPU_FLAGS)) or "none",
               "cpus": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())}
    if device == "cuda":
        import torch

        summary["cuda_device"] = torch.cuda.get_device_name()
    return summary


def log_choice(setting: str, device: Literal["cpu", "cuda"] = "cpu", what: str = "") -> Resolved:
    """Resolve and log the choice once per call site (`what` names it: "training", "vLLM engine", ...)."""
    s = host_summary(setting, device)
    log.info("precision%s: %s -> %s on %s (%s; bf16 CPU flags: %s)", f" for {what}" if what else "",
             setting, s["precision_resolved"], device, s["cpu_model"], s["cpu_bf16_flags"])
    return s["precision_resolved"]  # type: ignore[return-value]
