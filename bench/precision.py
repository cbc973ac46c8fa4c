"""Tokens per second for training and for generation in each precision this host can run, measured in one run,
with the CPU model, its bf16 flags and what `precision: auto` picks here printed next to them.

- training: the student (`--layers` layers cut from the starter, as `make demo` builds it), one SAD training step
  (forward under autocast, loss, backward, AdamW) on `--batch` chats of `--tokens` tokens, 2 threads; the
  precisions take turns step by step and each reports its median;
- generation: the vLLM CPU engine (the starter, enforce_eager), `--prompts` chats x `--new-tokens` new tokens,
  ignoring EOS so every precision generates the same count; the engine's start-up is timed apart.

`python bench/precision.py [--precisions fp32,bf16,fp16 --skip-vllm]`. Ratios are against fp32 on this host. By
default fp16 is measured only on a CPU with fp16 arithmetic (`avx512_fp16`, `amx_fp16`): without it (an AMD EPYC
with avx512_bf16 here) a single fp16 matmul ran ~40x slower than fp32 and the training steps seemed to hang.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sad_ray.precision import BF16_CPU_FLAGS, cpu_flags, cpu_model, resolve_precision  # noqa: E402


def bench_training(student: Path, precisions: list[str], batch: int, tokens: int, rounds: int) -> dict[str, float]:
    """Supervised tokens per second of full training steps in each precision. The precisions take turns, one step
    each per round (after a warm-up step each), and each reports its median step: a load that comes and goes on the
    machine then falls on all of them alike instead of on whichever ran at the time."""
    import statistics

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from sad_ray.method.losses import LossConfig, teacher_topk
    from sad_ray.train.step import SupervisedHead, train_step

    torch.manual_seed(0)
    vocab = AutoModelForCausalLM.from_pretrained(student).config.vocab_size
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(0, vocab, size=(batch, tokens)))
    reason = torch.zeros(batch, tokens, dtype=torch.bool)
    act = torch.zeros(batch, tokens, dtype=torch.bool)
    reason[:, tokens // 4: tokens // 2] = True  # about a third of a chat is supervised, as in ALFWorld windows
    act[:, tokens // 2: tokens // 2 + tokens // 12] = True
    n = int((reason | act)[:, 1:].sum())
    top_ids, top_lp, tail = teacher_topk(torch.randn(n, vocab) * 3, 20)
    batch_t = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "reason_mask": reason, "act_mask": act,
               "topk_ids": top_ids.long(), "topk_logprobs": top_lp, "tail_logprob": tail}

    steps = {}
    for p in precisions:
        lm = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
        lm.config.use_cache = False
        head = SupervisedHead(lm)
        opt = torch.optim.AdamW(head.parameters(), lr=1e-5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        scaler = torch.amp.GradScaler("cpu") if p == "fp16" else None
        steps[p] = (lambda head=head, opt=opt, sched=sched, scaler=scaler, p=p: train_step(
            head, [batch_t], LossConfig(), vocab_size=vocab, precision=p, optimizer=opt, scheduler=sched,
            scaler=scaler))
        steps[p]()  # warm-up: kernels, allocator
    times: dict[str, list[float]] = {p: [] for p in precisions}
    for _ in range(rounds):
        for p in precisions:
            start = time.perf_counter()
            steps[p]()
            times[p].append(time.perf_counter() - start)
    return {p: n / statistics.median(t) for p, t in times.items()}


def bench_generation(model: Path, precision: str, prompts: int, new_tokens: int) -> tuple[float, float]:
    """(generated tokens per second, engine start-up seconds) of the vLLM CPU engine."""
    from vllm import SamplingParams

    from sad_ray.rollout.engines import EngineConfig, VLLMEngine

    start = time.perf_counter()
    engine = VLLMEngine(model, EngineConfig(max_model_len=2048), precision)
    startup = time.perf_counter() - start
    try:
        chats = [[{"role": "user", "content": f"Describe room {i} of a house in detail."}] for i in range(prompts)]
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        toks = [{"prompt_token_ids": engine.tokenizer.apply_chat_template(c, add_generation_prompt=True,
                                                                          tokenize=True, return_dict=True)["input_ids"]}
                for c in chats]
        engine.llm.generate(toks[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = engine.llm.generate(toks, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in outs) / seconds, startup
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    fp16 = ",fp16" if cpu_flags() & {"avx512_fp16", "amx_fp16"} else ""
    parser.add_argument("--precisions", default=f"fp32,bf16{fp16}")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5, help="timed training steps per precision, interleaved")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-vllm", action="store_true")
    args = parser.parse_args()

    import torch

    from sad_ray.models.starter import provision_starter
    from sad_ray.models.student import build_student
    from tests.conftest import cache_dir

    torch.set_num_threads(2)
    flags = sorted(cpu_flags() & BF16_CPU_FLAGS) or ["none"]
    print(f"CPU: {cpu_model()} | bf16 flags: {', '.join(flags)} | auto -> {resolve_precision('auto', 'cpu')}")
    starter = provision_starter(cache_dir())
    results: dict[str, dict[str, float | str]] = {}
    with tempfile.TemporaryDirectory(prefix="sad-ray-bench-precision-") as tmp:
        student = build_student(starter, Path(tmp) / "student", args.layers).path
        precisions = args.precisions.split(",")
        for p in precisions:
            results[p] = {}
        try:
            for p, rate in bench_training(student, precisions, args.batch, args.tokens, args.rounds).items():
                results[p]["train_tok_s"] = rate
        except Exception as exc:  # noqa: BLE001 - a precision this host cannot run is reported, not fatal
            for p in precisions:
                results[p]["train_tok_s"] = f"failed ({type(exc).__name__}: {str(exc)[:80]})"
        for p in precisions if not args.skip_vllm else []:
            try:
                results[p]["gen_tok_s"], results[p]["engine_start_s"] = bench_generation(
                    starter, p, args.prompts, args.new_tokens)
            except Exception as exc:  # noqa: BLE001
                results[p]["gen_tok_s"] = f"unsupported ({type(exc).__name__}: {str(exc)[:80]})"
        for p in precisions:
            print(p, json.dumps(results[p]))
    base = results.get("fp32", {})

    def ratio(row, key):
        v, b = row.get(key), base.get(key)
        return f"{v / b:.2f}" if isinstance(v, float) and isinstance(b, float) else "-"

    def num(row, key):
        v = row.get(key)
        return f"{v:.0f}" if isinstance(v, float) else (v or "-")

    print("\n| precision | train tok/s | x fp32 | generate tok/s | x fp32 | engine start s |")
    print("|---|---|---|---|---|---|")
    for p, row in results.items():
        print(f"| {p} | {num(row, 'train_tok_s')} | {ratio(row, 'train_tok_s')} | {num(row, 'gen_tok_s')} | "
              f"{ratio(row, 'gen_tok_s')} | {num(row, 'engine_start_s')} |")


if __name__ == "__main__":
    main()
