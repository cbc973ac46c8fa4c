"""The single-process SAD training loop: collation alignment and a loss that falls on fixed data."""

from __future__ import annotations

import numpy as np
import torch

from sad_ray.method.curriculum import CurriculumConfig
from sad_ray.method.losses import LossConfig
from tests.test_records import make_record


def test_collate_lines_teacher_rows_up_with_the_masks():
    from sad_ray.train.local import collate

    recs = [make_record("a", seed=1, length=10), make_record("b", seed=2, length=14)]
    batch = collate(recs, pad_id=0)
    assert batch["input_ids"].shape == (2, 14)
    assert not batch["reason_mask"][0, 10:].any() and not batch["act_mask"][0, 10:].any()
    sup = (batch["reason_mask"] | batch["act_mask"])[:, 1:]
    assert int(sup.sum()) == batch["topk_ids"].shape[0] == batch["tail_logprob"].shape[0]
    # The rows of record b follow the rows of record a.
    n_a = int(recs[0].supervised.sum())
    np.testing.assert_array_equal(batch["topk_ids"][n_a:].numpy(), recs[1].topk_ids)
    assert batch["row_example"].tolist() == [0] * n_a + [1] * int(recs[1].supervised.sum())


def test_training_lowers_the_loss_on_fixed_data(tmp_path, starter_dir, starter_tokenizer):
    from sad_ray.envs.seed import seed_episodes
    from sad_ray.models.student import build_student
    from sad_ray.models.tokenizers import tokenizer_fingerprint
    from sad_ray.rollout.engines import HFTeacherEngine
    from sad_ray.rollout.score import score_episodes
    from sad_ray.train.local import SupervisedHead, collate, forward_loss, train_local

    torch.set_num_threads(2)
    student_dir = build_student(starter_dir, tmp_path / "student", 2).path
    episodes = seed_episodes(4)
    records = list(score_episodes(episodes, starter_tokenizer, HFTeacherEngine(starter_dir), fmt="react",
                                  top_k=8, fingerprint=tokenizer_fingerprint(starter_tokenizer)))
    cfg = LossConfig()
    seen = []
    model, summary = train_local(records, student_dir, cfg, CurriculumConfig(ramp_steps=0), steps=8, batch_size=4,
                                 lr=5e-4, vocab_size=49152, on_metrics=lambda m, s: seen.append(m))
    assert len(seen) == 8 and all(np.isfinite(m["loss"]) for m in seen)
    batch = collate(records, starter_tokenizer.pad_token_id)
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    with torch.no_grad():
        loss_before = float(forward_loss(SupervisedHead(before), batch, cfg, 49152).loss)
        loss_after = float(forward_loss(SupervisedHead(model), batch, cfg, 49152).loss)
    assert loss_after < 0.7 * loss_before, (loss_before, loss_after)


def test_the_head_on_supervised_rows_only_gives_the_full_forward_loss_and_gradients(tmp_path, starter_dir):
    from transformers import AutoModelForCausalLM

    from sad_ray.models.student import build_student
    from sad_ray.train.local import SupervisedHead, collate, forward_loss

    student_dir = build_student(starter_dir, tmp_path / "student", 2).path
    records = [make_record(f"r{i}", seed=i, length=40, vocab=49152, k=5) for i in range(3)]
    batch = collate(records, pad_id=0)
    cfg = LossConfig()
    results = []
    for rows_only in (True, False):
        torch.manual_seed(0)
        model = SupervisedHead(AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32))
        assert model.rows_only  # a Llama-style model qualifies
        model.rows_only = rows_only
        out = forward_loss(model, batch, cfg, 49152, bf16=False)
        out.loss.backward()
        grad = model.lm.get_input_embeddings().weight.grad.clone()
        results.append((float(out.loss), grad))
    assert abs(results[0][0] - results[1][0]) < 1e-5 * max(1.0, abs(results[1][0]))
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, starter_dir):
    """train.gradient_checkpointing recomputes activations in backward: the run must stay the same run."""
    from transformers import AutoModelForCausalLM

    from sad_ray.models.student import build_student
    from sad_ray.train.local import SupervisedHead, collate, forward_loss

    student_dir = build_student(starter_dir, tmp_path / "student", 2).path
    batch = collate([make_record(f"r{i}", seed=i, length=40, vocab=49152, k=5) for i in range(3)], pad_id=0)
    results = []
    for checkpointing in (False, True):
        lm = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
        lm.config.use_cache = False
        if checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = SupervisedHead(lm).train()
        out = forward_loss(model, batch, LossConfig(), 49152, bf16=False)
        out.loss.backward()
        layer = model.lm.get_decoder().layers[0].mlp.down_proj.weight.grad
        assert layer is not None and layer.abs().sum() > 0
        results.append((float(out.loss), layer.clone(), lm.is_gradient_checkpointing))
    assert results[1][2] and not results[0][2]
    assert abs(results[0][0] - results[1][0]) < 1e-6 * max(1.0, abs(results[0][0]))
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-7)
