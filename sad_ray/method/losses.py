"""Distillation losses for SAD: per-token divergences on the teacher's top-k + tail buckets, and the
span-wise objective L = λ_r·L_CoT + λ_a·L_Act next to its token-level and SFT baselines.

Every supervised position is a (k+1)-bucket distribution: the teacher's k token ids and one "everything
else" bucket. The teacher's buckets come from the record (top-k logprobs + tail mass, see docs/design.md);
the student's are its softmax gathered at the same ids plus the mass of the complement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

Objective = Literal["sad", "reason_only", "act_only", "token_kd", "no_segmentation", "sft"]
Divergence = Literal["forward", "reverse", "jsd"]

# Teacher bucket log-probs are floored here inside the reverse KL: a record's tail computed as
# log(1 - sum(exp(top-k))) rounds to -inf when the teacher is confident, and q·log(q / 0) would be +inf.
# e^-100 is below fp32's smallest normal number, so the floor only ever replaces a rounded zero.
MIN_TEACHER_LOGPROB = -100.0


def teacher_topk(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """What a teacher scorer stores for each position: its top-k token ids, their log-probs and the log of
    the mass outside them.

    logp = log_softmax(logits) in fp32; ids, logprobs = topk(logp, k) (sorted descending);
    tail = logsumexp(logp[j] for j not in ids), computed over the complement (no log(1 - Σ) cancellation),
    -inf when k == V. Returns (ids int32 [..., k], logprobs float32 [..., k], tail float32 [...]).
    """
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the vocabulary), got {k}")
    with torch.no_grad():
        logp = torch.log_softmax(logits.float(), dim=-1)  # [..., V]
        logprobs, ids = logp.topk(k, dim=-1, sorted=True)  # [..., k]
        tail = logp.scatter(-1, ids, -math.inf).logsumexp(dim=-1)  # [...]; -inf when k == V
    return ids.to(torch.int32), logprobs, tail


class _StudentBuckets(torch.autograd.Function):
    """log q over the k+1 buckets (and at an optional target token), with one working [N, V] copy.

    Plain autograd (log_softmax, gather, logsumexp of a -inf-scattered copy) keeps two [N, V] tensors for
    backward and allocates four more in it, and on CPU each fresh [N, V] costs about as much as a pass over
    it. Here one buffer, `rest` = exp(y - m) with the top-k zeroed, serves forward and backward: at
    N=1850, V=49152 on 2 threads fwd+bwd takes 0.9 s instead of 2.5 s, with a quarter of the fp32 error.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, target: Tensor | None):
        # logits [N, V]; ids [N, K] long; target [N] long or None
        dtype = torch.promote_types(logits.dtype, torch.float32)
        top = logits.gather(-1, ids).to(dtype)  # [N, K]
        rest = logits.to(dtype, copy=True)  # [N, V], the forward's one working copy
        rest.scatter_(-1, ids, -math.inf)
        # Shift by the complement's own max so that its mass cannot underflow even when the top-k holds
        # nearly everything; an empty complement (K == V) has max -inf and gives lse_rest = log 0 = -inf.
        m = rest.amax(-1, keepdim=True)  # [N, 1]
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        rest.sub_(m).exp_()  # [N, V] exp(y_j - m), 0 on the top-k
        s = rest.sum(-1, keepdim=True)  # [N, 1]
        buckets = torch.cat([top, m + s.log()], dim=-1)  # [N, K+1] unnormalised
        lse = buckets.logsumexp(-1, keepdim=True)  # [N, 1] log Σ_j exp(y_j), exact from the buckets
        buckets = buckets - lse
        if target is None:
            target_logprob = buckets.new_zeros(0)
        else:
            target_logprob = logits.gather(-1, target[:, None]).to(dtype).squeeze(-1) - lse[:, 0]
        ctx.has_target = target is not None
        ctx.save_for_backward(rest, ids, target, buckets, m, s, lse)
        ctx.logits_dtype = logits.dtype
        return buckets, target_logprob

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor, h: Tensor):
        # g [N, K+1] upstream of the bucket log-probs; h [N] upstream of the target log-prob
        rest, ids, target, buckets, m, s, lse = ctx.saved_tensors
        # d log q_b / d y_j = [j in b] · q_j / q_b - q_j, so every bucket shares the -q_j·Σ g term.
        total = g.sum(-1, keepdim=True)  # [N, 1]
        if ctx.has_target:
            total = total + h[:, None]
        # Outside the top-k: q_j / q_tail = rest_j / s and q_j = rest_j · exp(m - lse).
        coef = torch.where(s > 0, g[:, -1:] / s - total * (m - lse).exp(), torch.zeros_like(s))  # [N, 1]
        grad = rest * coef  # [N, V]; not in place, so backward may run twice (retain_graph)
        top_grad = g[:, :-1] - total * buckets[:, :-1].exp()  # [N, K]
        grad.scatter_(-1, ids, top_grad)
        if ctx.has_target:
            grad.scatter_add_(-1, target[:, None], h[:, None])
        return grad.to(ctx.logits_dtype), None, None


