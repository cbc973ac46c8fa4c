"""One optimiser step of the student, as every data-parallel worker runs it: batches, the forward, the loss.

Pure torch (no Ray): `collate` builds a micro-batch from records, `SupervisedHead` runs the student only where
the loss reads it, and `train_step` does one optimiser step over a rank's micro-batches under DDP, DeepSpeed or
neither, with the span means taken over the whole step (every micro-batch on every rank).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from sad_ray.method.losses import (
    LossConfig,
    LossOutput,
    SpanCounts,
    distillation_loss,
    predicting_rows,
    span_counts,
)
from sad_ray.precision import torch_dtype

if TYPE_CHECKING:  # records need pyarrow; the step itself needs torch alone (tests/test_cuda.py on a bare GPU box)
    from sad_ray.method.curriculum import CurriculumSampler
    from sad_ray.records import TrajectoryRecord


def collate(records: Sequence[TrajectoryRecord], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded token batch plus the teacher rows concatenated in record order.

    Masks are False on padding, so `(reason_mask | act_mask)[:, 1:]` selects the teacher rows row-major.
    """
    B, T = len(records), max(len(r.input_ids) for r in records)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    attention = np.zeros((B, T), dtype=np.int64)
    reason = np.zeros((B, T), dtype=bool)
    act = np.zeros((B, T), dtype=bool)
    for b, r in enumerate(records):
        n = len(r.input_ids)
        input_ids[b, :n], attention[b, :n] = r.input_ids, 1
        reason[b, :n], act[b, :n] = r.reason_mask, r.act_mask
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "reason_mask": torch.from_numpy(reason),
        "act_mask": torch.from_numpy(act),
        "topk_ids": torch.from_numpy(np.concatenate([r.topk_ids for r in records]).astype(np.int64)),
        "topk_logprobs": torch.from_numpy(np.concatenate([r.topk_logprobs for r in records])),
        "tail_logprob": torch.from_numpy(np.concatenate([r.tail_logprob for r in records])),
    }


