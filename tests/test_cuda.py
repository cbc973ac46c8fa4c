"""One training step of the method on a CUDA device, with torch alone (no Ray, no vLLM, no transformers), so that a
bare PyTorch GPU box runs it: `python -m pytest tests/test_cuda.py`. Skipped, and reported as skipped, without a GPU.

It guards the GPU path of the trainer: per-example losses built on the GPU and handed to the curriculum on the
CPU, the span counts, autocast on CUDA in the precision `auto` picks there, and peak memory read from CUDA.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

VOCAB, HIDDEN = 96, 32


class TinyCausalLM(torch.nn.Module):
    """Just what `SupervisedHead` reads of a Hugging Face causal LM: config, get_decoder(), get_output_embeddings()."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=VOCAB)
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        layer = torch.nn.TransformerEncoderLayer(HIDDEN, 4, 64, dropout=0.0, batch_first=True)
        self.body = torch.nn.TransformerEncoder(layer, 2)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
        outer = self

        class Decoder(torch.nn.Module):
            def forward(self, input_ids, attention_mask):
                T = input_ids.shape[1]
                causal = torch.nn.Transformer.generate_square_subsequent_mask(T, device=input_ids.device)
                hidden = outer.body(outer.embed(input_ids), mask=causal, is_causal=True)
                return SimpleNamespace(last_hidden_state=hidden)

        self._decoder = Decoder()

    def get_decoder(self):
        return self._decoder

    def get_output_embeddings(self):
        return self.head


def test_one_training_step_of_the_method_on_cuda():
    from sad_ray.method.curriculum import CurriculumConfig, CurriculumSampler
    from sad_ray.method.losses import LossConfig, teacher_topk
    from sad_ray.precision import resolve_precision
    from sad_ray.train.step import SupervisedHead, peak_memory_gb, train_step

    device = torch.device("cuda")
    torch.manual_seed(0)
    model = SupervisedHead(TinyCausalLM()).to(device)
    B, T = 4, 24
    ids = torch.randint(0, VOCAB, (B, T))
    reason = torch.zeros(B, T, dtype=torch.bool)
    act = torch.zeros(B, T, dtype=torch.bool)
    reason[:, 2:12] = True
    act[:, 14:18] = True
    n = int((reason | act)[:, 1:].sum())
    top_ids, top_lp, tail = teacher_topk(torch.randn(n, VOCAB) * 3, 10)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "reason_mask": reason, "act_mask": act,
             "topk_ids": top_ids.long(), "topk_logprobs": top_lp, "tail_logprob": tail}  # on the CPU, as collated
    precision = resolve_precision("auto", "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    before = [p.detach().clone() for p in model.parameters()]
    out = train_step(model, [batch], LossConfig(objective="sad"), vocab_size=VOCAB, precision=precision,
                     optimizer=opt, scheduler=sched, scaler=scaler)
    assert np.isfinite(out.loss) and out.loss > 0 and out.n_reason + out.n_act == n
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert isinstance(out.per_example, np.ndarray) and out.per_example.shape == (B,)
    sampler = CurriculumSampler(np.zeros(B), CurriculumConfig(c0=1.0, ramp=0.0), B, 1)
    sampler.update(np.arange(B), out.per_example)  # the curriculum lives on the CPU
    assert 0 < peak_memory_gb(device) < torch.cuda.get_device_properties(device).total_memory / 2**30
