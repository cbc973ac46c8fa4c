"""The experts' demonstrations, played on Ray tasks in parallel and handed back in task order.

An expert plays a game in pure Python (ALFWorld's PDDL engine, the WebShop and HotPotQA stand-ins), one core
each: a 2-core machine plays two chunks at once, a cluster as many as it has CPUs. Each worker process keeps its
environments between chunks. At most `2 x CPUs` chunks are in flight, so a long list never piles finished
episodes up in the object store, and results come back in the order of the tasks (a rerun that skips the
finished ones writes the same records).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from sad_ray.envs.base import Episode, Task

_ENVS: dict[str, Any] = {}  # in a worker process: environment key -> environment, kept between chunks


def _play_chunk(env_name: str, kwargs: dict[str, Any], tasks: list[Task]) -> list[Episode]:
    from sad_ray.envs import make_env
    from sad_ray.envs.react import demonstration

    key = json.dumps([env_name, kwargs], sort_keys=True, default=str)
    if key not in _ENVS:
        _ENVS[key] = make_env(env_name, **kwargs)
    return [demonstration(_ENVS[key], task) for task in tasks]


def play_demonstrations(tasks: Sequence[Task], env_kwargs: dict[str, dict], chunk: int = 8) -> Iterator[Episode]:
    """The expert's episode of every task, in order (an expert that does not win raises, naming the task)."""
    import ray

    from sad_ray.console import init_ray

    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    init_ray()
    play = ray.remote(num_cpus=1, max_retries=2)(_play_chunk)
    groups: list[list[Task]] = []
    for task in tasks:  # chunks of one environment each, in task order
        if groups and groups[-1][0].env == task.env and len(groups[-1]) < chunk:
            groups[-1].append(task)
        else:
            groups.append([task])
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    todo = deque(groups)
    pending: deque = deque()
    while todo or pending:
        while todo and len(pending) < window:
            group = todo.popleft()
            pending.append(play.remote(group[0].env, env_kwargs.get(group[0].env, {}), group))
        yield from ray.get(pending.popleft())
