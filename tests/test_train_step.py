"""The training step as the trainer runs it (torch only, no Ray): collate, the supervised-rows head, the loss of a
student equal to its teacher, and an objective that does not depend on grad_accum or the number of workers."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from sad_ray.method.losses import LossConfig, teacher_topk
from sad_ray.records import TrajectoryRecord
from sad_ray.train.step import SupervisedHead, collate, forward_loss, train_step

VOCAB = 64


def tiny_lm(seed: int = 0):
    """A real (randomly initialised) Llama small enough to train in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      initializer_range=0.3))  # peaked distributions, unlike the 0.02 default
    lm.config.use_cache = False
    return lm


def spans(length: int, rng: np.random.Generator, act_share: float) -> tuple[np.ndarray, np.ndarray]:
    kind = rng.choice(3, size=length, p=[0.3, 0.7 * (1 - act_share), 0.7 * act_share])
    kind[0] = 0
    kind[1] = 1
    return kind == 1, kind == 2


def teacher_records(teacher, n: int, k: int = 8, seed: int = 0) -> list[TrajectoryRecord]:
    """Records whose teacher rows are `teacher`'s own top-k and tail at every supervised position. Lengths and
    span shares differ a lot between records, so per-micro-batch means would weigh tokens unequally."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(10, 40))
        reason, act = spans(length, rng, act_share=[0.1, 0.9, 0.5, 0.3][i % 4])
        ids = rng.integers(0, VOCAB, size=length).astype(np.int32)
        with torch.no_grad():
            logits = teacher(input_ids=torch.as_tensor(ids[None], dtype=torch.long)).logits[0, :-1]
        sup = torch.as_tensor((reason | act)[1:])
        top_ids, top_lp, tail = teacher_topk(logits[sup], k)
        out.append(TrajectoryRecord(
            id=f"r{i}", env="alfworld", task_type="pick", split="train", turns=({"role": "user", "content": "x"},),
            input_ids=ids, reason_mask=reason, act_mask=act, topk_ids=top_ids.numpy(), topk_logprobs=top_lp.numpy(),
            tail_logprob=tail.numpy(), success=True, reward=1.0, steps=1, teacher_entropy=1.0,
            teacher_model="tiny", tokenizer_fingerprint="tiny"))
    return out


def test_collate_pads_and_keeps_teacher_rows_in_record_order():
    recs = teacher_records(tiny_lm(), 2)
    batch = collate(recs, pad_id=0)
    T = max(len(r.input_ids) for r in recs)
    assert batch["input_ids"].shape == (2, T)
    n = [int(r.supervised.sum()) for r in recs]
    assert batch["topk_ids"].shape == (sum(n), 8)
    torch.testing.assert_close(batch["topk_logprobs"][: n[0]], torch.from_numpy(recs[0].topk_logprobs))
    assert not batch["reason_mask"][1, len(recs[1].input_ids):].any()


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.0, 0.5])
def test_a_student_equal_to_its_teacher_scores_zero_at_any_temperature(divergence, tau):
    teacher = tiny_lm()
    batch = collate(teacher_records(teacher, 4), pad_id=0)
    student = SupervisedHead(copy.deepcopy(teacher))
    out = forward_loss(student, batch, LossConfig(divergence=divergence, temperature=tau), VOCAB, precision="fp32")
    assert abs(float(out.loss.detach())) < 1e-5 and abs(float(out.loss_cot)) < 1e-5 and abs(float(out.loss_act)) < 1e-5
    # and a different student does not
    other = forward_loss(SupervisedHead(tiny_lm(seed=1)), batch, LossConfig(divergence=divergence, temperature=tau),
                         VOCAB, precision="fp32")
    assert float(other.loss.detach()) > 1e-2


def test_the_head_on_supervised_rows_only_gives_the_full_forward_loss_and_gradients():
    from sad_ray.method.losses import distillation_loss

    lm = tiny_lm(seed=2)
    batch = collate(teacher_records(tiny_lm(), 3), pad_id=0)
    head = SupervisedHead(lm)
    out = forward_loss(head, batch, LossConfig(), VOCAB, precision="fp32")
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    full = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = distillation_loss(full, batch["input_ids"], batch["reason_mask"], batch["act_mask"], batch["topk_ids"],
                            batch["topk_logprobs"], batch["tail_logprob"], LossConfig())
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    for n, p in lm.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)


def one_step(lm, micro_batches, cfg: LossConfig):
    """One SGD step at lr 1 without clipping: the parameter change is minus the step's gradient."""
    opt = torch.optim.SGD(lm.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return train_step(SupervisedHead(lm), micro_batches, cfg, vocab_size=VOCAB, precision="fp32", optimizer=opt,
                      scheduler=sched, grad_clip=1e9)


OBJECTIVES = [LossConfig(objective="sad", lambda_reason=1.0, lambda_act=3.0), LossConfig(objective="token_kd"),
              LossConfig(objective="sft"), LossConfig(objective="act_only", ce_weight=0.5)]


@pytest.mark.parametrize("cfg", OBJECTIVES, ids=lambda c: c.objective)
def test_grad_accum_does_not_change_the_loss_or_the_gradients(cfg):
    recs = teacher_records(tiny_lm(), 4)
    a, b = tiny_lm(seed=3), tiny_lm(seed=3)
    whole = one_step(a, [collate(recs, 0)], cfg)
    split = one_step(b, [collate(recs[:2], 0), collate(recs[2:], 0)], cfg)
    assert (whole.n_reason, whole.n_act) == (split.n_reason, split.n_act)
    assert whole.loss == pytest.approx(split.loss, rel=1e-5)
    assert whole.loss_cot == pytest.approx(split.loss_cot, rel=1e-5)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg: LossConfig, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        recs = teacher_records(tiny_lm(), 4)
        lm = tiny_lm(seed=3)
        model = DistributedDataParallel(SupervisedHead(lm))
        opt = torch.optim.SGD(lm.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        mine = recs[rank * 2:(rank + 1) * 2]
        res = train_step(model, [collate(mine, 0)], cfg, vocab_size=VOCAB, precision="fp32", optimizer=opt,
                         scheduler=sched, grad_clip=1e9)
        if rank == 0:
            torch.save({"params": {n: p.detach() for n, p in lm.named_parameters()}, "loss": res.loss}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cfg", OBJECTIVES[:2], ids=lambda c: c.objective)
def test_two_ddp_workers_give_the_loss_and_gradients_of_one(cfg, tmp_path):
    recs = teacher_records(tiny_lm(), 4)
    single = tiny_lm(seed=3)
    want = one_step(single, [collate(recs, 0)], cfg)
    out = str(tmp_path / "rank0.pt")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), cfg, out), nprocs=2, join=True)
    got = torch.load(out)
    assert got["loss"] == pytest.approx(want.loss, rel=1e-5)
    for name, p in single.named_parameters():
        torch.testing.assert_close(got["params"][name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("objective", ["sad", "reason_only", "act_only", "token_kd", "sft"])
def test_per_example_losses_are_each_examples_own_objective(objective):
    recs = teacher_records(tiny_lm(), 4)
    student = SupervisedHead(tiny_lm(seed=4))
    cfg = LossConfig(objective=objective, lambda_reason=0.5, lambda_act=2.0)
    out = forward_loss(student, collate(recs, 0), cfg, VOCAB, precision="fp32")
    alone = [float(forward_loss(student, collate([r], 0), cfg, VOCAB, precision="fp32").loss) for r in recs]
    np.testing.assert_allclose(out.per_example.numpy(), alone, rtol=1e-5)


def test_the_curriculum_moves_its_weights_toward_the_examples_the_student_trains_worst_on():
    from sad_ray.method.curriculum import CurriculumConfig, CurriculumSampler
    from sad_ray.train.step import curriculum_step

    student = tiny_lm(seed=5)
    # Easy records: the teacher is the student itself (loss 0); hard ones come from another model.
    recs = teacher_records(copy.deepcopy(student), 4, seed=1) + teacher_records(tiny_lm(seed=6), 4, seed=2)
    sampler = CurriculumSampler(np.zeros(len(recs)), CurriculumConfig(c0=1.0, ramp=0.0, temperature=0.5), 4, 10)
    _, p0 = sampler.probabilities()
    np.testing.assert_allclose(p0, 1 / 8)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)  # lr 0: the losses stay put, only the weights move
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for _ in range(4):
        curriculum_step(SupervisedHead(student), sampler, recs, 2, 0, LossConfig(objective="act_only"),
                        vocab_size=VOCAB, precision="fp32", optimizer=opt, scheduler=sched)
    idx, p = sampler.probabilities()
    weight = dict(zip(idx.tolist(), p.tolist(), strict=True))
    seen = ~np.isnan(sampler.running_loss)
    hard_seen = [i for i in range(4, 8) if seen[i]]
    easy_seen = [i for i in range(4) if seen[i]]
    assert hard_seen and easy_seen
    assert min(weight[i] for i in hard_seen) > max(weight[i] for i in easy_seen)
    assert all(sampler.running_loss[i] < 1e-5 for i in easy_seen)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_the_memory_watch_tells_a_process_own_pages_from_shared_memory():
    """A private buffer raises the own peak and not the shared one; a shared-memory block the reverse."""
    import time
    from multiprocessing import shared_memory

    from sad_ray.train.step import MemoryWatch

    watch = MemoryWatch(interval=0.01)
    base = dict(watch.peaks)
    private = np.ones(256 * 2**20 // 8)  # 256 MiB, every page touched
    time.sleep(0.1)
    assert watch.sample()["own"] - base["own"] > 0.2 and watch.peaks["shared"] - base["shared"] < 0.05
    del private
    block = shared_memory.SharedMemory(create=True, size=128 * 2**20)
    view = np.ndarray((block.size,), np.uint8, block.buf)
    try:
        view[:] = 1
        time.sleep(0.1)
        assert watch.sample()["shared"] - base["shared"] > 0.1
    finally:
        del view
        block.close()
        block.unlink()
        watch.stop()
