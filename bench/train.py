"""Training throughput on Ray Train, one run of each on the same student and records:

- supervised tokens per second with the SAD loss vs plain cross entropy (goal: SAD >= 0.9x CE);
- the fraction of the trainer's wall time spent waiting for data (reading and validating its shard, collating
  batches; goal: <= 10%);
- the same short run under DDP and under DeepSpeed ZeRO-2 on CPU (ratio printed);
- the same run with gradient checkpointing: throughput and the worker's peak memory against plain DDP;
- the same examples per step one at a time (`batch_size 1 x grad_accum N`: no padding) against padded batches of N.

Records: expert demonstrations of the three environments, windowed like rollouts, scored top-20 by the starter
(HF engine). Student: `--layers` layers kept from the starter. `python bench/train.py [--steps 24 --episodes 8]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sad_ray.method.curriculum import CurriculumConfig  # noqa: E402
from sad_ray.method.losses import LossConfig  # noqa: E402
from sad_ray.train.ray_train import TrainConfig, train_on_records  # noqa: E402


def make_records(root: Path, episodes: int) -> Path:
    from transformers import AutoTokenizer

    from sad_ray.envs import make_env
    from sad_ray.envs.react import demonstration
    from sad_ray.models.starter import provision_starter
    from sad_ray.models.tokenizers import tokenizer_fingerprint
    from sad_ray.records import ShardWriter
    from sad_ray.rollout.engines import HFEngine
    from sad_ray.rollout.score import score_episodes
    from tests.conftest import cache_dir

    starter = provision_starter(cache_dir())
    tok = AutoTokenizer.from_pretrained(starter)
    demos = []
    for name in ("alfworld", "webshop", "hotpotqa"):
        env = make_env(name, **({"cache_dir": str(cache_dir() / "alfworld")} if name == "alfworld" else {}))
        demos += [demonstration(env, t) for t in env.tasks("train", episodes)]
        env.close()
    engine = HFEngine(starter)
    with ShardWriter(root / "records", 64) as writer:
        for r in score_episodes(demos, tok, engine, fmt="react", top_k=20, fingerprint=tokenizer_fingerprint(tok),
                                context_chars=3000, max_tokens=4096):
            writer.add(r)
    engine.close()
    return starter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--episodes", type=int, default=8, help="demonstrations per environment")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    from sad_ray.models.student import build_student

    with tempfile.TemporaryDirectory(prefix="sad-ray-bench-train-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        starter = make_records(root, args.episodes)
        student = build_student(starter, root / "student", args.layers).path
        print(f"records ready in {time.perf_counter() - t:.0f} s")
        runs = {
            "sad (ddp)": (LossConfig(objective="sad"), "ddp", False),
            "ce (ddp)": (LossConfig(objective="sft"), "ddp", False),
            "sad (deepspeed zero-2)": (LossConfig(objective="sad"), "deepspeed", False),
            "sad (ddp, grad ckpt)": (LossConfig(objective="sad"), "ddp", True),
            "sad (ddp, one at a time)": (LossConfig(objective="sad"), "ddp", False),
        }
        results = {}
        for name, (loss, strategy, checkpointing) in runs.items():
            one = name.endswith("one at a time)")
            settings = TrainConfig(steps=args.steps, batch_size=1 if one else args.batch_size,
                                       grad_accum=args.batch_size if one else 1, checkpoint_every=args.steps,
                                       strategy=strategy, zero_stage=2, threads=2,
                                       gradient_checkpointing=checkpointing)
            r = train_on_records(root / "records", student, root / name.replace(" ", "_"), settings, loss,
                              CurriculumConfig(ramp=0.5))
            results[name] = r
            print(f"{name:24s} {r.tokens} supervised tokens in {r.seconds:.1f} s: {r.tokens_per_second:.0f} tok/s, "
                  f"data wait {r.data_wait_seconds:.2f} s ({r.data_wait_seconds / r.seconds:.1%}), "
                  f"peak memory {r.peak_memory_gb:.2f} GB")
        sad, ce, ds = results["sad (ddp)"], results["ce (ddp)"], results["sad (deepspeed zero-2)"]
        gc = results["sad (ddp, grad ckpt)"]
        summary = {
            "sad_over_ce_throughput": sad.tokens_per_second / ce.tokens_per_second,
            "data_wait_fraction_sad": sad.data_wait_seconds / sad.seconds,
            "deepspeed_zero2_over_ddp_throughput": ds.tokens_per_second / sad.tokens_per_second,
            "grad_ckpt_over_ddp_throughput": gc.tokens_per_second / sad.tokens_per_second,
            "grad_ckpt_over_ddp_peak_memory": gc.peak_memory_gb / sad.peak_memory_gb,
            "unpadded_over_padded_throughput": results["sad (ddp, one at a time)"].tokens_per_second
            / sad.tokens_per_second,
        }
        print(json.dumps(summary, indent=2))
        ok = summary["sad_over_ce_throughput"] >= 0.9 and summary["data_wait_fraction_sad"] <= 0.10
        print("goals (SAD >= 0.9x CE, data wait <= 10%):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