class SupervisedHead(torch.nn.Module):
    """The student as the loss reads it: the decoder over every position, the LM head only on the positions that
    predict a supervised token (`predicting_rows`), returning [N, V] logits in the teacher rows' order.

    The head and its log-softmax over a 49k vocabulary are a large share of a small student's step; supervised
    tokens are a fraction of a chat, so this saves that share of time and most of the logits' memory. Models whose
    forward does more than `lm_head(hidden)` (logit soft-capping or scaling) get the full forward instead.
    DDP and DeepSpeed wrap this module, so gradients still synchronise through its forward.
    """

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm
        config = lm.config
        self.rows_only = (getattr(config, "final_logit_softcapping", None) is None
                          and getattr(config, "logit_scale", None) is None
                          and hasattr(lm, "get_decoder") and lm.get_output_embeddings() is not None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if not self.rows_only:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.lm.get_output_embeddings()(hidden[rows])


def forward_loss(model, batch: dict[str, torch.Tensor], cfg: LossConfig, vocab_size: int | None,
                 precision: str = "fp32", counts: SpanCounts | None = None) -> LossOutput:
    """`model` is a SupervisedHead (or DDP/DeepSpeed around one) on the batch's device. The forward runs under
    autocast in `precision` (bf16/fp16; fp32 turns it off); the loss itself always runs in fp32."""
    device = batch["input_ids"].device.type
    rows = predicting_rows(batch["reason_mask"], batch["act_mask"])
    low = precision in ("bf16", "fp16")
    with torch.autocast(device, dtype=torch_dtype(precision) if low else torch.bfloat16, enabled=low):
        logits = model(batch["input_ids"], batch["attention_mask"], rows)
    return distillation_loss(
        logits.float(), batch["input_ids"], batch["reason_mask"], batch["act_mask"],
        batch["topk_ids"], batch["topk_logprobs"], batch["tail_logprob"], cfg, vocab_size=vocab_size, counts=counts,
    )


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def step_counts(batches: Sequence[dict[str, torch.Tensor]], device: torch.device) -> SpanCounts:
    """Reason and act tokens of one optimiser step: this rank's micro-batches, summed over every rank."""
    local = [span_counts(b["reason_mask"], b["act_mask"]) for b in batches]
    counts = torch.tensor([sum(c.n_reason for c in local), sum(c.n_act for c in local)], device=device)
    if _world() > 1:
        dist.all_reduce(counts)
    return SpanCounts(int(counts[0]), int(counts[1]))


@dataclass(frozen=True)
class StepResult:
    loss: float  # the step's loss (all micro-batches, all ranks)
    loss_cot: float
    loss_act: float
    loss_ce: float
    n_reason: int  # supervised tokens of the step, all ranks
    n_act: int
    grad_norm: float
    per_example: np.ndarray  # [examples of this rank] each one's own objective, for the curriculum


def train_step(model, batches: Sequence[dict[str, torch.Tensor]], cfg: LossConfig, *, vocab_size: int | None,
               precision: str, optimizer=None, scheduler=None, grad_clip: float = 1.0, scaler=None,
               engine=None) -> StepResult:
    """One optimiser step over this rank's micro-batches (every rank calls it with its own, in lockstep).

    Each micro-batch's loss is its share of the step's loss (span means over the step's tokens on every rank), so
    their gradients add up to the gradient of the step's loss. DDP averages gradients over ranks and DeepSpeed
    also divides by its accumulation steps: the loss is scaled back up by both, so neither the worker count nor
    grad_accum changes the objective. `engine` (DeepSpeed) owns its optimizer, schedule and clipping; otherwise
    `model` is the module or its DDP wrapper and `optimizer`, `scheduler` (and `scaler` for fp16) step here.
    """
    module = engine.module if engine is not None else getattr(model, "module", model)
    device = next(module.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    counts = step_counts(batches, device)  # [R, A] over the whole step
    scale = _world() * (len(batches) if engine is not None else 1)
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, loss_cot, loss_act, loss_ce
    per_example = []
    for j, batch in enumerate(batches):
        # DDP: synchronise gradients only on the last micro-batch.
        last = j == len(batches) - 1
        sync = nullcontext() if (engine is not None or last or not hasattr(model, "no_sync")) else model.no_sync()
        with sync:
            out = forward_loss(engine or model, batch, cfg, vocab_size, precision, counts)
            if engine is not None:
                engine.backward(out.loss * scale)
                engine.step()  # DeepSpeed steps its optimizer at the accumulation boundary only
            elif scaler is not None:
                scaler.scale(out.loss * scale).backward()
            else:
                (out.loss * scale).backward()
        totals += torch.stack([out.loss.detach(), out.loss_cot, out.loss_act, out.loss_ce]).double()
        per_example.append(out.per_example.float().cpu().numpy())
    if engine is not None:
        grad_norm = float(engine.get_global_grad_norm() or 0.0)
    else:
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if _world() > 1:
        dist.all_reduce(totals)
    loss, loss_cot, loss_act, loss_ce = totals.tolist()
    return StepResult(loss, loss_cot, loss_act, loss_ce, counts.n_reason, counts.n_act, grad_norm,
                      np.concatenate(per_example))


def curriculum_step(model, sampler: CurriculumSampler, records: Sequence[TrajectoryRecord], batch_size: int,
                    pad_id: int, cfg: LossConfig, **step_kwargs) -> tuple[np.ndarray, StepResult]:
    """Draw the step's examples from the curriculum, train on them in micro-batches of `batch_size`, and feed each
    example's training loss back into the curriculum's re-weighting. Returns (drawn indices, step result)."""
    idx = sampler.next_batch()
    batches = [collate([records[i] for i in idx[j:j + batch_size]], pad_id) for j in range(0, len(idx), batch_size)]
    out = train_step(model, batches, cfg, **step_kwargs)
    sampler.update(idx, out.per_example)
    return idx, out


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this worker: CUDA memory allocated on a GPU, else the process's peak resident memory
    (activations dominate both: see gradient_checkpointing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def resident_memory_gb() -> dict[str, float]:
    """This process's resident memory now, by kind, from /proc/self/status (Linux; empty elsewhere): `own`
    (anonymous and file-backed pages: its heap, tensors and libraries) and `shared` (shared memory mapped in: on a
    Ray worker, the object store's pages it has read, which are the node's fixed-size store, not the worker's)."""
    try:
        with open("/proc/self/status") as f:
            kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k.startswith("Rss")}
    except (OSError, ValueError):
        return {}
    return {"own": (kib.get("RssAnon", 0) + kib.get("RssFile", 0)) / 2**20, "shared": kib.get("RssShmem", 0) / 2**20}


class MemoryWatch:
    """The peaks of `resident_memory_gb` over a run, sampled every `interval` seconds by a daemon thread (a peak
    shorter than that can be missed; ru_maxrss, `peak_memory_gb`, never misses one but counts both kinds)."""

    def __init__(self, interval: float = 0.1) -> None:
        import threading

        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self.sample()
        if self.peaks:
            self._thread = threading.Thread(target=self._run, args=(interval,), name="memory-watch", daemon=True)
            self._thread.start()

    def sample(self) -> dict[str, float]:
        for kind, gb in resident_memory_gb().items():
            self.peaks[kind] = max(gb, self.peaks.get(kind, 0.0))
        return self.peaks

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
