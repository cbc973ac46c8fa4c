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
# Observations that say the last action did nothing: ALFWorld's (TextWorld's) and HotPotQA's and WebShop's.
_STALLED = re.compile(r"^\s*(nothing happens|invalid action)", re.IGNORECASE)


def stalled(action: str | None, observation: str) -> bool:
    """A turn that got the agent nowhere: no parseable action, or an observation saying the action did nothing."""
    return action is None or bool(_STALLED.match(observation))


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
    stalled: int = 0  # consecutive turns that got nowhere (`stalled`)
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    teacher_turns: list[int] = field(default_factory=list)


@dataclass
class PlayStats:
    episodes: int = 0
    won: int = 0
    steps: int = 0
    turns_without_action: int = 0
    generate_calls: int = 0
    teacher_turns: int = 0


@dataclass(frozen=True)
class PlayConfig:
    max_in_flight: int = 16
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # The engine sees `context_window(turns, context_chars)` of a long episode (None: everything).
    context_chars: int | None = None


@dataclass(frozen=True)
class Intervention:
    """The teacher steps in (on-policy distillation, `on_policy.intervene_after`): after `after` consecutive turns
    that got nowhere (`stalled`), `engine` writes the episode's next turn; the episode records it in
    `teacher_turns`, and the count starts again."""

    engine: Engine
    after: int
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if self.after < 1:
            raise ValueError(f"intervene_after must be >= 1, got {self.after}")


def play(
    engine: Engine,
    make_env: Callable[[str], Environment],
    tasks: Iterable[Task],
    cfg: PlayConfig = PlayConfig(),
    stats: PlayStats | None = None,
    intervention: Intervention | None = None,
) -> Iterator[Episode]:
    """Play every task to its end with the engine as the agent; yields episodes as they finish.

    `make_env(name)` builds a fresh environment; tasks of different environments share the in-flight batch,
    and finished environments are reused for later tasks of the same name. With an `intervention`, an episode
    stuck for `intervention.after` turns gets its next turn from `intervention.engine`.
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
            stuck = [intervention is not None and ep.stalled >= intervention.after for ep in live]
            turns: list = [None] * len(live)
            for by_teacher in (False, True):
                which = [i for i, s in enumerate(stuck) if s == by_teacher]
                if not which:
                    continue
                writer, sampling = (intervention.engine, intervention.sampling) if by_teacher else (engine,
                                                                                                   cfg.sampling)
                made = generate_timed(writer, [context_window(live[i].turns, cfg.context_chars) for i in which],
                                      sampling)
                stats.generate_calls += 1
                for i, turn in zip(which, made, strict=True):
                    turns[i] = turn
            still: list[_Live] = []
            for ep, turn, by_teacher in zip(live, turns, stuck, strict=True):
                text = turn.text
                ep.seconds.append(turn.seconds)
                ep.tokens.append(turn.completion_tokens)
                action = parse_action(text)
                if action is None:
                    stats.turns_without_action += 1
                    ep.invalid += 1
                if by_teacher:
                    ep.teacher_turns.append(len(ep.turns))
                    stats.teacher_turns += 1
                    ep.stalled = 0
                ep.turns.append({"role": "assistant", "content": text})
                result = ep.env.step(action or "")
                ep.stalled = ep.stalled + 1 if stalled(action, result.observation) else 0
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
                                  scores=_scores(result.info), teacher_turns=tuple(ep.teacher_turns))
                else:
                    ep.turns.append({"role": "user", "content": result.observation})
                    still.append(ep)
            live = still
    finally:
        for env in [e for pool in idle.values() for e in pool] + [ep.env for ep in live]:
            env.close()
