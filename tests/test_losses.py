"""Tests for sad_ray.method.losses against a plain float64 full-vocabulary reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sad_ray.method.losses import (
    LossConfig,
    cross_entropy,
    distillation_loss,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    student_buckets,
    teacher_buckets,
    teacher_topk,
)

DIVERGENCES = ("forward", "reverse", "jsd")
FAST = settings(max_examples=40, deadline=None)


# --- the reference: full softmax over all V, float64, written out plainly -----------------------------


def full_divergence(name: str, student: torch.Tensor, teacher: torch.Tensor, tau=1.0, beta=0.5):
    """tau² · D(p || q) over the full vocabulary; p = softmax(teacher / tau), q = softmax(student / tau)."""
    logp = torch.log_softmax(teacher.double() / tau, dim=-1)
    logq = torch.log_softmax(student.double() / tau, dim=-1)
    p, q = logp.exp(), logq.exp()
    if name == "forward":
        d = (p * (logp - logq)).sum(-1)
    elif name == "reverse":
        d = (q * (logq - logp)).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        d = beta * (p * (logp - m.log())).sum(-1) + (1 - beta) * (q * (logq - m.log())).sum(-1)
    return tau**2 * d


def topk64(teacher: torch.Tensor, k: int):
    """teacher_topk in float64, so that k = V comparisons can be tight."""
    logp = torch.log_softmax(teacher.double(), dim=-1)
    logprobs, ids = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, ids, -math.inf).logsumexp(-1)
    return ids, logprobs, tail


def bucket_divergence(name, student, ids, logprobs, tail, tau=1.0, beta=0.5):
    if name == "forward":
        return forward_kl(student, ids, logprobs, tail, temperature=tau)
    if name == "reverse":
        return reverse_kl(student, ids, logprobs, tail, temperature=tau)
    return generalized_jsd(student, ids, logprobs, tail, beta=beta, temperature=tau)


def random_logits(seed: int, n: int, v: int, scale: float, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=dtype) * scale


shapes = st.tuples(
    st.integers(0, 2**31 - 1),  # seed
    st.integers(1, 5),  # N
    st.integers(2, 48),  # V
    # Up to 6 keeps every teacher log-prob above the reverse KL's floor (-100) even at τ = 0.5, where the
    # reference and the floored loss would rightly differ.
    st.floats(0.1, 6.0),  # logit scale
)


# --- per-token divergences --------------------------------------------------------------------------


@FAST
@given(shapes, st.sampled_from(DIVERGENCES), st.sampled_from([0.5, 1.0, 2.0, 3.0]), st.floats(0.05, 0.95))
def test_k_equal_vocab_matches_full_reference(shape, name, tau, beta):
    seed, n, v, scale = shape
    student, teacher = random_logits(seed, n, v, scale), random_logits(seed + 1, n, v, scale)
    ids, logprobs, tail = topk64(teacher, v)
    assert torch.isneginf(tail).all()
    got = bucket_divergence(name, student, ids, logprobs, tail, tau, beta)
    want = full_divergence(name, student, teacher, tau, beta)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@FAST
@given(shapes, st.sampled_from(DIVERGENCES), st.sampled_from([0.5, 1.0, 2.0]))
def test_k_equal_vocab_float32_path(shape, name, tau):
    # What training sees: teacher_topk in fp32, fp32 student logits.
    seed, n, v, scale = shape
    student, teacher = random_logits(seed, n, v, scale), random_logits(seed + 1, n, v, scale)
    ids, logprobs, tail = teacher_topk(teacher.float(), v)
    got = bucket_divergence(name, student.float(), ids, logprobs, tail, tau)
    want = full_divergence(name, student, teacher, tau)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5)


@FAST
@given(shapes, st.data())
def test_small_k_chain_rule_and_bound(shape, data):
    # KL over the full vocabulary splits exactly into the bucket KL plus the tail's share:
    #   KL(p || q) = KL_buckets(p || q) + p_tail · KL(p(. | tail) || q(. | tail)),
    # so the top-k + tail KL is a lower bound, 0 <= KL_buckets <= KL, missing exactly the tail term
    # (and symmetrically for the reverse KL with q_tail).
    seed, n, v, scale = shape
    k = data.draw(st.integers(1, v - 1))
    student, teacher = random_logits(seed, n, v, scale), random_logits(seed + 1, n, v, scale)
    ids, logprobs, tail = topk64(teacher, k)
    in_tail = torch.ones(n, v, dtype=torch.bool).scatter(-1, ids, False)
    logp, logq = teacher.log_softmax(-1), student.log_softmax(-1)
    logp_t = logp.masked_fill(~in_tail, -math.inf).log_softmax(-1)  # p(. | tail)
    logq_t = logq.masked_fill(~in_tail, -math.inf).log_softmax(-1)
    kl_tail_pq = torch.where(in_tail, logp_t.exp() * (logp_t - logq_t), 0.0).sum(-1)
    kl_tail_qp = torch.where(in_tail, logq_t.exp() * (logq_t - logp_t), 0.0).sum(-1)
    q_tail = logq.masked_fill(~in_tail, -math.inf).logsumexp(-1).exp()

    fkl = forward_kl(student, ids, logprobs, tail)
    torch.testing.assert_close(fkl + tail.exp() * kl_tail_pq, full_divergence("forward", student, teacher))
    rkl = reverse_kl(student, ids, logprobs, tail)
    torch.testing.assert_close(rkl + q_tail * kl_tail_qp, full_divergence("reverse", student, teacher))
    # Any f-divergence shrinks under the bucketing (data-processing inequality).
    for name in DIVERGENCES:
        d = bucket_divergence(name, student, ids, logprobs, tail)
        assert (d >= -1e-12).all()
        assert (d <= full_divergence(name, student, teacher) + 1e-9).all()


@FAST
@given(shapes, st.data(), st.sampled_from(DIVERGENCES), st.sampled_from([0.3, 1.0, 2.5]))
def test_small_k_is_finite_and_nonnegative(shape, data, name, tau):
    seed, n, v, scale = shape
    k = data.draw(st.integers(1, v))
    student, teacher = random_logits(seed, n, v, scale, torch.float32), random_logits(seed + 1, n, v, scale)
    ids, logprobs, tail = teacher_topk(teacher, k)
    d = bucket_divergence(name, student, ids, logprobs, tail, tau)
    assert torch.isfinite(d).all()
    assert (d >= -1e-5).all()


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("k", [3, 7, 50])
def test_divergence_of_teacher_with_itself_is_zero(name, k):
    logits = random_logits(0, 6, 50, 3.0, torch.float32).requires_grad_()
    ids, logprobs, tail = teacher_topk(logits, k)
    d = bucket_divergence(name, logits, ids, logprobs, tail)
    torch.testing.assert_close(d, torch.zeros(6), atol=1e-6, rtol=0)
    d.sum().backward()
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits), atol=1e-6, rtol=0)


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("with_target", [False, True])
def test_student_buckets_gradcheck(tau, with_target):
    logits = random_logits(1, 4, 13, 2.0).requires_grad_()
    ids = torch.stack([torch.randperm(13, generator=torch.Generator().manual_seed(i))[:5] for i in range(4)])
    target = torch.tensor([0, 5, 12, int(ids[3, 0])]) if with_target else None

    def f(x):
        buckets, target_logprob = student_buckets(x, ids, tau, target)
        return (buckets, target_logprob) if with_target else buckets

    assert torch.autograd.gradcheck(f, (logits,))


def test_student_buckets_match_log_softmax():
    logits = random_logits(2, 5, 30, 4.0)
    ids = torch.stack([torch.randperm(30, generator=torch.Generator().manual_seed(i))[:6] for i in range(5)])
    target = torch.tensor([3, 4, 5, 6, 7])
    buckets, target_logprob = student_buckets(logits, ids, 1.7, target)
    # Bucketed at τ = 1, then tempered over the k+1 buckets, as the teacher's are (its record has nothing finer).
    logq = torch.log_softmax(logits, -1)
    at_1 = torch.cat([logq.gather(-1, ids), logq.scatter(-1, ids, -math.inf).logsumexp(-1, keepdim=True)], -1)
    torch.testing.assert_close(buckets, torch.log_softmax(at_1 / 1.7, -1))
    torch.testing.assert_close(target_logprob, logq.gather(-1, target[:, None]).squeeze(-1))  # CE is at τ = 1


def test_tail_does_not_underflow_when_topk_holds_nearly_everything():
    # The student's tail is 1e-60 of its mass: log(1 - Σ top-k) would give log 0 = -inf.
    logits = torch.zeros(1, 10)
    logits[0, 0] = 140.0
    buckets, _ = student_buckets(logits, torch.tensor([[0]]))
    torch.testing.assert_close(buckets[0, 1], torch.tensor(math.log(9.0) - 140.0))


def test_empty_tails_give_no_nan():
    logits = random_logits(3, 4, 8, 2.0, torch.float32).requires_grad_()
    teacher = random_logits(4, 4, 8, 2.0, torch.float32)
    # k = V: both tails empty, and a finite stored tail (rounding) must be ignored.
    ids, logprobs, tail = teacher_topk(teacher, 8)
    for name in DIVERGENCES:
        for stored_tail in (tail, torch.full_like(tail, -17.0)):
            d = bucket_divergence(name, logits, ids, logprobs, stored_tail, 2.0)
            want = full_divergence(name, logits.detach(), teacher, 2.0)
            torch.testing.assert_close(d.double(), want, rtol=1e-5, atol=1e-6)
            (grad,) = torch.autograd.grad(d.sum(), logits)
            assert torch.isfinite(grad).all()
    # k < V but the teacher's tail rounded to -inf: finite values and gradients, reverse KL included.
    ids, logprobs, tail = teacher_topk(teacher, 3)
    for name in DIVERGENCES:
        d = bucket_divergence(name, logits, ids, logprobs, torch.full_like(tail, -math.inf))
        (grad,) = torch.autograd.grad(d.sum(), logits)
        assert torch.isfinite(d).all() and torch.isfinite(grad).all()


def test_teacher_topk():
    logits = random_logits(5, 3, 7, 3.0, torch.float32).reshape(3, 1, 7)  # leading dims are kept
    ids, logprobs, tail = teacher_topk(logits, 4)
    assert ids.dtype == torch.int32 and logprobs.dtype == torch.float32
    assert ids.shape == (3, 1, 4) and tail.shape == (3, 1)
    assert (logprobs[..., :-1] >= logprobs[..., 1:]).all()
    assert all(len(set(row.tolist())) == 4 for row in ids.reshape(3, 4))
    torch.testing.assert_close(logprobs, logits.log_softmax(-1).gather(-1, ids.long()))
    total = torch.cat([logprobs, tail[..., None]], -1).logsumexp(-1)
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-6, rtol=0)
    assert torch.isneginf(teacher_topk(logits, 7)[2]).all()
    with pytest.raises(ValueError, match="k must be in"):
        teacher_topk(logits, 8)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_both_sides_are_tempered_by_the_same_function(tau, k):
    # The teacher stores top-k + tail only, so tempering happens over the k+1 buckets on both sides: a student
    # whose logits are the teacher's scores 0 at any τ, whatever the tail holds.
    logits = random_logits(11, 6, 40, 3.0, torch.float32)
    ids, logprobs, tail = teacher_topk(logits, k)
    student, _ = student_buckets(logits, ids, tau)
    torch.testing.assert_close(student, teacher_buckets(logprobs, tail, tau), rtol=1e-5, atol=1e-5)
    for name in DIVERGENCES:
        d = bucket_divergence(name, logits, ids, logprobs, tail, tau)
        torch.testing.assert_close(d, torch.zeros(6), atol=1e-5, rtol=0)


def test_teacher_buckets_tempered_as_buckets():
    logprobs, tail = (
        torch.tensor([[-0.5, -1.5]]),
        torch.tensor([math.log(1 - math.exp(-0.5) - math.exp(-1.5))]),
    )
    logp = teacher_buckets(logprobs, tail, temperature=2.0)
    want = torch.log_softmax(torch.cat([logprobs, tail[:, None]], -1) / 2.0, -1)
    torch.testing.assert_close(logp, want)
    assert torch.isneginf(teacher_buckets(logprobs, tail, empty_tail=True)[0, -1])


def test_cross_entropy_is_full_vocab_nll():
    logits, target = random_logits(6, 4, 9, 2.0), torch.tensor([0, 3, 8, 1])
    want = -logits.log_softmax(-1).gather(-1, target[:, None]).squeeze(-1)
    torch.testing.assert_close(cross_entropy(logits, target), want.float())


# --- distillation_loss ------------------------------------------------------------------------------


def make_batch(seed=0, B=3, T=9, V=17, K=4, reason_frac=0.5, act_frac=0.3, dtype=torch.float64):
    """A batch following docs/design.md: masks, and teacher rows for the supervised tokens in row order."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(B, T, generator=g)
    reason = u < reason_frac
    act = (u >= reason_frac) & (u < reason_frac + act_frac)
    reason[:, 0] = act[:, 0] = False
    input_ids = torch.randint(0, V, (B, T), generator=g)
    student = (torch.randn(B, T, V, generator=g) * 2).to(dtype).requires_grad_()
    teacher = torch.randn(B, T, V, generator=g) * 2
    sup = reason | act
    ids, logprobs, tail = teacher_topk(teacher[:, :-1][sup[:, 1:]], K)
    return dict(
        student_logits=student, input_ids=input_ids, reason_mask=reason, act_mask=act,
        topk_ids=ids, topk_logprobs=logprobs, tail_logprob=tail,
    )  # fmt: skip


