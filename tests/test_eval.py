"""Evaluation's numbers as docs/evaluation.md defines them, and the Serve app a job evaluates through. The teacher and
a student played through the real app (real vLLM engine, HTTP, environments, MLflow store) are tested in
tests/test_serve.py, which shares its one app with them."""

from __future__ import annotations

import math

import pytest

from sad_ray.eval.metrics import (
    bootstrap_mean,
    normalise_action,
    paired_difference,
    rouge_l_f1,
    strip_thought_label,
    wilson,
)

# ------------------------------------------------------------------------------------------------ the metrics


def test_rouge_l_f1_is_the_lcs_f_measure_over_words():
    # LCS of "the cat sat on the mat" and "the cat lay on the mat" is 5 words of 6 each: P = R = F = 5/6.
    assert rouge_l_f1("The cat sat on the mat.", "the cat lay on the mat") == pytest.approx(5 / 6)
    # Candidate 3 words, reference 6, LCS 3: P = 1, R = 1/2, F = 2/3.
    assert rouge_l_f1("go to desk", "I should go to the desk 1") == pytest.approx(2 * 1 * (3 / 7) / (1 + 3 / 7))
    assert rouge_l_f1("", "") == 1.0
    assert rouge_l_f1("anything", "") == 0.0
    assert rouge_l_f1("a b c", "c b a") == pytest.approx(1 / 3)  # order matters: LCS is 1
    assert strip_thought_label("Thought 2: go to the desk") == "go to the desk"


def test_actions_compare_in_their_normal_form():
    assert normalise_action("  Go To  desk 1. ") == normalise_action("go to desk 1")
    assert normalise_action("search[ red  Shoes ]") == "search[red shoes]"
    assert normalise_action("`click[Buy Now]`") == "click[buy now]"
    assert normalise_action(None) == ""
    assert normalise_action("go to desk 1") != normalise_action("go to desk 2")


def test_wilson_and_bootstrap_intervals():
    # Reference values (Wilson 1927; e.g. statsmodels proportion_confint(method="wilson")).
    assert wilson(5, 10).low == pytest.approx(0.2366, abs=1e-4)
    assert wilson(5, 10).high == pytest.approx(0.7634, abs=1e-4)
    zero = wilson(0, 10)
    assert (zero.value, zero.low) == (0.0, 0.0) and zero.high == pytest.approx(0.2775, abs=1e-4)
    assert wilson(10, 10).high == 1.0 and wilson(10, 10).low == pytest.approx(0.7225, abs=1e-4)
    assert math.isnan(wilson(0, 0).value)
    with pytest.raises(ValueError, match="successes"):
        wilson(11, 10)
    mean = bootstrap_mean([1.0, 2.0, 3.0, 4.0, 5.0] * 8)
    assert mean.value == 3.0 and 2.5 < mean.low < 3.0 < mean.high < 3.5
    assert bootstrap_mean([7.0]).low == 7.0
    diff = paired_difference([1, 1, 1, 0], [0, 0, 1, 0])
    assert diff.value == 0.5 and diff.low >= 0.0
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1], [1, 2])


def test_eval_config_names_the_bad_key():
    from sad_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="eval"):
        load_config(None, ["eval.tasks=[1,1]"])
    with pytest.raises(ConfigError, match="eval"):
        load_config(None, ["eval.split=train"])
    with pytest.raises(ConfigError, match="eval.cot_thresold"):
        load_config(None, ["eval.cot_thresold=0.4"])


def test_eval_app_args_serve_every_agent_as_rollouts_prompt_it():
    from sad_ray.config import load_config
    from serve.local import eval_app_args

    cfg = load_config(None, ["eval.engine=hf", "eval.replicas=2", "eval.max_new_tokens=64", "precision=fp32",
                             "rollout.context_chars=1234", "segment.format=think_tag"])
    args = eval_app_args(cfg, {"teacher": "starter", "student-sad": "/models/s"}, "k3y")
    assert [(m.name, m.source, m.engine, m.num_replicas) for m in args.models] == [
        ("teacher", "starter", "hf", 2), ("student-sad", "/models/s", "hf", 2)]
    assert args.api_key.get_secret_value() == "k3y" and args.precision == "fp32"
    assert (args.context_chars, args.agent_max_tokens, args.segment_format) == (1234, 64, "think_tag")
    assert args.limits.max_tokens >= 64 and args.limits.max_prompt_tokens + 64 <= cfg.eval.max_model_len
