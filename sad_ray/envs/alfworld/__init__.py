"""ALFWorld on its real engine, with games generated offline from the rooms the `alfworld` wheel ships.

`ALFWorldEnv` plays them (or real ALFWorld data); `export_dataset` writes generated games in ALFWorld's layout.
"""

from __future__ import annotations

from sad_ray.envs.alfworld.env import ALFWorldEnv
from sad_ray.envs.alfworld.generate import GENERATOR_VERSION
from sad_ray.envs.alfworld.layouts import SPLIT_FLOORPLANS, TASK_TYPES
from sad_ray.envs.alfworld.store import export_dataset

__all__ = ["ALFWorldEnv", "GENERATOR_VERSION", "SPLIT_FLOORPLANS", "TASK_TYPES", "export_dataset"]
