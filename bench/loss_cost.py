"""Forward+backward cost of the SAD loss vs token-level KD and plain cross entropy on one random batch.

SAD computes the same per-token divergence as token-level KD and only adds two masked means, so it should
cost ~1.0x token_kd; the script exits non-zero above 1.1x (`python bench/loss_cost.py [--B 4 --T 512 --k 20]`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sad_ray.method.losses import LossConfig, distillation_loss, teacher_topk  # noqa: E402

MAX_SAD_OVER_TOKEN_KD = 1.1


def make_batch(B: int, T: int, V: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # ~60% of positions in reasoning spans, ~30% in actions, the rest prompt/observation tokens.
    u = torch.rand(B, T, generator=g)
    reason_mask, act_mask = u < 0.6, (u >= 0.6) & (u < 0.9)
    reason_mask[:, 0] = act_mask[:, 0] = False
    n = int((reason_mask | act_mask)[:, 1:].sum())
    topk_ids, topk_logprobs, tail_logprob = teacher_topk(torch.randn(n, V, generator=g) * 3, k)
    return dict(
        student_logits=torch.randn(B, T, V, generator=g) * 3,
        input_ids=torch.randint(0, V, (B, T), generator=g),
        reason_mask=reason_mask,
        act_mask=act_mask,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        tail_logprob=tail_logprob,
    )


def step_fns(batch: dict[str, torch.Tensor]) -> dict[str, Callable[[], None]]:
    logits = batch["student_logits"].requires_grad_()
    B, T, V = logits.shape
    sup = (batch["reason_mask"] | batch["act_mask"])[:, 1:]  # [B, T-1]
    rows = F.pad(sup, (0, 1)).flatten().nonzero().squeeze(-1)  # [N] rows t-1 predicting supervised t
    target = batch["input_ids"][:, 1:][sup]  # [N]

    def objective(name: str) -> Callable[[], None]:
        cfg = LossConfig(objective=name)

        def step() -> None:
            distillation_loss(**batch, cfg=cfg).loss.backward()
            logits.grad = None

        return step

    def plain_ce() -> None:
        # The floor: torch's cross entropy on the same rows, no teacher and no tracking.
        F.cross_entropy(logits.reshape(B * T, V).index_select(0, rows), target).backward()
        logits.grad = None

    return {
        "sad": objective("sad"),
        "token_kd": objective("token_kd"),
        "sft": objective("sft"),
        "ce": plain_ce,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--B", type=int, default=4)
    parser.add_argument("--T", type=int, default=512)
    parser.add_argument("--V", type=int, default=49152)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)

    batch = make_batch(args.B, args.T, args.V, args.k, args.seed)
    n = len(batch["tail_logprob"])
    fns = step_fns(batch)
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    # Round-robin, so that load from other processes hits every method alike.
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}

    print(f"B={args.B} T={args.T} V={args.V} k={args.k}: N={n} supervised tokens, "
          f"median of {args.reps} forward+backward passes, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'loss':<10}{'median ms':>11}{'min ms':>9}{'x ce':>7}")
    for name, ts in times.items():
        print(
            f"{name:<10}{median[name] * 1e3:>11.0f}{min(ts) * 1e3:>9.0f}{median[name] / median['ce']:>7.2f}"
        )
    sad_over_kd = median["sad"] / median["token_kd"]
    print(f"sad/token_kd = {sad_over_kd:.3f}")
    print(f"sad/ce       = {median['sad'] / median['ce']:.3f}")
    if sad_over_kd > MAX_SAD_OVER_TOKEN_KD:
        print(
            f"FAIL: sad costs {sad_over_kd:.2f}x token_kd, above the {MAX_SAD_OVER_TOKEN_KD}x target",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
