"""Agent environments: one interface (`base.Environment`), the built-in games, and their experts."""

from __future__ import annotations

from typing import Any

from sad_ray.envs.base import Environment, Episode, ExpertStep, StepResult, Task

ENVIRONMENTS = ("alfworld", "webshop", "hotpotqa")

__all__ = ["ENVIRONMENTS", "Environment", "Episode", "ExpertStep", "StepResult", "Task", "make_env"]


def make_env(name: str, **kwargs: Any) -> Environment:
    """An environment by name; imported lazily so one environment's dependencies never load another's."""
    if name == "alfworld":
        from sad_ray.envs.alfworld import ALFWorldEnv

        return ALFWorldEnv(**kwargs)
    if name == "webshop":
        from sad_ray.envs.webshop import WebShopEnv

        return WebShopEnv(**kwargs)
    if name == "hotpotqa":
        from sad_ray.envs.hotpotqa import HotPotQAEnv

        return HotPotQAEnv(**kwargs)
    raise ValueError(f"unknown environment {name!r}; known: {', '.join(ENVIRONMENTS)}")
