"""Curriculum by trajectory complexity: scores, and a sampler that opens data easy -> hard and re-weights online.

Pure numpy. Under data parallelism each rank runs its own sampler over its own shard of the records (the shards
are disjoint, so ranks never share an example): the competence schedule is the same on every rank, the online
re-weighting follows each rank's own per-example losses. A sampler draws each step from an RNG seeded by
(seed, step), so a restored sampler continues exactly where its checkpoint left it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np


@dataclass(frozen=True)
class CurriculumConfig:
    # Weights of reasoning length, action length and mean teacher entropy in the complexity score.
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Fraction of the data open to sampling at step 0; it grows to 1 over the first `ramp` of the training steps
    # (a fraction of train.steps, so the schedule always finishes inside the run; 0: everything open at once).
    c0: float = 0.3
    ramp: float = 0.5
    schedule: Literal["linear", "sqrt"] = "linear"
    # Online re-weighting from the student's running per-example loss (False: uniform over the open set).
    reweight: bool = True
    temperature: float = 1.0
    # Running loss: l <- ema * l + (1 - ema) * new.
    ema: float = 0.7
    # Share of each draw's probability spread uniformly, so no open example starves.
    uniform_mix: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.weights) != 3 or any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError(f"weights must be three non-negative numbers, not all 0, got {self.weights}")
        if not 0.0 < self.c0 <= 1.0:
            raise ValueError(f"c0 must be in (0, 1], got {self.c0}")
        if not 0.0 <= self.ramp <= 1.0:
            raise ValueError(f"ramp must be a fraction of the training steps in [0, 1], got {self.ramp}")
        if self.schedule not in ("linear", "sqrt"):
            raise ValueError(f"schedule must be 'linear' or 'sqrt', got {self.schedule!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if not 0.0 <= self.uniform_mix <= 1.0:
            raise ValueError(f"uniform_mix must be in [0, 1], got {self.uniform_mix}")


def bucket_entropy(topk_logprobs: np.ndarray, tail_logprob: np.ndarray) -> np.ndarray:
    """Entropy of each position's (k + 1)-bucket teacher distribution, in nats.

    H = -sum_i p_i log p_i - p_tail log p_tail over the top-k tokens and the tail bucket: a lower bound of the
    full entropy (merging tokens never raises entropy). topk_logprobs [N, K], tail_logprob [N] -> [N].
    """
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    tail = np.asarray(tail_logprob, dtype=np.float64)
    h = -(np.exp(lp) * lp).sum(axis=-1)
    finite = np.isfinite(tail)
    h_tail = np.zeros_like(tail)
    h_tail[finite] = -np.exp(tail[finite]) * tail[finite]
    return h + h_tail


def complexity_scores(
    reasoning_length: np.ndarray,
    action_length: np.ndarray,
    teacher_entropy: np.ndarray,
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Weighted mean of the three features, each min-max normalised over the dataset, in [0, 1].

    A feature that is constant over the dataset carries no ordering and contributes 0.
    """
    feats = np.stack([np.asarray(x, dtype=np.float64) for x in (reasoning_length, action_length, teacher_entropy)])
    if feats.ndim != 2 or feats.shape[1] == 0:
        raise ValueError("complexity needs three equally long, non-empty feature arrays")
    if not np.isfinite(feats).all():
        raise ValueError("complexity features must be finite")
    lo = feats.min(axis=1, keepdims=True)
    span = feats.max(axis=1, keepdims=True) - lo
    norm = np.divide(feats - lo, span, out=np.zeros_like(feats), where=span > 0)
    w = np.asarray(weights, dtype=np.float64)
    return (w[:, None] * norm).sum(axis=0) / w.sum()


def draw_weights(running_loss: np.ndarray, cfg: CurriculumConfig) -> np.ndarray:
    """Sampling probabilities of the open examples from their running losses (NaN: not seen yet): uniform without
    re-weighting, else (1 - uniform_mix) * softmax(z / temperature) + uniform_mix / n with z the standardised loss
    (0 for unseen examples)."""
    n = running_loss.size
    uniform = np.full(n, 1.0 / n)
    if not cfg.reweight:
        return uniform
    seen = ~np.isnan(running_loss)
    z = np.zeros(n)
    if seen.sum() >= 2 and running_loss[seen].std() > 0:
        z[seen] = (running_loss[seen] - running_loss[seen].mean()) / running_loss[seen].std()
    logits = z / cfg.temperature
    soft = np.exp(logits - logits.max())
    soft /= soft.sum()
    p = (1 - cfg.uniform_mix) * soft + cfg.uniform_mix * uniform
    return p / p.sum()


def competence_at(cfg: CurriculumConfig, step: int, ramp_steps: int) -> float:
    """The open fraction at a step: c0, growing to 1 over `ramp_steps` (linear, or sqrt as Platanios et al.)."""
    c0 = cfg.c0
    if ramp_steps == 0 or step >= ramp_steps:
        return 1.0
    if cfg.schedule == "sqrt":  # Platanios et al. (2019): opens fast, then slows down.
        return min(1.0, math.sqrt(step * (1 - c0 * c0) / ramp_steps + c0 * c0))
    return min(1.0, c0 + (1 - c0) * step / ramp_steps)


