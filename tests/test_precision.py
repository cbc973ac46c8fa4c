"""One precision setting: `auto` decided from given hardware (not the machine the test runs on), and the setting
reaching training autocast and the engines."""

from __future__ import annotations

import pytest
import torch

from sad_ray.config import ConfigError, load_config
from sad_ray.precision import BF16_CPU_FLAGS, resolve_precision

# Flags as /proc/cpuinfo lists them on the two kinds of CPU this project has run on (shared/STACK.md).
AMD_EPYC_AVX2 = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
XEON_AVX512_BF16 = AMD_EPYC_AVX2 | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (AMD_EPYC_AVX2, "fp32"),  # bf16 is emulated there: 20x+ slower to train
        (AMD_EPYC_AVX2 | {"avx512f", "avx512bw"}, "fp32"),  # AVX-512 without its bf16 extension
        (XEON_AVX512_BF16, "bf16"),
        (AMD_EPYC_AVX2 | {"avx512_bf16"}, "bf16"),
        (AMD_EPYC_AVX2 | {"amx_bf16"}, "bf16"),
        (set(), "fp32"),  # flags unreadable
    ],
)
def test_auto_picks_bf16_only_on_cpus_that_run_it_natively(flags, expected):
    assert resolve_precision("auto", "cpu", flags=flags) == expected


def test_auto_on_cuda_follows_the_devices_bf16_support():
    assert resolve_precision("auto", "cuda", cuda_bf16=True) == "bf16"
    assert resolve_precision("auto", "cuda", cuda_bf16=False) == "fp32"


@pytest.mark.parametrize("setting", ["bf16", "fp16", "fp32"])
def test_an_explicit_precision_is_kept_whatever_the_hardware(setting):
    assert resolve_precision(setting, "cpu", flags=AMD_EPYC_AVX2) == setting
    assert resolve_precision(setting, "cuda", cuda_bf16=False) == setting


def test_the_bf16_flags_are_the_ones_the_kernel_reports():
    assert BF16_CPU_FLAGS == {"avx512_bf16", "amx_bf16"}


def test_precision_is_one_top_level_setting():
    assert load_config(None, ["precision=fp32"]).precision == "fp32"
    assert load_config(None).precision == "auto"
    with pytest.raises(ConfigError, match=r"precision must be one of 'auto', 'bf16', 'fp16', 'fp32', got 'float32'"):
        load_config(None, ["precision=float32"])
    # Engines take no dtype of their own any more: the one setting decides.
    with pytest.raises(ConfigError, match=r"unknown key rollout\.engine\.dtype"):
        load_config(None, ["rollout.engine.dtype=bfloat16"])
    with pytest.raises(ConfigError, match=r"unknown key train\.bf16"):
        load_config(None, ["train.bf16=true"])


def tiny_lm(vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def test_training_autocast_follows_the_precision():
    from sad_ray.method.losses import LossConfig, teacher_topk
    from sad_ray.train.step import SupervisedHead, forward_loss

    head = SupervisedHead(tiny_lm())
    ids = torch.randint(0, 64, (2, 12))
    reason = torch.zeros(2, 12, dtype=torch.bool)
    reason[:, 3:8] = True
    act = torch.zeros(2, 12, dtype=torch.bool)
    act[:, 9:12] = True
    sup = (reason | act)[:, 1:]
    top_ids, top_lp, tail = teacher_topk(torch.randn(int(sup.sum()), 64), 8)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "reason_mask": reason, "act_mask": act,
             "topk_ids": top_ids.long(), "topk_logprobs": top_lp, "tail_logprob": tail}
    seen = []
    hook = head.lm.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    fp32 = forward_loss(head, batch, LossConfig(), 64, precision="fp32").loss
    bf16 = forward_loss(head, batch, LossConfig(), 64, precision="bf16").loss
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert fp32.dtype == bf16.dtype == torch.float32  # the loss itself always runs in fp32
    assert float(fp32) != float(bf16)
    torch.testing.assert_close(bf16, fp32, rtol=5e-2, atol=5e-2)


@pytest.mark.slow
def test_the_transformers_engine_loads_in_the_chosen_precision(starter_dir):
    from sad_ray.rollout.engines import EngineConfig, make_engine

    fp32 = make_engine(starter_dir, EngineConfig(kind="hf"), "fp32")
    assert fp32.model.dtype == torch.float32 and fp32.precision == "fp32"
    bf16 = make_engine(starter_dir, EngineConfig(kind="hf"), "bf16")
    assert bf16.model.dtype == torch.bfloat16
    auto = make_engine(starter_dir, EngineConfig(kind="hf"), "auto")
    assert auto.precision == resolve_precision("auto", "cpu")
