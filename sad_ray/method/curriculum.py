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
        t = self.step if step is None else step
        c0, ramp = self.cfg.c0, self.ramp_steps
        if ramp == 0 or t >= ramp:
            return 1.0
        if self.cfg.schedule == "sqrt":  # Platanios et al. (2019): opens fast, then slows down.
            return min(1.0, math.sqrt(t * (1 - c0 * c0) / ramp + c0 * c0))
        return min(1.0, c0 + (1 - c0) * t / ramp)

    def open_indices(self, step: int | None = None) -> np.ndarray:
        n_open = max(math.ceil(self.competence(step) * self.size), self.batch_size)
        return self.order[: min(n_open, self.size)]

    def probabilities(self, step: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(open indices, their sampling probabilities) at a step."""
        idx = self.open_indices(step)
        uniform = np.full(idx.size, 1.0 / idx.size)
        if not self.cfg.reweight:
            return idx, uniform
        loss = self.running_loss[idx]
        seen = ~np.isnan(loss)
        z = np.zeros(idx.size)
        if seen.sum() >= 2 and loss[seen].std() > 0:
            z[seen] = (loss[seen] - loss[seen].mean()) / loss[seen].std()
        logits = z / self.cfg.temperature
        soft = np.exp(logits - logits.max())
        soft /= soft.sum()
        p = (1 - self.cfg.uniform_mix) * soft + self.cfg.uniform_mix * uniform
        return idx, p / p.sum()

    def next_batch(self) -> np.ndarray:
        """The dataset indices of the current step's batch; advances the step."""
        idx, p = self.probabilities()
        rng = np.random.default_rng([self.cfg.seed, self.step])
        draw = rng.choice(idx, size=self.batch_size, replace=False, p=p)
        self.step += 1
        return draw

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
