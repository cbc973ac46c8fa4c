"""Context windows for long episodes: what the agent sees, and training windows that supervise each turn once."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sad_ray.envs.react import context_window, episode_windows


def chat(steps: int, obs_len: int = 50, act_len: int = 30, first: str = "FIRST") -> list[dict[str, str]]:
    turns = [{"role": "system", "content": "S" * 40}, {"role": "user", "content": first + "o" * obs_len}]
    for i in range(steps):
        turns.append({"role": "assistant", "content": f"Thought: t{i}\nAction: a{i}" + "x" * act_len})
        turns.append({"role": "user", "content": f"obs{i}" + "o" * obs_len})
    return turns


def chars(turns) -> int:
    return sum(len(t["content"]) for t in turns)


def test_a_chat_that_fits_is_shown_whole():
    turns = chat(3)
    assert context_window(turns, 10_000) == turns
    assert context_window(turns, None) == turns


def test_a_long_chat_keeps_system_first_observation_and_recent_steps():
    turns = chat(30)
    window = context_window(turns, 600)
    assert window[:2] == turns[:2]
    assert window[2]["role"] == "assistant"  # the kept steps start at an action
    assert window[-1] == turns[-1]
    assert chars(window) <= 600
    # The kept steps are the most recent ones, contiguous.
    tail = window[2:]
    assert tail == turns[len(turns) - len(tail):]
    # One more step would not have fit.
    assert chars(turns[:2]) + chars(turns[len(turns) - len(tail) - 2:]) > 600


def test_the_last_observation_is_kept_even_when_it_alone_is_over_budget():
    turns = chat(5, obs_len=2000)
    window = context_window(turns, 500)
    assert window[:2] == turns[:2] and window[-1] == turns[-1]


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 40), obs_len=st.integers(1, 400), act_len=st.integers(1, 200),
       budget=st.integers(200, 5000))
def test_every_assistant_turn_is_supervised_in_exactly_one_window(steps, obs_len, act_len, budget):
    turns = chat(steps, obs_len, act_len)[:-1]  # an episode ends with the agent's last action
    windows = episode_windows(turns, budget)
    supervised = []
    for window, idx in windows:
        assert window[:2] == turns[:2]
        for i in idx:
            assert window[i]["role"] == "assistant"
            supervised.append(window[i]["content"])
        # the supervised turns of a window are its last assistant turns, in order, with their observations
        assert idx == sorted(idx) and idx[-1] == len(window) - 1
    assert supervised == [t["content"] for t in turns if t["role"] == "assistant"]
    if len(windows) > 1:
        # A window is over budget only when its first supervised step alone cannot fit.
        for window, idx in windows:
            assert chars(window) <= budget or len(idx) == 1


def test_a_window_opens_with_what_the_agent_loop_would_show_at_half_budget():
    turns = chat(25)[:-1]
    windows = episode_windows(turns, 800)
    assert len(windows) > 2
    for window, idx in windows[1:]:
        first = idx[0]
        # The context before the first supervised turn is the agent's window at half the budget.
        original = next(i for i, t in enumerate(turns) if t is window[first] or t == window[first])
        assert window[:first] == context_window(turns[:original], 400)


def test_masks_supervise_only_the_chosen_turns(starter_tokenizer):
    from sad_ray.method.masks import build_masks

    turns = chat(4, obs_len=20, act_len=5)[:-1]
    full = build_masks(starter_tokenizer, turns, "react")
    only_last = build_masks(starter_tokenizer, turns, "react", supervised_turns={len(turns) - 1})
    assert np.array_equal(full.input_ids, only_last.input_ids)
    sup_full = full.reason_mask | full.act_mask
    sup_last = only_last.reason_mask | only_last.act_mask
    assert sup_last.sum() < sup_full.sum() and not (sup_last & ~sup_full).any()
    # The supervised tokens are those of the last assistant turn (plus its end-of-turn marker).
    text = starter_tokenizer.decode(only_last.input_ids[sup_last])
    assert text.startswith("Thought: t3") and "a3" in text and "t2" not in text


def test_demonstration_records_are_one_hot_and_valid(starter_tokenizer):
    from sad_ray.envs.seed import seed_episodes
    from sad_ray.records import record_from_row
    from sad_ray.rollout.engines import DemonstrationTeacher
    from sad_ray.rollout.score import score_episodes

    records = list(score_episodes(seed_episodes(3), starter_tokenizer, DemonstrationTeacher(), fmt="react",
                                  top_k=1, fingerprint="fp"))
    assert len(records) == 3
    for r in records:
        again = record_from_row(r.to_row())  # validates
        sup = np.flatnonzero(again.supervised)
        np.testing.assert_array_equal(again.topk_ids[:, 0], again.input_ids[sup])
        assert (again.topk_logprobs == 0).all() and np.isneginf(again.tail_logprob).all()
        assert again.teacher_entropy == 0.0
    with pytest.raises(TypeError, match="cannot play"):
        DemonstrationTeacher().generate([[{"role": "user", "content": "hi"}]], None)


def test_window_records_have_distinct_ids_and_map_back_to_their_episode(starter_tokenizer):
    from sad_ray.envs.base import Episode
    from sad_ray.records import episode_id
    from sad_ray.rollout.engines import DemonstrationTeacher
    from sad_ray.rollout.score import score_episodes

    ep = Episode(id="e/train/t/0", env="e", task_type="t", split="train", turns=tuple(chat(12)[:-1]), steps=12)
    records = list(score_episodes([ep], starter_tokenizer, DemonstrationTeacher(), fmt="react", top_k=1,
                                  fingerprint="fp", context_chars=700))
    assert len(records) > 1
    assert len({r.id for r in records}) == len(records)
    assert {episode_id(r.id) for r in records} == {ep.id}
    # Together the windows supervise every action of the episode once.
    acts = [starter_tokenizer.decode(r.input_ids[r.act_mask]) for r in records]
    for i in range(12):
        assert sum(f"a{i}x" in a for a in acts) == 1