class CurriculumSampler:
    """Draws each step's batch from the easiest `competence(step)` fraction of the data (one rank's shard).

    Within the open set, examples are drawn without replacement with probability
    (1 - uniform_mix) * softmax(z / temperature) + uniform_mix / n_open, where z is the standardised running loss
    of each example (0 for examples not seen yet): examples the student does worse on are drawn more often.
    `total_steps` is the length of the run, over whose first `cfg.ramp` the open fraction grows from c0 to 1.
    """

    def __init__(self, complexity: np.ndarray, cfg: CurriculumConfig, batch_size: int, total_steps: int) -> None:
        complexity = np.asarray(complexity, dtype=np.float64)
        if complexity.ndim != 1 or complexity.size == 0:
            raise ValueError("the curriculum needs a non-empty 1-d array of complexity scores")
        if not np.isfinite(complexity).all():
            raise ValueError("complexity scores must be finite")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_size > complexity.size:
            raise ValueError(f"batch_size ({batch_size}) exceeds the dataset ({complexity.size} examples)")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.cfg = cfg
        self.batch_size = batch_size
        self.ramp_steps = round(cfg.ramp * total_steps)
        # Stable sort: equal scores keep dataset order, so the curriculum does not depend on sort internals.
        self.order = np.argsort(complexity, kind="stable")
        self.step = 0
        self.running_loss = np.full(complexity.size, np.nan)

    @property
    def size(self) -> int:
        return int(self.order.size)

    def competence(self, step: int | None = None) -> float:
        return competence_at(self.cfg, self.step if step is None else step, self.ramp_steps)

    def open_indices(self, step: int | None = None) -> np.ndarray:
        n_open = max(math.ceil(self.competence(step) * self.size), self.batch_size)
        return self.order[: min(n_open, self.size)]

    def probabilities(self, step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(open indices, their sampling probabilities) at a step."""
        idx = self.open_indices(step)
        return idx, draw_weights(self.running_loss[idx], self.cfg)

    def next_batch(self) -> np.ndarray:
        """The dataset indices of the current step's batch; advances the step.

        Without re-weighting, once everything is open the batches walk through epochs (a fresh seeded permutation
        of the data each pass), so a short run sees as many distinct examples as it can; else each step draws
        from the open set by its probabilities."""
        idx, p = self.probabilities()
        if not self.cfg.reweight and idx.size == self.size:
            draw = self._epoch_slice()
        else:
            rng = np.random.default_rng([self.cfg.seed, self.step])
            draw = rng.choice(idx, size=self.batch_size, replace=False, p=p)
        self.step += 1
        return draw

    def _epoch_slice(self) -> np.ndarray:
        """The step's batch as positions step*batch .. +batch of the concatenated epochs (from the step alone, so
        a restored sampler continues exactly); a batch that crosses an epoch end takes the rest from the next."""
        start = self.step * self.batch_size
        out: list[int] = []
        while len(out) < self.batch_size:
            epoch, offset = divmod(start + len(out), self.size)
            perm = np.random.default_rng([self.cfg.seed, 1 << 20, epoch]).permutation(self.size)
            out.extend(perm[offset: offset + self.batch_size - len(out)].tolist())
        return np.asarray(out, dtype=np.int64)

    def update(self, indices: np.ndarray, losses: np.ndarray) -> None:
        """Fold the per-example training losses of the batch just trained into the running loss."""
        indices = np.asarray(indices, dtype=np.int64)
        losses = np.asarray(losses, dtype=np.float64)
        if indices.shape != losses.shape:
            raise ValueError(f"indices {indices.shape} and losses {losses.shape} must have the same shape")
        if indices.size and (indices.min() < 0 or indices.max() >= self.size):
            raise ValueError(f"an index is outside the dataset of {self.size} examples")
        if not np.isfinite(losses).all():
            raise ValueError("per-example losses must be finite")
        for i, loss in zip(indices, losses, strict=True):
            old = self.running_loss[i]
            self.running_loss[i] = loss if np.isnan(old) else self.cfg.ema * old + (1 - self.cfg.ema) * loss

    def stats(self) -> dict[str, float]:
        """Open fraction and the normalised entropy of the sampling weights (1 = uniform)."""
        idx, p = self.probabilities()
        entropy = float(-(p * np.log(p)).sum())
        return {
            "curriculum/open_fraction": idx.size / self.size,
            "curriculum/weight_entropy": entropy / math.log(idx.size) if idx.size > 1 else 1.0,
            "curriculum/seen_fraction": float((~np.isnan(self.running_loss)).mean()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "running_loss": self.running_loss.copy(), "order": self.order.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state. Its `order` must be this sampler's: a state saved on other data (other
        examples, or the same ones scored otherwise) would hand their running losses to the wrong examples."""
        order = np.asarray(state["order"])
        if order.shape != self.order.shape or not np.array_equal(order, self.order):
            raise ValueError("the checkpointed curriculum was built on different data (complexity order differs)")
        self.step = int(state["step"])
        self.running_loss = np.asarray(state["running_loss"], dtype=np.float64).copy()


