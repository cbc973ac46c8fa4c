"""Environment speed: game-generation time and environment steps per second, per environment and task type.

`python bench/envs.py [--episodes N] [--envs alfworld webshop hotpotqa]`. ALFWorld games are generated into a
fresh temporary cache: "generate" is writing the game files, "load+reset" is starting a game from them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sad_ray.envs import ENVIRONMENTS, make_env  # noqa: E402


def bench_env(name: str, episodes: int, cache: Path) -> list[tuple[str, float, float, float, int]]:
    kwargs = {"cache_dir": cache} if name == "alfworld" else {}
    t0 = time.perf_counter()
    env = make_env(name, **kwargs)
    build = time.perf_counter() - t0
    print(f"{name}: environment built in {build:.2f} s")
    rows = []
    for task_type in env.task_types:
        tasks = env.tasks("train", episodes, task_types=[task_type])
        gen = first = play = 0.0
        steps = 0
        for task in tasks:
            t0 = time.perf_counter()
            if hasattr(env, "prepare"):  # environments that generate game files up front (ALFWorld)
                env.prepare([task], workers=1)
            gen += time.perf_counter() - t0
            t0 = time.perf_counter()
            env.reset(task)
            first += time.perf_counter() - t0
            actions = env.expert(task)
            env.reset(task)
            t0 = time.perf_counter()
            for action in actions:
                result = env.step(action)
                steps += 1
                if result.done:
                    break
            play += time.perf_counter() - t0
        rows.append((task_type, gen / len(tasks), first / len(tasks), steps / play if play else float("inf"), steps))
    env.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--envs", nargs="*", default=list(ENVIRONMENTS))
    args = parser.parse_args()
    print(f"{'environment':<10} {'task type':<34} {'generate s':>10} {'load+reset s':>12} {'steps/s':>9} {'steps':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.envs:
            t0 = time.perf_counter()
            for task_type, gen, cached, sps, steps in bench_env(name, args.episodes, Path(tmp) / name):
                print(f"{name:<10} {task_type:<34} {gen:>10.4f} {cached:>12.3f} {sps:>9.1f} {steps:>6}")
            print(f"{name}: {time.perf_counter() - t0:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
