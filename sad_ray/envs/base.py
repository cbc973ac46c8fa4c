"""The one interface every agent environment answers, and the plain specs that travel between stages.

A `Task` is a small serialisable spec (environment, task type, seed, split): Ray ships it to rollout actors,
which rebuild the game from it deterministically. An `Episode` is a finished chat with its outcome.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Task:
    env: str
    task_type: str
    seed: int
    split: str = "train"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"task split must be one of {', '.join(SPLITS)}, got {self.split!r}")

    @property
    def id(self) -> str:
        return f"{self.env}/{self.split}/{self.task_type}/{self.seed}"


@dataclass(frozen=True)
class StepResult:
    observation: str
    reward: float
    done: bool
    # `won` (bool) always; `admissible` (list of commands) where the environment has them; `step`, and
    # `truncated` when the step limit ended the episode.
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExpertStep:
    """One step of an expert demonstration: a short reasoning grounded in the state, then the action."""

    thought: str
    action: str


@dataclass(frozen=True)
class Episode:
    """A finished chat with its outcome, as a rollout or a demonstration gives it."""

    id: str
    env: str
    task_type: str
    split: str
    turns: Sequence[dict[str, str]]
    success: bool = True
    reward: float = 1.0
    steps: int = 0
    # Where an agent played it (evaluation): each step's wall-clock seconds and generated tokens, and the final
    # step's numeric scores (HotPotQA's em and f1, WebShop's reward parts).
    step_seconds: tuple[float, ...] = ()
    step_tokens: tuple[int, ...] = ()
    scores: dict[str, float] = field(default_factory=dict)
    # Indices into `turns` of the assistant turns another agent wrote: the teacher stepping into a student's
    # episode (on-policy distillation, `on_policy.intervene_after`).
    teacher_turns: tuple[int, ...] = ()


class Environment(ABC):
    """reset(task) -> observation; step(action) -> StepResult; expert(task) -> actions that win.

    Invalid or malformed actions get the environment's own feedback, never an exception. The step limit ends
    an episode as a failure (`info["truncated"] = True`, `won` False).
    """

    name: str
    task_types: tuple[str, ...]
    max_steps: int

    def __init__(self) -> None:
        self._steps = 0
        self._done = True

    @abstractmethod
    def tasks(self, split: str, n: int, task_types: Sequence[str] | None = None, start: int = 0) -> list[Task]:
        """`n` tasks of a split, deterministic; splits never share a task."""

    @abstractmethod
    def _reset(self, task: Task) -> str: ...

    @abstractmethod
    def _step(self, action: str) -> StepResult: ...

    @abstractmethod
    def expert_steps(self, task: Task) -> list[ExpertStep]:
        """A winning demonstration: (thought, action) pairs with varied, state-grounded reasoning."""

    def expert(self, task: Task) -> list[str]:
        return [s.action for s in self.expert_steps(task)]

    def reset(self, task: Task) -> str:
        if task.env != self.name:
            raise ValueError(f"task {task.id} is for environment {task.env!r}, not {self.name!r}")
        if task.task_type not in self.task_types:
            raise ValueError(f"unknown task type {task.task_type!r} for {self.name}; known: {', '.join(self.task_types)}")
        self._steps = 0
        self._done = False
        return self._reset(task)

    def step(self, action: str) -> StepResult:
        if self._done:
            raise RuntimeError(f"{self.name}: step() after the episode ended; call reset() first")
        self._steps += 1
        result = self._step(action if isinstance(action, str) else str(action))
        info = {"won": False, **result.info, "step": self._steps}
        done = result.done
        if not done and self._steps >= self.max_steps:
            done = True
            info["truncated"] = True
            info["won"] = False
        self._done = done
        return StepResult(result.observation, result.reward, done, info)

    def admissible_actions(self) -> list[str] | None:
        """The actions valid in the current state, where the environment knows them (None otherwise)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
