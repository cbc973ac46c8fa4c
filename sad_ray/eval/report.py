"""Evaluation results as tables, plots and files, regenerated from the stored runs (never typed by hand).

Rows are agent x environment x task type, with an `all` row per environment and per agent; every rate carries a
Wilson interval and every mean a bootstrap interval (sad_ray.eval.metrics). Paired differences compare each agent
with the reference (the first agent, the teacher) on the same tasks.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sad_ray.envs.base import Episode
from sad_ray.eval.evaluate import AgentRun, EvalConfig, reason_texts
from sad_ray.eval.metrics import NAN, Interval, bootstrap_mean, paired_difference, percentile, wilson
from sad_ray.rollout.agent import parse_action

ALL = "all"
CountTokens = Callable[[str], int]


class ReasonTokens:
    """Tokens in a turn's [REASON] spans, each distinct turn segmented and tokenized once (rows and paired
    differences both ask for every turn)."""

    def __init__(self, count_tokens: CountTokens, fmt: str, on_unparsed: str = "reason") -> None:
        self.count_tokens, self.fmt, self.on_unparsed = count_tokens, fmt, on_unparsed
        self._cache: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        if text not in self._cache:
            self._cache[text] = self.count_tokens(reason_texts(text, self.fmt, self.on_unparsed))
        return self._cache[text]


@dataclass(frozen=True)
class Row:
    agent: str
    env: str
    task_type: str
    parameters: int
    episodes: int
    success: Interval
    reward: Interval
    em: Interval
    f1: Interval
    steps: Interval
    reason_tokens_per_step: Interval
    reason_tokens_per_episode: Interval
    forced_steps: int
    cot_match: Interval
    action_agreement: Interval
    step_seconds_p50: float
    step_seconds_p95: float
    episode_seconds: Interval
    tokens_per_second: float
    turns: int
    no_action: Interval


@dataclass(frozen=True)
class Diff:
    """`agent` minus `reference` over the tasks both played, per environment (`all`: every task)."""

    agent: str
    reference: str
    env: str
    tasks: int
    success: Interval
    steps: Interval
    episode_seconds: Interval
    reason_tokens_per_episode: Interval


def _groups(run: AgentRun) -> list[tuple[str, str]]:
    keys = sorted({(e.env, e.task_type) for e in run.episodes} | {(f.env, f.task_type) for f in run.forced})
    envs = sorted({k[0] for k in keys})
    out: list[tuple[str, str]] = []
    for env in envs:
        out.extend(k for k in keys if k[0] == env)
        out.append((env, ALL))
    return [*out, (ALL, ALL)]


def _in(env: str, task_type: str, item_env: str, item_type: str) -> bool:
    return env in (ALL, item_env) and task_type in (ALL, item_type)


def _assistant(ep: Episode) -> list[str]:
    return [t["content"] for t in ep.turns if t["role"] == "assistant"]


def rows(runs: Sequence[AgentRun], cfg: EvalConfig, reason_tokens: ReasonTokens) -> list[Row]:
    """Every agent x environment x task type (and `all`) row, with intervals."""
    conf, boot = cfg.confidence, {"confidence": cfg.confidence, "resamples": cfg.resamples, "seed": cfg.seed}
    out: list[Row] = []
    for run in runs:
        for env, tt in _groups(run):
            eps = [e for e in run.episodes if _in(env, tt, e.env, e.task_type)]
            forced = [f for f in run.forced if _in(env, tt, f.env, f.task_type)]
            # CoT match counts the steps where the teacher wrote a thought, action agreement those where it acted.
            thought = [f for f in forced if f.teacher_thought]
            acted = [f for f in forced if f.teacher_action is not None]
            turns = [t for e in eps for t in _assistant(e)]
            per_step = [reason_tokens(t) for t in turns]
            per_episode = [sum(reason_tokens(t) for t in _assistant(e)) for e in eps]
            seconds = [s for e in eps for s in e.step_seconds]
            tokens = sum(n for e in eps for n in e.step_tokens)
            scored = {k: [e.scores[k] for e in eps if k in e.scores] for k in ("em", "f1")}
            out.append(Row(
                agent=run.name, env=env, task_type=tt, parameters=run.parameters, episodes=len(eps),
                success=wilson(sum(e.success for e in eps), len(eps), conf),
                reward=bootstrap_mean([e.reward for e in eps], **boot),
                em=bootstrap_mean(scored["em"], **boot), f1=bootstrap_mean(scored["f1"], **boot),
                steps=bootstrap_mean([e.steps for e in eps], **boot),
                reason_tokens_per_step=bootstrap_mean(per_step, **boot),
                reason_tokens_per_episode=bootstrap_mean(per_episode, **boot),
                forced_steps=len(forced),
                cot_match=wilson(sum(f.matches(cfg.cot_threshold) for f in thought), len(thought), conf),
                action_agreement=wilson(sum(f.action_agrees for f in acted), len(acted), conf),
                step_seconds_p50=percentile(seconds, 50), step_seconds_p95=percentile(seconds, 95),
                episode_seconds=bootstrap_mean([sum(e.step_seconds) for e in eps], **boot),
                tokens_per_second=tokens / sum(seconds) if seconds and sum(seconds) > 0 else math.nan,
                turns=len(turns),
                no_action=wilson(sum(parse_action(t) is None for t in turns), len(turns), conf),
            ))
    return out


def diffs(runs: Sequence[AgentRun], cfg: EvalConfig, reason_tokens: ReasonTokens) -> list[Diff]:
    """Each agent after the first minus the first, paired by task, per environment and over all tasks."""
    if len(runs) < 2:
        return []
    boot = {"confidence": cfg.confidence, "resamples": cfg.resamples, "seed": cfg.seed}
    ref = runs[0]
    ref_eps = {e.id: e for e in ref.episodes}

    def reason(ep: Episode) -> float:
        return sum(reason_tokens(t) for t in _assistant(ep))

    out: list[Diff] = []
    for run in runs[1:]:
        pairs = [(e, ref_eps[e.id]) for e in run.episodes if e.id in ref_eps]
        for env in [*sorted({e.env for e, _ in pairs}), ALL]:
            sel = [(a, b) for a, b in pairs if env in (ALL, a.env)]

            def diff(metric: Callable[[Episode], float], sel=sel) -> Interval:
                return paired_difference([metric(a) for a, _ in sel], [metric(b) for _, b in sel], **boot) \
                    if sel else NAN

            out.append(Diff(run.name, ref.name, env, len(sel), diff(lambda e: float(e.success)),
                            diff(lambda e: float(e.steps)), diff(lambda e: sum(e.step_seconds)), diff(reason)))
    return out


# ----------------------------------------------------------------------------------------------- rendering


def _num(x: float, digits: int = 2) -> str:
    return "n/a" if math.isnan(x) else f"{x:.{digits}f}"


def _params(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n >= 1e6 else str(n)


def markdown(table: Sequence[Row], differences: Sequence[Diff], cfg: EvalConfig) -> str:
    """The full table (every group) and the paired differences, with how to read them."""
    lines = [
        f"Success and CoT match / action agreement: rate [{cfg.confidence:.0%} Wilson interval]; means: "
        f"[{cfg.confidence:.0%} bootstrap interval, {cfg.resamples} resamples]. CoT match: ROUGE-L F1 >= "
        f"{cfg.cot_threshold} against the teacher's thought, teacher-forced (docs/evaluation.md). Latency is wall "
        "clock per request through the endpoint.",
        "",
        "| agent | env | task type | params | episodes | success | reward | steps | reason tok/step | "
        "reason tok/episode | CoT match | action agreement | s/step p50 | s/step p95 | s/episode | tok/s | "
        "no action |",
        "|" + "---|" * 17,
    ]
    for r in table:
        lines.append(
            f"| {r.agent} | {r.env} | {r.task_type} | {_params(r.parameters)} | {r.episodes} | "
            f"{r.success.show(percent=True)} | {r.reward.show()} | {r.steps.show(digits=1)} | "
            f"{r.reason_tokens_per_step.show(digits=1)} | {r.reason_tokens_per_episode.show(digits=0)} | "
            f"{r.cot_match.show(percent=True)} (n={r.forced_steps}) | {r.action_agreement.show(percent=True)} | "
            f"{_num(r.step_seconds_p50)} | {_num(r.step_seconds_p95)} | {r.episode_seconds.show(digits=1)} | "
            f"{_num(r.tokens_per_second, 1)} | {r.no_action.show(percent=True)} |")
    hotpot = [r for r in table if r.env == "hotpotqa"]
    if hotpot:
        lines += ["", "HotPotQA answers:", "", "| agent | task type | EM | F1 |", "|---|---|---|---|"]
        lines += [f"| {r.agent} | {r.task_type} | {r.em.show()} | {r.f1.show()} |" for r in hotpot]
    if differences:
        lines += ["", f"Paired differences, agent minus {differences[0].reference}, on the same tasks "
                  f"[{cfg.confidence:.0%} bootstrap interval over tasks]:", "",
                  "| agent | env | tasks | success | steps | s/episode | reason tok/episode |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {d.agent} | {d.env} | {d.tasks} | {d.success.show()} | {d.steps.show(digits=1)} | "
                  f"{d.episode_seconds.show(digits=1)} | {d.reason_tokens_per_episode.show(digits=0)} |"
                  for d in differences]
    return "\n".join(lines) + "\n"


def summary_markdown(table: Sequence[Row]) -> str:
    """One line per agent over all tasks: what the main job prints."""
    lines = ["| agent | params | success | s/step p50 | s/step p95 | CoT match | action agreement |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        if r.env == ALL:
            lines.append(f"| {r.agent} | {_params(r.parameters)} | {r.success.show(percent=True)} | "
                         f"{_num(r.step_seconds_p50)} | {_num(r.step_seconds_p95)} | "
                         f"{r.cot_match.show(percent=True)} | {r.action_agreement.show(percent=True)} |")
    return "\n".join(lines) + "\n"


def _flat(obj) -> dict:
    out: dict = {}
    for key, value in vars(obj).items():
        if isinstance(value, Interval):
            out.update({key: value.value, f"{key}_low": value.low, f"{key}_high": value.high})
        else:
            out[key] = value
    return out


def to_csv(items: Sequence[Row] | Sequence[Diff]) -> str:
    buf = io.StringIO()
    flat = [_flat(i) for i in items]
    if flat:
        writer = csv.DictWriter(buf, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    return buf.getvalue()


def plots(table: Sequence[Row], out_dir: Path) -> list[Path]:
    """success_vs_latency.png (one point per agent; marker area by parameters) and success_by_task_type.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overall = [r for r in table if r.env == ALL]
    biggest = max((r.parameters for r in overall), default=1) or 1
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in overall:
        ax.errorbar(r.step_seconds_p50, r.success.value,
                    yerr=[[r.success.value - r.success.low], [r.success.high - r.success.value]], fmt="none",
                    ecolor="grey", capsize=3)
        ax.scatter(r.step_seconds_p50, r.success.value, s=60 + 600 * r.parameters / biggest, alpha=0.7,
                   label=f"{r.agent} ({_params(r.parameters)})")
    ax.set_xlabel("seconds per step, p50 (through HTTP)")
    ax.set_ylabel("success rate (Wilson interval)")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("Success vs latency (marker area: parameters)")
    fig.tight_layout()
    first = out_dir / "success_vs_latency.png"
    fig.savefig(first, dpi=120)
    plt.close(fig)

    typed = [r for r in table if r.env != ALL and r.task_type != ALL]
    groups = sorted({(r.env, r.task_type) for r in typed})
    agents = list(dict.fromkeys(r.agent for r in typed))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(groups) * max(1, len(agents))), 4.5))
    width = 0.8 / max(1, len(agents))
    for i, agent in enumerate(agents):
        by = {(r.env, r.task_type): r for r in typed if r.agent == agent}
        xs = [g + i * width for g in range(len(groups))]
        vals = [by[k].success.value if k in by else 0.0 for k in groups]
        ax.bar(xs, vals, width, label=agent)
    ax.set_xticks([g + width * (len(agents) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{e}\n{t}" for e, t in groups], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("success rate")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("Success per task type")
    fig.tight_layout()
    second = out_dir / "success_by_task_type.png"
    fig.savefig(second, dpi=120)
    plt.close(fig)
    return [first, second]
