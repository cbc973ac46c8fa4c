"""Play held-out tasks with a model as the agent and measure it: success, steps, reasoning length, latency.

The model plays through a teacher engine (vLLM by default) with the same prompts and context window as the
rollouts, greedy; every environment's tasks share one in-flight batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sad_ray.atomic import replacing_file
from sad_ray.envs.base import Episode, Task
from sad_ray.rollout.agent import PlayConfig, PlayStats, play
from sad_ray.rollout.engines import EngineConfig, SamplingConfig, make_engine

log = logging.getLogger(__name__)


@dataclass
class EvalReport:
    episodes: list[Episode] = field(default_factory=list)
    seconds: float = 0.0
    turns_without_action: int = 0

    def by(self, key) -> dict[str, list[Episode]]:
        groups: dict[str, list[Episode]] = defaultdict(list)
        for ep in self.episodes:
            groups[key(ep)].append(ep)
        return dict(groups)

    def success_rate(self, env: str | None = None) -> float:
        eps = [e for e in self.episodes if env is None or e.env == env]
        return sum(e.success for e in eps) / len(eps) if eps else 0.0

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        out: dict[str, float] = {f"{prefix}/episodes": len(self.episodes), f"{prefix}/seconds": self.seconds,
                                 f"{prefix}/success_rate": self.success_rate(),
                                 f"{prefix}/turns_without_action": self.turns_without_action}
        for env, eps in self.by(lambda e: e.env).items():
            out[f"{prefix}/success_rate/{env}"] = sum(e.success for e in eps) / len(eps)
            out[f"{prefix}/mean_steps/{env}"] = sum(e.steps for e in eps) / len(eps)
            out[f"{prefix}/mean_reward/{env}"] = sum(e.reward for e in eps) / len(eps)
        for (env, tt), eps in self.by(lambda e: (e.env, e.task_type)).items():
            out[f"{prefix}/success_rate/{env}/{tt}"] = sum(e.success for e in eps) / len(eps)
        return out

    def table(self) -> str:
        """Markdown: success per environment and task type."""
        lines = ["| env | task type | won | episodes | rate |", "|---|---|---|---|---|"]
        counts: Counter = Counter()
        won: Counter = Counter()
        for ep in self.episodes:
            counts[(ep.env, ep.task_type)] += 1
            won[(ep.env, ep.task_type)] += ep.success
        for key in sorted(counts):
            lines.append(f"| {key[0]} | {key[1]} | {won[key]} | {counts[key]} | {won[key] / counts[key]:.0%} |")
        return "\n".join(lines)

    def write_episodes(self, path: str | Path) -> Path:
        """Every played episode as one JSON line (task, outcome, steps, the whole chat) to read failures from."""
        path = Path(path)
        with replacing_file(path) as tmp, tmp.open("w") as f:
            for ep in self.episodes:
                f.write(json.dumps({"id": ep.id, "env": ep.env, "task_type": ep.task_type, "won": ep.success,
                                    "reward": ep.reward, "steps": ep.steps, "turns": list(ep.turns)}) + "\n")
        return path


def evaluate_agent(
    model_dir: str | Path,
    tasks: Sequence[Task],
    engine: EngineConfig | None = None,
    *,
    max_steps: int | None = None,
    max_new_tokens: int = 100,
    context_chars: int | None = 3000,
    max_in_flight: int = 32,
    env_kwargs: dict[str, dict] | None = None,
    precision: str = "auto",
) -> EvalReport:
    """Play every task greedily with the model at `model_dir`; episodes keep their full chats.

    `max_steps` None keeps each environment's own step limit (ALFWorld 50, WebShop 15, HotPotQA 8).
    """
    from sad_ray.envs import make_env

    env_kwargs = env_kwargs or {}
    limit = {} if max_steps is None else {"max_steps": max_steps}
    report = EvalReport()
    start = time.perf_counter()
    agent = make_engine(model_dir, engine or EngineConfig(), precision)
    stats = PlayStats()
    cfg = PlayConfig(max_in_flight=max_in_flight, context_chars=context_chars,
                     sampling=SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens))
    try:
        for ep in play(agent, lambda name: make_env(name, **{**limit, **env_kwargs.get(name, {})}),
                       tasks, cfg, stats):
            report.episodes.append(ep)
            log.info("eval %s: %s in %d steps", ep.id, "won" if ep.success else "lost", ep.steps)
    finally:
        agent.close()
    report.seconds = time.perf_counter() - start
    report.turns_without_action = stats.turns_without_action
    return report

