"""Batches of trajectory records and a single-process SAD training loop driven by the curriculum.

`collate` and `train_step` are what a distributed trainer calls per worker; `train_local` wires them into a
loop for one process (the embedded default and tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sad_ray.method.curriculum import CurriculumConfig, CurriculumSampler, complexity_scores
from sad_ray.method.losses import LossConfig, LossOutput, distillation_loss, predicting_rows
from sad_ray.records import TrajectoryRecord

log = logging.getLogger(__name__)


def collate(records: Sequence[TrajectoryRecord], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded token batch plus the teacher rows concatenated in record order.

    Masks are False on padding, so `(reason_mask | act_mask)[:, 1:]` selects the teacher rows row-major.
    `row_example[n]` is the batch index of teacher row n (for per-example losses).
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
    counts = [int(r.supervised.sum()) for r in records]
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "reason_mask": torch.from_numpy(reason),
        "act_mask": torch.from_numpy(act),
        "topk_ids": torch.from_numpy(np.concatenate([r.topk_ids for r in records]).astype(np.int64)),
        "topk_logprobs": torch.from_numpy(np.concatenate([r.topk_logprobs for r in records])),
        "tail_logprob": torch.from_numpy(np.concatenate([r.tail_logprob for r in records])),
        "row_example": torch.repeat_interleave(torch.arange(B), torch.tensor(counts)),
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
                 autocast_device: str = "cpu", bf16: bool | None = None) -> LossOutput:
    """`model` is a SupervisedHead (or DDP/DeepSpeed around one). bf16 autocast where the hardware has it
    (STACK.md measured it on CPU); the loss itself runs in fp32."""
    if bf16 is None:
        bf16 = torch.backends.mkldnn.is_available()
    rows = predicting_rows(batch["reason_mask"], batch["act_mask"])
    with torch.autocast(autocast_device, dtype=torch.bfloat16, enabled=bf16):
        logits = model(batch["input_ids"], batch["attention_mask"], rows)
    return distillation_loss(
        logits.float(), batch["input_ids"], batch["reason_mask"], batch["act_mask"],
        batch["topk_ids"], batch["topk_logprobs"], batch["tail_logprob"], cfg, vocab_size=vocab_size,
    )


def per_example_loss(out: LossOutput, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """Mean per-token divergence of each example in the batch: what the curriculum re-weights on."""
    B = batch["input_ids"].shape[0]
    rows = batch["row_example"]
    sums = torch.zeros(B).index_add_(0, rows, out.per_token.float())
    counts = torch.bincount(rows, minlength=B).clamp(min=1)
    return (sums / counts).numpy()


def dataset_complexity(records: Sequence[TrajectoryRecord], cfg: CurriculumConfig) -> np.ndarray:
    """Complexity of each record, normalised over these records (what the curriculum orders by)."""
    return complexity_scores(
        np.array([r.reasoning_length for r in records]),
        np.array([r.action_length for r in records]),
        np.array([r.teacher_entropy for r in records]),
        cfg.weights,
    )


@dataclass(frozen=True)
class TrainSummary:
    steps: int
    first_loss: float
    last_loss: float
    tokens_per_second: float
    seconds: float


def train_local(
    records: Sequence[TrajectoryRecord],
    student_dir: str | Path,
    loss_cfg: LossConfig,
    curriculum_cfg: CurriculumConfig,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    seed: int = 0,
    vocab_size: int | None = None,
    complexity: np.ndarray | None = None,
    on_metrics: Callable[[dict[str, float], int], None] | None = None,
):
    """Train the student at `student_dir` in this process; returns (model, TrainSummary)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not records:
        raise ValueError("no trajectory records to train on")
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lm = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    model = SupervisedHead(lm)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    if complexity is None:
        complexity = dataset_complexity(records, curriculum_cfg)
    sampler = CurriculumSampler(complexity, curriculum_cfg, global_batch_size=min(batch_size, len(records)))
    losses: list[float] = []
    tokens, start = 0, time.perf_counter()
    for step in range(steps):
        idx = sampler.next_batch()
        batch = collate([records[i] for i in idx], pad_id)
        out = forward_loss(model, batch, loss_cfg, vocab_size)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        sampler.update(idx, per_example_loss(out, batch))
        tokens += out.n_reason + out.n_act
        losses.append(float(out.loss.detach()))
        metrics = {**out.metrics(), **sampler.stats(), "grad_norm": float(grad_norm), "lr": lr,
                   "tokens_per_second": tokens / (time.perf_counter() - start)}
        if on_metrics is not None:
            on_metrics(metrics, step)
        log.info("step %d loss %.4f (cot %.4f act %.4f)", step, metrics["loss"], metrics["loss_cot"], metrics["loss_act"])
    seconds = time.perf_counter() - start
    lm.eval()
    summary = TrainSummary(steps=steps, first_loss=losses[0] if losses else float("nan"),
                           last_loss=losses[-1] if losses else float("nan"),
                           tokens_per_second=tokens / seconds if seconds else 0.0, seconds=seconds)
    return lm, summary
