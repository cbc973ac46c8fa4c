"""A WebShop stand-in that runs offline: a generated catalogue behind WebShop's own text pages and reward."""

from __future__ import annotations

from sad_ray.envs.webshop.catalogue import Catalogue, Product, build_catalogue
from sad_ray.envs.webshop.env import TASK_TYPES, WebShopEnv
from sad_ray.envs.webshop.reward import Goal, get_reward

__all__ = ["TASK_TYPES", "Catalogue", "Goal", "Product", "WebShopEnv", "build_catalogue", "get_reward"]