def per_row(batch, name="forward", tau=1.0):
    """The per-token divergence of each supervised row, gathered the way design.md says."""
    sup = batch["reason_mask"] | batch["act_mask"]
    rows = batch["student_logits"][:, :-1][sup[:, 1:]]
    d = bucket_divergence(name, rows, batch["topk_ids"], batch["topk_logprobs"], batch["tail_logprob"], tau)
    return d, batch["reason_mask"][:, 1:][sup[:, 1:]]


@pytest.mark.parametrize("name", DIVERGENCES)
def test_alignment_and_span_means(name):
    batch = make_batch()
    out = distillation_loss(**batch, cfg=LossConfig(divergence=name, temperature=1.5))
    d, is_reason = per_row(batch, name, 1.5)
    torch.testing.assert_close(out.loss_cot, d[is_reason].mean().detach())
    torch.testing.assert_close(out.loss_act, d[~is_reason].mean().detach())
    assert (out.n_reason, out.n_act) == (int(is_reason.sum()), int((~is_reason).sum()))
    torch.testing.assert_close(out.loss, out.loss_cot + out.loss_act)


def test_objectives_select_the_right_combination():
    batch = make_batch(1)
    d, is_reason = per_row(batch)
    cot, act, all_ = d[is_reason].mean(), d[~is_reason].mean(), d.mean()
    sup = batch["reason_mask"] | batch["act_mask"]
    ce = F.cross_entropy(batch["student_logits"][:, :-1][sup[:, 1:]], batch["input_ids"][:, 1:][sup[:, 1:]])

    def loss(**cfg):
        return distillation_loss(**batch, cfg=LossConfig(**cfg)).loss

    cfg = LossConfig()
    assert (
        cfg.objective == "sad" and cfg.divergence == "forward" and cfg.lambda_reason == cfg.lambda_act == 1.0
    )
    torch.testing.assert_close(loss(), cot + act)
    torch.testing.assert_close(loss(lambda_reason=0.3, lambda_act=2.0), 0.3 * cot + 2.0 * act)
    torch.testing.assert_close(loss(objective="reason_only"), cot)
    torch.testing.assert_close(loss(objective="act_only"), act)
    torch.testing.assert_close(loss(objective="token_kd"), all_)
    torch.testing.assert_close(loss(objective="no_segmentation"), all_)
    torch.testing.assert_close(loss(objective="sft"), ce)
    torch.testing.assert_close(loss(ce_weight=0.5), cot + act + 0.5 * ce)
    torch.testing.assert_close(loss(objective="token_kd", ce_weight=0.5), all_ + 0.5 * ce)
    rkl, _ = per_row(batch, "reverse")
    torch.testing.assert_close(loss(objective="token_kd", divergence="reverse"), rkl.mean())
    # Token-level KD weights spans by token count; SAD gives each span its own mean.
    assert not torch.allclose(loss(objective="token_kd"), loss() / 2)


