"""Rollout throughput, vLLM vs transformers engine: same teacher, same tasks, one run.

`python bench/rollout.py [--tasks-per-env N] [--max-steps S]` plays the tasks with each engine on Ray Data
(one actor), scores every finished trajectory with top-20 logprobs, and prints environment steps per second,
generated tokens per second and the vLLM / transformers ratios (goal: vLLM at least 3x).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import ray

    from sad_ray.models.starter import provision_starter
    from sad_ray.rollout.engines import EngineConfig
    from sad_ray.rollout.pipeline import RolloutConfig, SegmentSettings, run_rollouts

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks-per-env", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--envs", nargs="*", default=["alfworld", "webshop", "hotpotqa"])
    args = parser.parse_args()

    cache = Path(os.environ.get("SAD_RAY_CACHE", "~/.cache/sad-ray")).expanduser()
    teacher = provision_starter(cache)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {}
    for kind in ("vllm", "hf"):
        cfg = RolloutConfig(envs=tuple(args.envs), tasks_per_env=args.tasks_per_env, keep="all",
                            max_steps=args.max_steps, max_new_tokens=args.max_new_tokens, tasks_per_batch=64,
                            max_in_flight=16, engine=EngineConfig(kind=kind, max_model_len=4096))
        with tempfile.TemporaryDirectory() as tmp:
            report = run_rollouts(teacher, Path(tmp) / "records", cfg, SegmentSettings(top_k=20, max_tokens=8192),
                                  {"alfworld": {"cache_dir": str(cache / "alfworld")}})
        results[kind] = report
        m = report.metrics()
        print(f"{kind:<5} episodes {report.episodes:3d}  env steps {report.steps:4d}  generated tokens "
              f"{report.generated_tokens:6d}  wall {report.seconds:6.1f} s  steps/s "
              f"{m['rollout/env_steps_per_second']:6.2f}  tokens/s {m['rollout/generated_tokens_per_second']:7.1f}")
    ray.shutdown()
    v, h = (results[k].metrics() for k in ("vllm", "hf"))
    step_ratio = v["rollout/env_steps_per_second"] / h["rollout/env_steps_per_second"]
    token_ratio = v["rollout/generated_tokens_per_second"] / h["rollout/generated_tokens_per_second"]
    print(f"vllm/hf env steps per second     {step_ratio:.2f}x")
    print(f"vllm/hf generated tokens per second {token_ratio:.2f}x  (goal >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
