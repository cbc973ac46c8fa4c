"""The agent loop with a real engine in real environments."""

from __future__ import annotations

import pytest

from sad_ray.envs import make_env
from sad_ray.rollout.agent import PlayConfig, PlayStats, parse_action, play
from sad_ray.rollout.engines import HFEngine, SamplingConfig


@pytest.mark.parametrize(
    "text, action",
    [("Thought: go.\nAction: go to shelf 1", "go to shelf 1"), ("Thought 2: x\nAction 2: Search[Paris]", "Search[Paris]"),
     ("Action: a\nAction: b", "b"), ("Thought: only thinking", None), ("action:   click[Buy Now]  ", "click[Buy Now]"),
     ("Action:", None)],
)
def test_parse_action(text, action):
    assert parse_action(text) == action


def test_the_starter_plays_real_episodes_to_the_end(starter_dir):
    engine = HFEngine(starter_dir)
    env = make_env("hotpotqa", max_steps=2)
    tasks = env.tasks("val", 3)
    stats = PlayStats()
    episodes = list(play(engine, lambda name: make_env(name, max_steps=2), tasks,
                         PlayConfig(max_in_flight=2, sampling=SamplingConfig(max_new_tokens=16)), stats))
    assert sorted(e.id for e in episodes) == sorted(t.id for t in tasks)
    for ep in episodes:
        assert 1 <= ep.steps <= 2
        assert [t["role"] for t in ep.turns[:2]] == ["system", "user"]
        assert ep.turns[-1]["role"] == "assistant"
        assert sum(t["role"] == "assistant" for t in ep.turns) == ep.steps
    assert stats.episodes == 3 and stats.steps == sum(e.steps for e in episodes)
    # Two in flight: the first call batches two episodes, so fewer calls than steps.
    assert stats.generate_calls < stats.steps
