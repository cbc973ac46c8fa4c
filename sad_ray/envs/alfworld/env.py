"""`ALFWorldEnv`: ALFWorld's text household games on its own engine, generated offline or read from real data."""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

from sad_ray.envs.alfworld.engine import BANNER, Engine
from sad_ray.envs.alfworld.expert import explore
from sad_ray.envs.alfworld.layouts import TASK_TYPES
from sad_ray.envs.alfworld.scene import parse_scene
from sad_ray.envs.alfworld.store import GAME_FILE, ALFWorldData, GeneratedGames, read_goal
from sad_ray.envs.base import SPLITS, Environment, ExpertStep, StepResult, Task

log = logging.getLogger(__name__)

_TASK_SENTENCE = re.compile(r"Your task is to: (.*?)\.?\"")


def normalize_command(action: str) -> str:
    """Whitespace, case and a trailing period never change what an ALFWorld command means."""
    return " ".join(action.strip().rstrip(".").split()).lower()


# What importing alfworld sets `$ALFWORLD_DATA` to when it is unset (alfworld/info.py), creating the folder.
ALFWORLD_DEFAULT_DATA = "~/.cache/alfworld"


def env_data_dir() -> Path | None:
    """`$ALFWORLD_DATA`: a folder someone chose, or alfworld's own default only when it holds downloaded games.

    A chosen folder without games is an error later (`ALFWorldData`); alfworld's empty default is not a choice.
    """
    value = os.environ.get("ALFWORLD_DATA")
    if not value:
        return None
    path = Path(value).expanduser()
    if path.resolve() == Path(ALFWORLD_DEFAULT_DATA).expanduser().resolve() and not (path / "json_2.1.1").is_dir():
        return None
    return path


def task_sentence(grammar: str) -> str:
    m = _TASK_SENTENCE.search(grammar)
    return m.group(1) if m else ""


class ALFWorldEnv(Environment):
    """ALFWorld (TextWorld `PddlEnv` + `AlfredDemangler`): observations and admissible commands are its own.

    Games come from `data_dir` (real ALFWorld data: train / valid_seen / valid_unseen serve train / val / test;
    `$ALFWORLD_DATA` when neither directory is given), else are generated per task into `cache_dir` (default
    `$SAD_RAY_CACHE/alfworld`). Generated splits: train and val draw from ALFRED's 96 training rooms (different
    games), test from its 24 held-out rooms (`SPLIT_FLOORPLANS`).
    """

    name = "alfworld"
    task_types = TASK_TYPES

    def __init__(self, cache_dir: str | Path | None = None, data_dir: str | Path | None = None,
                 max_steps: int = 50, data_setting: str = "data_dir") -> None:
        super().__init__()
        self.max_steps = max_steps
        setting = data_setting  # what errors about the folder call it
        if data_dir is None and cache_dir is None:
            data_dir, setting = env_data_dir(), "$ALFWORLD_DATA"
        self.store: GeneratedGames | ALFWorldData = (ALFWorldData(data_dir, setting) if data_dir
                                                     else GeneratedGames(cache_dir))
        self._engine: Engine | None = None
        self._planner: Engine | None = None
        self._loaded: Path | None = None
        self.admissible: list[str] = []  # the current state's admissible commands (also in each step's info)

    # -- tasks ----------------------------------------------------------------------------------------------
    def tasks(self, split: str, n: int, task_types: Sequence[str] | None = None, start: int = 0) -> list[Task]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        types = tuple(task_types or self.task_types)
        unknown = [t for t in types if t not in self.task_types]
        if unknown:
            raise ValueError(f"unknown ALFWorld task types {unknown}; known: {', '.join(self.task_types)}")
        return self.store.tasks(split, n, types, start)

    def game_dir(self, task: Task) -> Path:
        """The folder holding the task's `game.tw-pddl` and `traj_data.json` (generating it if needed)."""
        return self.store.game_dir(task)

    def prepare(self, tasks: Sequence[Task], workers: int = 2) -> int:
        """Generate the games of `tasks` ahead of time with `workers` processes; returns how many were new."""
        return self.store.prepare(tasks, workers)

    # -- playing --------------------------------------------------------------------------------------------
    def _reset(self, task: Task) -> str:
        path = self.game_dir(task)
        if self._engine is None:
            self._engine = Engine()
        if path != self._loaded:
            self._engine.load(str(path / GAME_FILE))
            self._loaded = path
        state = self._engine.reset()
        self.admissible = list(state["admissible_commands"])
        # TextWorld's welcome line carries nothing; ALFWorld agents (ReAct among them) drop it too.
        return state.feedback.removeprefix(BANNER).strip()

    def _step(self, action: str) -> StepResult:
        assert self._engine is not None
        state, _, done = self._engine.step(normalize_command(action))
        won = bool(state["won"])
        self.admissible = list(state["admissible_commands"])
        return StepResult(state.feedback, 1.0 if won else 0.0, bool(done),
                          {"won": won, "admissible": list(self.admissible)})

    # -- experts --------------------------------------------------------------------------------------------
    def expert_steps(self, task: Task) -> list[ExpertStep]:
        path = self.game_dir(task)
        game = json.loads((path / GAME_FILE).read_text())
        rng = random.Random(f"{task.id}/thoughts")
        return explore(parse_scene(game["pddl_problem"]), read_goal(path), task_sentence(game["grammar"]), rng)

    def planner_plan(self, task: Task) -> list[str]:
        """The PDDL planner's optimal plan (ALFWorld's `policy_commands`): an oracle that knows where things are."""
        if self._planner is None:
            self._planner = Engine(planner=True)
        self._planner.load(str(self.game_dir(task) / GAME_FILE))
        return list(self._planner.reset()["policy_commands"])

    def close(self) -> None:
        self._engine = self._planner = None
        self._loaded = None