@pytest.mark.parametrize("objective", ["sad", "token_kd", "sft", "act_only"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_span_losses_and_ce_are_logged_for_every_objective(objective, tau):
    batch = make_batch(2)
    ref = distillation_loss(**batch, cfg=LossConfig(temperature=tau))
    out = distillation_loss(**batch, cfg=LossConfig(objective=objective, temperature=tau))
    for field in ("loss_cot", "loss_act", "loss_ce"):
        value = getattr(out, field)
        assert not value.requires_grad and value.ndim == 0
        torch.testing.assert_close(value, getattr(ref, field))
    assert out.loss.requires_grad
    assert set(out.metrics()) == {"loss", "loss_cot", "loss_act", "loss_ce", "n_reason", "n_act"}


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_ce_gradient_matches_torch(tau):
    batch = make_batch(3)
    out = distillation_loss(**batch, cfg=LossConfig(objective="sft", temperature=tau))
    (got,) = torch.autograd.grad(out.loss, batch["student_logits"])
    sup = batch["reason_mask"] | batch["act_mask"]
    ce = F.cross_entropy(batch["student_logits"][:, :-1][sup[:, 1:]], batch["input_ids"][:, 1:][sup[:, 1:]])
    (want,) = torch.autograd.grad(ce, batch["student_logits"])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_loss_gradient_matches_plain_autograd(name):
    # The custom backward against autograd through log_softmax + masked logsumexp, in float64.
    batch = make_batch(4)
    cfg = LossConfig(divergence=name, temperature=0.7, lambda_reason=0.4, ce_weight=0.3)
    (got,) = torch.autograd.grad(distillation_loss(**batch, cfg=cfg).loss, batch["student_logits"])

    sup = batch["reason_mask"] | batch["act_mask"]
    rows = batch["student_logits"][:, :-1][sup[:, 1:]]
    ids = batch["topk_ids"].long()
    logq = torch.log_softmax(rows, -1)
    logq_b = torch.cat(
        [logq.gather(-1, ids), logq.scatter(-1, ids, -math.inf).logsumexp(-1, keepdim=True)], -1
    )
    logq_b = torch.log_softmax(logq_b / 0.7, -1)  # tempered over the buckets, like the teacher below
    logp_b = torch.cat([batch["topk_logprobs"], batch["tail_logprob"][:, None]], -1).double()
    logp_b = torch.log_softmax(logp_b / 0.7, -1)
    p, q = logp_b.exp(), logq_b.exp()
    if name == "forward":
        d = (p * (logp_b - logq_b)).sum(-1)
    elif name == "reverse":
        d = (q * (logq_b - logp_b)).sum(-1)
    else:
        m = (0.5 * p + 0.5 * q).log()
        d = 0.5 * (p * (logp_b - m)).sum(-1) + 0.5 * (q * (logq_b - m)).sum(-1)
    d = 0.7**2 * d
    is_reason = batch["reason_mask"][:, 1:][sup[:, 1:]]
    ce = -torch.log_softmax(rows, -1).gather(-1, batch["input_ids"][:, 1:][sup[:, 1:]][:, None]).mean()
    loss = 0.4 * d[is_reason].mean() + d[~is_reason].mean() + 0.3 * ce
    (want,) = torch.autograd.grad(loss, batch["student_logits"])
    torch.testing.assert_close(got, want)


def test_loss_cot_depends_only_on_reason_positions():
    batch = make_batch(5)
    base = distillation_loss(**batch)
    sup = batch["reason_mask"] | batch["act_mask"]
    predicts_act = torch.zeros_like(sup)
    predicts_act[:, :-1] = batch["act_mask"][:, 1:]
    predicts_reason = torch.zeros_like(sup)
    predicts_reason[:, :-1] = batch["reason_mask"][:, 1:]
    noise = torch.randn(batch["student_logits"].shape, dtype=torch.float64) * 5

    with torch.no_grad():
        perturbed = batch["student_logits"] + noise * predicts_act[..., None]
    out = distillation_loss(**{**batch, "student_logits": perturbed})
    torch.testing.assert_close(out.loss_cot, base.loss_cot)
    assert not torch.allclose(out.loss_act, base.loss_act)

    with torch.no_grad():
        perturbed = batch["student_logits"] + noise * predicts_reason[..., None]
    out = distillation_loss(**{**batch, "student_logits": perturbed})
    torch.testing.assert_close(out.loss_act, base.loss_act)
    assert not torch.allclose(out.loss_cot, base.loss_cot)

    # Rows that predict unsupervised tokens (and the last row) get no gradient.
    base.loss.backward()
    unused = ~(predicts_act | predicts_reason)
    assert (batch["student_logits"].grad[unused] == 0).all()
    assert (batch["student_logits"].grad[~unused].abs().sum(-1) > 0).all()


def test_gradients_flow_only_to_the_student():
    batch = make_batch(6)
    batch["topk_logprobs"].requires_grad_()
    batch["tail_logprob"].requires_grad_()
    distillation_loss(**batch, cfg=LossConfig(divergence="jsd")).loss.backward()
    assert batch["topk_logprobs"].grad is None and batch["tail_logprob"].grad is None
    assert batch["student_logits"].grad is not None


def test_backward_can_run_twice():
    # e.g. comparing the gradients of the two spans with retain_graph.
    batch = make_batch(7)
    loss = distillation_loss(**batch).loss
    (first,) = torch.autograd.grad(loss, batch["student_logits"], retain_graph=True)
    (second,) = torch.autograd.grad(loss, batch["student_logits"])
    torch.testing.assert_close(first, second)


@pytest.mark.parametrize("objective", ["sad", "token_kd", "reason_only", "act_only", "sft"])
def test_empty_masks_give_zero_not_nan(objective):
    batch = make_batch(8, act_frac=0.0)
    out = distillation_loss(**batch, cfg=LossConfig(objective=objective))
    assert out.n_act == 0 and out.loss_act == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(batch["student_logits"].grad).all()

    batch = make_batch(8, reason_frac=0.0, act_frac=0.0)
    out = distillation_loss(**batch, cfg=LossConfig(objective=objective))
    assert (out.n_reason, out.n_act) == (0, 0)
    assert out.loss == 0 and out.loss_cot == 0 and out.loss_act == 0 and out.loss_ce == 0
    out.loss.backward()
    assert (batch["student_logits"].grad == 0).all()


def test_mismatched_teacher_rows_are_a_clear_error():
    batch = make_batch(9)
    n = batch["topk_ids"].shape[0]
    short = {**batch, "topk_ids": batch["topk_ids"][:-1], "topk_logprobs": batch["topk_logprobs"][:-1]}
    with pytest.raises(ValueError, match=rf"{n} supervised tokens.*\[{n - 1}, 4\]"):
        distillation_loss(**short)
    with pytest.raises(ValueError, match="tail_logprob"):
        distillation_loss(**{**batch, "tail_logprob": batch["tail_logprob"][:-1]})
    bad = batch["reason_mask"].clone()
    bad[0, 0] = True
    with pytest.raises(ValueError, match="position 0"):
        distillation_loss(**{**batch, "reason_mask": bad})
    with pytest.raises(ValueError, match="both reason_mask and act_mask"):
        distillation_loss(**{**batch, "act_mask": batch["act_mask"] | batch["reason_mask"]})


def test_vocab_size_ignores_padding_rows():
    batch = make_batch(10, V=17)
    padded = torch.cat(
        [batch["student_logits"].detach(), torch.full((3, 9, 7), 50.0, dtype=torch.float64)], -1
    )
    for divergence in DIVERGENCES:
        cfg = LossConfig(divergence=divergence, ce_weight=1.0)
        want = distillation_loss(**batch, cfg=cfg)
        got = distillation_loss(**{**batch, "student_logits": padded}, cfg=cfg, vocab_size=17)
        torch.testing.assert_close(got.loss, want.loss)
        torch.testing.assert_close(got.loss_ce, want.loss_ce)
    with pytest.raises(ValueError, match="vocab_size"):
        distillation_loss(**batch, vocab_size=18)


def test_bfloat16_logits():
    batch = make_batch(11, dtype=torch.bfloat16)
    out = distillation_loss(**batch)
    out.loss.backward()
    assert batch["student_logits"].grad.dtype == torch.bfloat16
    ref = distillation_loss(**{**batch, "student_logits": batch["student_logits"].detach().double()})
    torch.testing.assert_close(out.loss.double(), ref.loss, rtol=1e-5, atol=1e-6)


def split_batch(batch, parts):
    """The rows of `batch` in `parts` (lists of row indices), each with its own teacher rows."""
    sup = (batch["reason_mask"] | batch["act_mask"])[:, 1:]
    owner = torch.arange(sup.shape[0])[:, None].expand_as(sup)[sup]  # [N] the row of each teacher row
    out = []
    for rows in parts:
        rows_t = torch.tensor(rows)
        keep = torch.isin(owner, rows_t)
        out.append({
            "student_logits": batch["student_logits"][rows_t], "input_ids": batch["input_ids"][rows_t],
            "reason_mask": batch["reason_mask"][rows_t], "act_mask": batch["act_mask"][rows_t],
            "topk_ids": batch["topk_ids"][keep], "topk_logprobs": batch["topk_logprobs"][keep],
            "tail_logprob": batch["tail_logprob"][keep]})
    return out


@pytest.mark.parametrize("objective", ["sad", "token_kd", "reason_only", "sft"])
def test_shares_of_a_step_add_up_to_the_step_whatever_the_split(objective):
    # Micro-batches (or ranks) normalised by the whole step's span counts: their losses and gradients add up to
    # the loss and gradient of the step taken as one batch, so grad_accum and the worker count change nothing.
    from sad_ray.method.losses import span_counts

    batch = make_batch(12, B=4, reason_frac=0.6, act_frac=0.2)
    cfg = LossConfig(objective=objective, lambda_reason=0.3, lambda_act=2.0, ce_weight=0.1)
    whole = distillation_loss(**batch, cfg=cfg)
    (want,) = torch.autograd.grad(whole.loss, batch["student_logits"])
    counts = span_counts(batch["reason_mask"], batch["act_mask"])
    parts = split_batch(batch, [[0], [1, 2], [3]])
    outs = [distillation_loss(**p, cfg=cfg, counts=counts) for p in parts]
    torch.testing.assert_close(sum(o.loss for o in outs), whole.loss)
    torch.testing.assert_close(sum(o.loss_cot for o in outs), whole.loss_cot)
    (got,) = torch.autograd.grad(sum(o.loss for o in outs), batch["student_logits"])
    torch.testing.assert_close(got, want)
    # Each part's own mean, as before, would weigh the lone examples' tokens more.
    alone = sum(distillation_loss(**p, cfg=cfg).loss for p in parts) / len(parts)
    assert not torch.allclose(alone, whole.loss)
    with pytest.raises(ValueError, match="fewer than this batch's own"):
        distillation_loss(**batch, cfg=cfg, counts=counts._replace(n_act=0))


@pytest.mark.parametrize("objective", ["sad", "reason_only", "act_only", "token_kd", "sft"])
def test_per_example_is_each_examples_own_objective(objective):
    batch = make_batch(5, B=4)
    cfg = LossConfig(objective=objective, lambda_reason=0.5, lambda_act=2.0, ce_weight=0.25)
    out = distillation_loss(**batch, cfg=cfg)
    assert out.per_example.shape == (4,) and not out.per_example.requires_grad
    alone = torch.stack([distillation_loss(**p, cfg=cfg).loss.detach() for p in split_batch(batch, [[b] for b in range(4)])])
    torch.testing.assert_close(out.per_example, alone.to(out.per_example.dtype))


def test_reason_only_reweights_on_reason_tokens_alone():
    # The curriculum's signal is the loss being trained: under reason_only, act tokens must not move it.
    batch = make_batch(13, B=3)
    cfg = LossConfig(objective="reason_only")
    base = distillation_loss(**batch, cfg=cfg).per_example
    predicts_act = F.pad(batch["act_mask"][:, 1:], (0, 1))
    with torch.no_grad():
        noisy = batch["student_logits"] + 5 * torch.randn(batch["student_logits"].shape, dtype=torch.float64) * \
            predicts_act[..., None]
    torch.testing.assert_close(distillation_loss(**{**batch, "student_logits": noisy}, cfg=cfg).per_example, base)
    assert not torch.allclose(distillation_loss(**{**batch, "student_logits": noisy}, cfg=LossConfig()).per_example,
                              distillation_loss(**batch, cfg=LossConfig()).per_example)


# --- LossConfig -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"objective": "sadd"}, r"objective must be one of 'sad', 'reason_only', .*'sft', got 'sadd'"),
        ({"divergence": "kl"}, r"divergence must be one of 'forward', 'reverse', 'jsd', got 'kl'"),
        ({"lambda_reason": -0.1}, "lambda_reason"),
        ({"lambda_act": -1.0}, "lambda_act"),
        ({"ce_weight": -0.5}, "ce_weight"),
        ({"ce_weight": math.nan}, "ce_weight"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"beta": 0.0}, "beta"),
        ({"beta": 1.0}, "beta"),
        ({"beta": 1.5}, "beta"),
    ],
)
def test_loss_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**kwargs)