def temper(bucket_logprobs: Tensor, temperature: float) -> Tensor:
    """log_softmax(log p / τ) over the k+1 buckets: the one tempering both sides of the loss go through.

    The teacher's record holds only its top-k and the tail mass, so its full distribution cannot be tempered
    before bucketing; the student is therefore bucketed at τ = 1 too and both are tempered as buckets. A student
    equal to the teacher then scores exactly 0 at every τ. [N, K+1] -> [N, K+1].
    """
    if temperature == 1.0:
        return bucket_logprobs
    return torch.log_softmax(bucket_logprobs / temperature, dim=-1)


def student_buckets(
    logits: Tensor, topk_ids: Tensor, temperature: float = 1.0, target: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """The student's log-probs over the teacher's k+1 buckets, tempered as buckets (`temper`).

    log q_i = y_{id_i} - logsumexp(y) for the k ids; log q_tail = logsumexp(y_j, j not in ids) - logsumexp(y)
    (-inf when the ids cover the vocabulary); then `temper(log q, τ)`. Also log q(target) at τ = 1 (the CE term)
    when `target` [N] is given.
    logits [N, V], topk_ids [N, K] (distinct per row) -> ([N, K+1] float32 or float64, [N] or None).
    """
    target = None if target is None else target.long()
    buckets, target_logprob = _StudentBuckets.apply(logits, topk_ids.long(), target)
    return temper(buckets, float(temperature)), (target_logprob if target is not None else None)


def teacher_buckets(
    topk_logprobs: Tensor, tail_logprob: Tensor, temperature: float = 1.0, empty_tail: bool = False
) -> Tensor:
    """The teacher's log-probs over its k+1 buckets, tempered as buckets exactly like the student's (`temper`).

    log p = log_softmax([topk_logprobs, tail] / τ) over the k+1 buckets (at τ = 1 this only renormalises away
    storage rounding). `empty_tail` (k = V) drops the stored tail, which can then only be rounding.
    topk_logprobs [N, K], tail_logprob [N] -> [N, K+1] (float32, or float64 if given).
    """
    # The teacher is a fixed target: no gradient reaches it even if its scores came with a graph.
    topk_logprobs, tail_logprob = topk_logprobs.detach(), tail_logprob.detach()
    dtype = torch.promote_types(topk_logprobs.dtype, torch.float32)
    tail = tail_logprob.to(dtype)[:, None]  # [N, 1]
    if empty_tail:
        tail = torch.full_like(tail, -math.inf)
    return temper(torch.log_softmax(torch.cat([topk_logprobs.to(dtype), tail], dim=-1), dim=-1), temperature)


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """a·(log a - log b) per bucket with 0·log 0 = 0; the masking keeps gradients finite too."""
    a = log_a.exp()
    keep = a > 0
    zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
    return a * (torch.where(keep, log_a, zero) - torch.where(keep, log_b, zero))


def _forward_kl_buckets(logp: Tensor, logq: Tensor) -> Tensor:
    return _kl_terms(logp, logq).sum(-1)


def _reverse_kl_buckets(logp: Tensor, logq: Tensor) -> Tensor:
    return _kl_terms(logq, logp.clamp(min=MIN_TEACHER_LOGPROB)).sum(-1)


def _jsd_buckets(logp: Tensor, logq: Tensor, beta: float) -> Tensor:
    # A bucket empty on both sides (the tail when k = V) would give logaddexp(-inf, -inf) a NaN gradient;
    # its terms are 0 anyway, so any finite log m will do there.
    empty = torch.isneginf(logp) & torch.isneginf(logq)
    zero = torch.zeros((), dtype=logq.dtype, device=logq.device)
    logm = torch.logaddexp(
        torch.where(empty, zero, logp + math.log(beta)), torch.where(empty, zero, logq + math.log(1.0 - beta))
    )  # [N, K+1]
    return beta * _kl_terms(logp, logm).sum(-1) + (1.0 - beta) * _kl_terms(logq, logm).sum(-1)


def _per_token(
    divergence: str,
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    temperature: float,
    beta: float = 0.5,
    target: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    logq, target_logprob = student_buckets(student_logits, topk_ids, temperature, target)  # [N, K+1]
    empty_tail = topk_ids.shape[-1] >= student_logits.shape[-1]
    logp = teacher_buckets(topk_logprobs, tail_logprob, temperature, empty_tail).to(logq.dtype)  # [N, K+1]
    if divergence == "forward":
        div = _forward_kl_buckets(logp, logq)
    elif divergence == "reverse":
        div = _reverse_kl_buckets(logp, logq)
    else:
        div = _jsd_buckets(logp, logq, beta)
    return temperature**2 * div, target_logprob  # [N]; τ² keeps gradient scale as τ varies (Hinton)


def forward_kl(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """KL(teacher || student) per token over the k+1 buckets (the paper's default).

    τ²·Σ_b p_b (log p_b - log q_b), p from `teacher_buckets`, q from `student_buckets`; 0·log 0 = 0.
    student_logits [N, V], topk_ids [N, K], topk_logprobs [N, K], tail_logprob [N] -> [N].
    """
    return _per_token("forward", student_logits, topk_ids, topk_logprobs, tail_logprob, temperature)[0]


def reverse_kl(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """KL(student || teacher) per token over the k+1 buckets (MiniLLM-style, mode seeking).

    τ²·Σ_b q_b (log q_b - max(log p_b, -100)); the floor turns a teacher bucket rounded to zero mass into a
    large finite penalty instead of +inf. Shapes as in `forward_kl`.
    """
    return _per_token("reverse", student_logits, topk_ids, topk_logprobs, tail_logprob, temperature)[0]


def generalized_jsd(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Generalized Jensen-Shannon divergence per token over the k+1 buckets, as in GKD.

    τ²·(β·KL(p || m) + (1-β)·KL(q || m)), m = β·p + (1-β)·q, p teacher, q student; β in (0, 1).
    Shapes as in `forward_kl`.
    """
    return _per_token("jsd", student_logits, topk_ids, topk_logprobs, tail_logprob, temperature, beta)[0]


def cross_entropy(student_logits: Tensor, target: Tensor) -> Tensor:
    """-log q(target) per token on the student's full distribution (temperature 1).

    student_logits [N, V], target [N] -> [N].
    """
    return F.cross_entropy(student_logits.float(), target.long(), reduction="none")


@dataclass(frozen=True)
class LossConfig:
    # sad: λ_r·L_CoT + λ_a·L_Act. reason_only / act_only: one span. token_kd: one mean over all supervised
    # tokens (the token-level baseline; MiniLLM-style with divergence=reverse). no_segmentation: the paper's
    # ablation name for token_kd, kept so ablation tables read like the paper. sft: cross entropy only.
    objective: Objective = "sad"
    # off_policy: train on the teacher's own trajectories. on_policy: rounds in which the student plays and the
    # teacher scores the student's turns (sad_ray.onpolicy; config section `on_policy`).
    mode: Literal["off_policy", "on_policy"] = "off_policy"
    # auto: reverse KL in the on_policy mode (as on-policy distillation uses), forward KL off-policy.
    divergence: Literal["auto", "forward", "reverse", "jsd"] = "auto"
    temperature: float = 1.0
    # Mixture weight of the teacher in the generalized JSD.
    beta: float = 0.5
    lambda_reason: float = 1.0
    lambda_act: float = 1.0
    # Adds ce_weight·CE (mean over supervised tokens) to any objective.
    ce_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in ("off_policy", "on_policy"):
            raise ValueError(f"mode must be 'off_policy' or 'on_policy', got {self.mode!r}")
        if self.divergence == "auto":
            object.__setattr__(self, "divergence", "reverse" if self.mode == "on_policy" else "forward")
        for name, allowed in (("objective", get_args(Objective)), ("divergence", get_args(Divergence))):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        for name in ("lambda_reason", "lambda_act", "ce_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        tau = self.temperature
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not (isinstance(self.beta, (int, float)) and 0.0 < self.beta < 1.0):
            raise ValueError(f"beta must be in (0, 1), got {self.beta!r}")


class SpanCounts(NamedTuple):
    """Supervised tokens of each span over one whole optimiser step: every micro-batch on every rank.

    The span means divide by these, so a token weighs the same whatever micro-batch or rank it lands in, and
    grad_accum or the worker count do not change the objective (`span_counts` counts one batch's)."""

    n_reason: int
    n_act: int

    @property
    def n_total(self) -> int:
        return self.n_reason + self.n_act


def span_counts(reason_mask: Tensor, act_mask: Tensor) -> SpanCounts:
    """The supervised tokens of each span in one batch (position 0 predicts nothing and is never supervised)."""
    return SpanCounts(int(reason_mask[:, 1:].sum()), int(act_mask[:, 1:].sum()))


class LossOutput(NamedTuple):
    # Scalar to backprop. With `counts` of the whole step, this batch's share of the step's loss: the shares of
    # every micro-batch on every rank add up to the loss of the step.
    loss: Tensor
    loss_cot: Tensor  # span mean of the divergence over reason tokens, same normaliser (detached, always logged)
    loss_act: Tensor  # the same over act tokens (detached)
    loss_ce: Tensor  # mean -log q(next token) over supervised tokens, same normaliser (detached)
    n_reason: int
    n_act: int
    # [B] detached: each example's objective as if it were a batch of its own (λ-weighted span means of the
    # spans the objective trains, plus ce_weight·CE), what the curriculum's running loss re-weights on.
    per_example: Tensor

    def metrics(self) -> dict[str, float]:
        """Plain floats for the tracker."""
        return {
            "loss": float(self.loss.detach()),
            "loss_cot": float(self.loss_cot),
            "loss_act": float(self.loss_act),
            "loss_ce": float(self.loss_ce),
            "n_reason": float(self.n_reason),
            "n_act": float(self.n_act),
        }


def _objective(cfg: LossConfig, cot: Tensor, act: Tensor, all_div: Tensor, ce: Tensor) -> Tensor:
    """The configured objective from its span terms; works elementwise, so it serves batches and examples."""
    if cfg.objective == "sad":
        loss = cfg.lambda_reason * cot + cfg.lambda_act * act
    elif cfg.objective == "reason_only":
        loss = cot
    elif cfg.objective == "act_only":
        loss = act
    elif cfg.objective in ("token_kd", "no_segmentation"):
        loss = all_div
    else:  # sft
        loss = ce
    return loss + cfg.ce_weight * ce if cfg.ce_weight > 0 else loss


def _sum_over(x: Tensor, mask: Tensor) -> Tensor:
    # where, not multiply: a non-finite value outside the mask must not leak in as NaN.
    return torch.where(mask, x, torch.zeros_like(x)).sum()


def predicting_rows(reason_mask: Tensor, act_mask: Tensor) -> Tensor:
    """[B, T] bool: True at t-1 for every supervised token t, i.e. the positions whose logits the loss reads;
    `hidden[predicting_rows(...)]` lists them row-major, in the order of the teacher rows."""
    return F.pad((reason_mask | act_mask)[:, 1:], (0, 1))


def distillation_loss(
    student_logits: Tensor,
    input_ids: Tensor,
    reason_mask: Tensor,
    act_mask: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logprob: Tensor,
    cfg: LossConfig = LossConfig(),
    vocab_size: int | None = None,
    counts: SpanCounts | None = None,
) -> LossOutput:
    """The training loss of one batch, aligned as in docs/design.md.

    Token t is supervised iff reason_mask[t] | act_mask[t] and is predicted by the logits at t-1; the N
    supervised rows, in row-major order, match the N teacher rows. The per-token divergence d_n (τ² times
    the configured divergence over the k+1 buckets) is computed once, then, with R, A the reason and act
    tokens of the whole optimiser step (`counts`; this batch's own when None):
      loss_cot = Σ_{n in reason} d_n / R, loss_act = Σ_{n in act} d_n / A (0 without tokens),
      sad = λ_r·loss_cot + λ_a·loss_act, reason_only = loss_cot, act_only = loss_act,
      token_kd = no_segmentation = Σ_n d_n / (R + A), sft = CE; plus ce_weight·CE for any objective,
      CE = Σ_n -log q(input_ids[t_n]) / (R + A) at temperature 1.
    `vocab_size` slices padded student logits so padding rows get no mass.

    student_logits [B, T, V], or [N, V] when the caller computed only the rows that predict supervised tokens
    (`predicting_rows`: the student's head applied to those hidden states only, which saves most of the head's
    cost and memory); input_ids, reason_mask, act_mask [B, T]; topk_ids, topk_logprobs [N, K]; tail_logprob [N].
    """
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"student_logits must be [B, T, V] or [N, V], got shape {tuple(student_logits.shape)}")
    B, T = input_ids.shape
    V = student_logits.shape[-1]
    if student_logits.dim() == 3 and tuple(student_logits.shape[:2]) != (B, T):
        raise ValueError(f"student_logits [B, T, V] must match input_ids {[B, T]}, got {list(student_logits.shape)}")
    for name, t in (("reason_mask", reason_mask), ("act_mask", act_mask)):
        if tuple(t.shape) != (B, T):
            raise ValueError(f"{name} must be [B, T] = {[B, T]} like input_ids, got {list(t.shape)}")
    if reason_mask.dtype != torch.bool or act_mask.dtype != torch.bool:
        raise ValueError("reason_mask and act_mask must be bool tensors")
    if (reason_mask & act_mask).any():
        raise ValueError("a token is in both reason_mask and act_mask; spans must not overlap")
    supervised = reason_mask | act_mask  # [B, T]
    if supervised[:, 0].any():
        raise ValueError("reason_mask/act_mask must be False at position 0: nothing predicts the first token")
    if vocab_size is not None:
        if not 0 < vocab_size <= V:
            raise ValueError(f"vocab_size must be in [1, {V}] (the logits' last dim), got {vocab_size}")
    else:
        vocab_size = V

    # Row t-1 of the logits predicts token t; select those rows of the flattened batch (row-major, like
    # the records), which backpropagates into one [B*T, V] gradient and nothing bigger.
    predicts = F.pad(supervised[:, 1:], (0, 1))  # [B, T]: True at t-1 for supervised t
    rows = predicts.flatten().nonzero().squeeze(-1)  # [N]
    n = rows.numel()
    if topk_ids.dim() != 2 or topk_ids.shape[0] != n or tuple(topk_logprobs.shape) != tuple(topk_ids.shape):
        raise ValueError(
            f"teacher rows do not match the masks: {n} supervised tokens (reason_mask | act_mask, excluding "
            f"position 0) need topk_ids and topk_logprobs of shape [{n}, K], got {list(topk_ids.shape)} "
            f"and {list(topk_logprobs.shape)}"
        )
    if tuple(tail_logprob.shape) != (n,):
        raise ValueError(
            f"tail_logprob must be [{n}] (one per supervised token), got {list(tail_logprob.shape)}"
        )
    if n and int(topk_ids.max()) >= vocab_size:
        raise ValueError(f"topk_ids hold id {int(topk_ids.max())}, outside the vocabulary of {vocab_size}")

    if student_logits.dim() == 3:
        logits = student_logits.reshape(B * T, V).index_select(0, rows)  # [N, V]
    elif student_logits.shape[0] != n:
        raise ValueError(f"student_logits [N, V] must hold the {n} rows that predict supervised tokens, "
                         f"got {student_logits.shape[0]}")
    else:
        logits = student_logits
    if vocab_size < V:
        logits = logits[:, :vocab_size]
    is_reason = reason_mask[:, 1:][supervised[:, 1:]]  # [N], row-major like `rows`
    is_act = ~is_reason
    target = input_ids[:, 1:][supervised[:, 1:]]  # [N] the tokens the rows predict
    example = rows // T  # [N] the batch row each teacher row belongs to

    own = SpanCounts(int(is_reason.sum()), n - int(is_reason.sum()))
    counts = own if counts is None else counts
    if counts.n_reason < own.n_reason or counts.n_act < own.n_act:
        raise ValueError(f"counts {tuple(counts)} of the step are fewer than this batch's own {tuple(own)}")

    # The bucket pass also yields log q(target) at τ = 1, so CE costs nothing extra (sft trains on it alone).
    per_token, target_logprob = _per_token(
        cfg.divergence, logits, topk_ids, topk_logprobs, tail_logprob, cfg.temperature, cfg.beta, target,
    )  # [N], [N]
    ce_per_token = -target_logprob

    r, a, t = (max(c, 1) for c in (counts.n_reason, counts.n_act, counts.n_total))
    loss_cot = _sum_over(per_token, is_reason) / r
    loss_act = _sum_over(per_token, is_act) / a
    loss_ce = ce_per_token.sum() / t
    loss = _objective(cfg, loss_cot, loss_act, per_token.sum() / t, loss_ce)

    # Each example's objective on its own tokens: the same formula with per-example sums and counts.
    with torch.no_grad():
        def per_ex(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
            x = torch.where(mask, x.detach(), torch.zeros_like(x)).to(per_token.dtype)
            total = torch.zeros(B, dtype=x.dtype, device=x.device).index_add_(0, example, x)
            count = torch.zeros(B, dtype=x.dtype, device=x.device).index_add_(0, example, mask.to(x.dtype))
            return total, count.clamp(min=1)

        everywhere = torch.ones_like(is_reason)
        (cot_s, cot_n), (act_s, act_n) = per_ex(per_token, is_reason), per_ex(per_token, is_act)
        (all_s, all_n), (ce_s, _) = per_ex(per_token, everywhere), per_ex(ce_per_token, everywhere)
        per_example = _objective(cfg, cot_s / cot_n, act_s / act_n, all_s / all_n, ce_s / all_n)
    return LossOutput(
        loss=loss,
        loss_cot=loss_cot.detach(),
        loss_act=loss_act.detach(),
        loss_ce=loss_ce.detach(),
        n_reason=own.n_reason,
        n_act=own.n_act,
        per_example=per_example,
    )
