"""The agent loop: an engine plays many episodes at once, one batched generate call per turn of all of them.

Environments step between turns, so episodes are kept in flight and the batch is refilled as they finish;
the engine (vLLM batches continuously) sees every live episode's next turn together.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from sad_ray.envs.base import Environment, Episode, Task
from sad_ray.envs.react import context_window, system_prompt
from sad_ray.rollout.engines import Engine, SamplingConfig, generate_timed

log = logging.getLogger(__name__)

_ACTION = re.compile(r"^\s*Action(?:\s*\d+)?\s*:\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)


def parse_action(text: str) -> str | None:
    """The last `Action: ...` line of an assistant turn (ReAct, numbered or not), or None."""
    found = _ACTION.findall(text)
    return found[-1] if found and found[-1] else None


def generated_tokens(tokenizer, episode: Episode) -> int:
    """Tokens the agent wrote in an episode (its assistant turns)."""
    return sum(len(tokenizer(t["content"], add_special_tokens=False)["input_ids"])
               for t in episode.turns if t["role"] == "assistant")


def _scores(info: dict) -> dict[str, float]:
    """The final step's numeric scores (HotPotQA's em and f1, WebShop's reward parts), not its bookkeeping."""
    out: dict[str, float] = {}
    for key, value in info.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": float(v) for k, v in value.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[key] = float(value)
    return out


@dataclass
class _Live:
    task: Task
    env: Environment
    turns: list[dict[str, str]]
    steps: int = 0
    invalid: int = 0
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


@dataclass
class PlayStats:
    episodes: int = 0
    won: int = 0
    steps: int = 0
    turns_without_action: int = 0
    generate_calls: int = 0


@dataclass(frozen=True)
class PlayConfig:
    max_in_flight: int = 16
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # The engine sees `context_window(turns, context_chars)` of a long episode (None: everything).
    context_chars: int | None = None


def play(
    engine: Engine,
    make_env: Callable[[str], Environment],
    tasks: Iterable[Task],
    cfg: PlayConfig = PlayConfig(),
    stats: PlayStats | None = None,
) -> Iterator[Episode]:
    """Play every task to its end with the engine as the agent; yields episodes as they finish.

    `make_env(name)` builds a fresh environment; tasks of different environments share the in-flight batch,
    and finished environments are reused for later tasks of the same name.
    """
    stats = stats if stats is not None else PlayStats()
    pending = iter(tasks)
    live: list[_Live] = []
    idle: dict[str, list[Environment]] = {}
    exhausted = False
    try:
        while live or not exhausted:
            while not exhausted and len(live) < cfg.max_in_flight:
                task = next(pending, None)
                if task is None:
                    exhausted = True
                    break
                pool = idle.setdefault(task.env, [])
                env = pool.pop() if pool else make_env(task.env)
                observation = env.reset(task)
                live.append(_Live(task, env, [{"role": "system", "content": system_prompt(env.name)},
                                              {"role": "user", "content": observation}]))
            if not live:
                break
            turns = generate_timed(engine, [context_window(ep.turns, cfg.context_chars) for ep in live],
                                   cfg.sampling)
            stats.generate_calls += 1
            still: list[_Live] = []
            for ep, turn in zip(live, turns, strict=True):
                text = turn.text
                ep.seconds.append(turn.seconds)
                ep.tokens.append(turn.completion_tokens)
                action = parse_action(text)
                if action is None:
                    stats.turns_without_action += 1
                    ep.invalid += 1
                ep.turns.append({"role": "assistant", "content": text})
                result = ep.env.step(action or "")
                ep.steps += 1
                stats.steps += 1
                if result.done:
                    won = bool(result.info.get("won"))
                    stats.episodes += 1
                    stats.won += won
                    idle.setdefault(ep.env.name, []).append(ep.env)
                    yield Episode(id=ep.task.id, env=ep.task.env, task_type=ep.task.task_type, split=ep.task.split,
                                  turns=tuple(ep.turns), success=won, reward=float(result.reward), steps=ep.steps,
                                  step_seconds=tuple(ep.seconds), step_tokens=tuple(ep.tokens),
                                  scores=_scores(result.info))
                else:
                    ep.turns.append({"role": "user", "content": result.observation})
                    still.append(ep)
            live = still
    finally:
        for env in [e for pool in idle.values() for e in pool] + [ep.env for ep in live]:
            env.close()
