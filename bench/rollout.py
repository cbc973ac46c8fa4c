"""Rollout throughput, vLLM vs transformers engine: same teacher, same tasks, one run.

`python bench/rollout.py [--teacher starter|bootstrap|DIR] [--tasks-per-env N] [--max-steps S]` plays the tasks with each engine through the agent
loop (all tasks in flight together), scores every finished trajectory with top-20 logprobs, and prints engine
start-up, play and scoring times, environment steps per second and generated tokens per second (start-up
excluded: it is paid once per actor), and the vLLM / transformers ratios (goal: vLLM at least 3x).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(kind: str, teacher: Path, tasks, env_kwargs, args) -> dict[str, float]:
    from transformers import AutoTokenizer

    from sad_ray.envs import make_env
    from sad_ray.rollout.agent import PlayConfig, PlayStats, generated_tokens, play
    from sad_ray.rollout.engines import EngineConfig, SamplingConfig, make_engine
    from sad_ray.rollout.score import score_episodes

    t0 = time.perf_counter()
    engine = make_engine(teacher, EngineConfig(kind=kind, max_model_len=8192))
    start = time.perf_counter() - t0
    stats = PlayStats()
    t0 = time.perf_counter()
    episodes = list(play(engine, lambda name: make_env(name, max_steps=args.max_steps, **env_kwargs.get(name, {})),
                         tasks, PlayConfig(max_in_flight=len(tasks),
                                           sampling=SamplingConfig(max_new_tokens=args.max_new_tokens)), stats))
    play_s = time.perf_counter() - t0
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    generated = sum(generated_tokens(tokenizer, ep) for ep in episodes)
    t0 = time.perf_counter()
    records = list(score_episodes(episodes, tokenizer, engine, fmt="react", top_k=20, fingerprint="bench",
                                  max_tokens=1 << 20))
    score_s = time.perf_counter() - t0
    engine.close()
    scored = sum(len(r.input_ids) for r in records)
    busy = play_s + score_s
    print(f"{kind:<5} start {start:5.1f} s  play {play_s:6.1f} s  score {score_s:6.1f} s ({scored} tokens)  "
          f"episodes {stats.episodes}  steps {stats.steps}  generated {generated} tokens  "
          f"steps/s {stats.steps / busy:5.2f}  tokens/s {generated / busy:6.1f}")
    return {"steps_per_s": stats.steps / busy, "tokens_per_s": generated / busy, "generated": generated,
            "play_tokens_per_s": generated / play_s, "score_tokens_per_s": scored / score_s,
            "steps": stats.steps, "play_s": play_s, "score_s": score_s, "scored": scored}


def main() -> int:
    import torch

    from sad_ray.envs import make_env
    from sad_ray.models.starter import resolve_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks-per-env", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--envs", nargs="*", default=["alfworld", "webshop", "hotpotqa"])
    parser.add_argument("--teacher", default="starter",
                        help="starter, bootstrap (the teacher jobs/bootstrap_teacher.py made) or a model directory")
    args = parser.parse_args()
    torch.set_num_threads(2)

    cache = Path(os.environ.get("SAD_RAY_CACHE", "~/.cache/sad-ray")).expanduser()
    teacher = resolve_model(args.teacher, cache)
    env_kwargs = {"alfworld": {"cache_dir": str(cache / "alfworld")}}
    tasks = [t for name in args.envs for t in make_env(name, **env_kwargs.get(name, {})).tasks("train", args.tasks_per_env)]
    v = run("vllm", teacher, tasks, env_kwargs, args)
    h = run("hf", teacher, tasks, env_kwargs, args)
    if v["generated"] != h["generated"]:
        print(f"note: greedy turns differ between engines ({v['generated']} vs {h['generated']} tokens)")
    print(f"vllm/hf env steps per second        {v['steps_per_s'] / h['steps_per_s']:.2f}x")
    print(f"vllm/hf generated tokens per second {v['tokens_per_s'] / h['tokens_per_s']:.2f}x  (goal >= 3x)")
    print(f"vllm/hf generation alone            {v['play_tokens_per_s'] / h['play_tokens_per_s']:.2f}x")
    print(f"vllm/hf top-20 scoring alone        {v['score_tokens_per_s'] / h['score_tokens_per_s']:.2f}x")
    # rollout.score_engine=hf: vLLM plays, a transformers copy scores (the same tokens, timed above).
    mixed_s = v["play_s"] + v["scored"] / h["score_tokens_per_s"]
    print(f"vllm play + hf score / hf           {v['steps'] / mixed_s / h['steps_per_s']:.2f}x  "
          "(rollout.score_engine=hf)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