class BufferedCurriculum:
    """The curriculum over a bounded buffer of records streamed from a worker's shard (memory stays flat however
    large the data): `capacity` slots, each holding one record's complexity and running loss.

    Each step draws from the easiest `competence(step)` fraction of the filled slots, re-weighted by running loss
    like `CurriculumSampler`. What leaves the buffer is the curriculum's call too: `evict(n)` frees the slots of
    the examples the student has learned (running loss at or below the buffer's mean), never one not trained on
    yet, and the trainer refills them from the stream: hard examples stay and are drawn again. The state (slot ids, complexities, losses, step) is checkpointed.
    """

    def __init__(self, cfg: CurriculumConfig, capacity: int, batch_size: int, total_steps: int) -> None:
        if batch_size < 1 or capacity < batch_size:
            raise ValueError(f"the buffer ({capacity} records) must hold at least one batch ({batch_size})")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.cfg, self.capacity, self.batch_size = cfg, capacity, batch_size
        self.ramp_steps = round(cfg.ramp * total_steps)
        self.ids: list[str | None] = [None] * capacity
        self.complexity = np.full(capacity, np.nan)
        self.running_loss = np.full(capacity, np.nan)
        self.step = 0

    @property
    def filled(self) -> np.ndarray:
        return np.flatnonzero(~np.isnan(self.complexity))

    def free(self) -> list[int]:
        return np.flatnonzero(np.isnan(self.complexity)).tolist()

    def put(self, slot: int, record_id: str, complexity: float) -> None:
        if not np.isnan(self.complexity[slot]):
            raise ValueError(f"slot {slot} is taken (by {self.ids[slot]!r})")
        if not math.isfinite(complexity):
            raise ValueError(f"complexity of {record_id!r} must be finite, got {complexity}")
        self.ids[slot], self.complexity[slot], self.running_loss[slot] = record_id, float(complexity), np.nan

    def competence(self, step: int | None = None) -> float:
        return competence_at(self.cfg, self.step if step is None else step, self.ramp_steps)

    def probabilities(self) -> tuple[np.ndarray, np.ndarray]:
        """(open slots, their sampling probabilities): the easiest competence fraction of the filled slots."""
        filled = self.filled
        if filled.size < self.batch_size:
            raise ValueError(f"the buffer holds {filled.size} records, fewer than a batch ({self.batch_size})")
        order = filled[np.argsort(self.complexity[filled], kind="stable")]
        n_open = max(math.ceil(self.competence() * order.size), self.batch_size)
        idx = order[:n_open]
        return idx, draw_weights(self.running_loss[idx], self.cfg)

    def next_batch(self) -> np.ndarray:
        idx, p = self.probabilities()
        rng = np.random.default_rng([self.cfg.seed, self.step])
        draw = rng.choice(idx, size=self.batch_size, replace=False, p=p)
        self.step += 1
        return draw

    def update(self, slots: np.ndarray, losses: np.ndarray) -> None:
        for slot, loss in zip(np.asarray(slots, dtype=np.int64), np.asarray(losses, dtype=np.float64), strict=True):
            if not np.isfinite(loss):
                raise ValueError("per-example losses must be finite")
            old = self.running_loss[slot]
            self.running_loss[slot] = loss if np.isnan(old) else self.cfg.ema * old + (1 - self.cfg.ema) * loss

    def evict(self, n: int) -> list[int]:
        """Free up to `n` slots: examples trained on whose running loss is at or below the mean of those trained
        on (learned, by the buffer's own measure), lowest first (ties: lower slot). An example the student still
        finds hard stays and keeps being drawn; at least one trained example is always at or below the mean, so
        the stream never stalls."""
        seen = np.flatnonzero(~np.isnan(self.running_loss))
        if not seen.size:
            return []
        loss = self.running_loss[seen]
        learned = seen[loss <= loss.mean() + 1e-12 * max(1.0, abs(loss.mean()))]
        out = learned[np.lexsort((learned, self.running_loss[learned]))][:n].tolist()
        for slot in out:
            self.ids[slot] = None
            self.complexity[slot] = self.running_loss[slot] = np.nan
        return out

    def stats(self) -> dict[str, float]:
        idx, p = self.probabilities()
        entropy = float(-(p * np.log(p)).sum())
        return {
            "curriculum/open_fraction": idx.size / max(1, self.filled.size),
            "curriculum/weight_entropy": entropy / math.log(idx.size) if idx.size > 1 else 1.0,
            "curriculum/seen_fraction": float((~np.isnan(self.running_loss[self.filled])).mean()),
            "curriculum/buffer_fill": self.filled.size / self.capacity,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ids": list(self.ids), "complexity": self.complexity.copy(),
                "running_loss": self.running_loss.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["ids"]) != self.capacity:
            raise ValueError(f"the checkpointed buffer has {len(state['ids'])} slots, this one {self.capacity}")
        self.step = int(state["step"])
        self.ids = list(state["ids"])
        self.complexity = np.asarray(state["complexity"], dtype=np.float64).copy()
        self.running_loss = np.asarray(state["running_loss"], dtype=np.float64).copy()
