"""Evaluate agents on the same held-out tasks: each plays them to the end, then answers teacher-forced steps.

Playing: every agent plays every task greedily with the rollouts' prompts (system prompt, context window); each
step keeps its wall-clock seconds and generated tokens, so latency is the engine's (through HTTP: the endpoint's).
Teacher forcing (CoT match, action agreement; docs/evaluation.md): the agent sees the teacher's own history up to
each step of the teacher's held-out episodes and writes that step; its thought and action are compared with the
teacher's. The first agent is the reference whose episodes are forced (the teacher).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from sad_ray.envs.base import Episode, Task
from sad_ray.envs.react import context_window
from sad_ray.eval.metrics import normalise_action, rouge_l_f1, strip_thought_label
from sad_ray.method.segment import segment
from sad_ray.resources import check_resources, check_tensor_parallel
from sad_ray.rollout.agent import PlayConfig, PlayStats, parse_action, play
from sad_ray.rollout.engines import Engine, SamplingConfig, generate_timed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """`eval`: which held-out tasks every agent plays, how, and how results are summarised (docs/evaluation.md)."""

    # jobs/distill.py ends by serving the teacher and the student it trained and evaluating both through HTTP.
    enabled: bool = True
    envs: tuple[str, ...] = ("alfworld", "webshop", "hotpotqa")
    # Held-out tasks per environment, in the order of `envs` (ALFWorld's unseen rooms; WebShop's and HotPotQA's
    # test splits). Every agent plays the same ones, so comparisons are paired.
    tasks: tuple[int, ...] = (20, 10, 10)
    split: str = "test"
    # Step limit per episode; null keeps each environment's own (ALFWorld 50, WebShop 15, HotPotQA 8).
    max_steps: int | None = None
    max_new_tokens: int = 100
    # Episodes (and forced steps) in flight per agent: that many concurrent requests reach the endpoint.
    in_flight: int = 16
    # A generated thought matches the teacher's when ROUGE-L F1 >= this (reported with the results).
    cot_threshold: float = 0.5
    # Teacher-forced steps per teacher episode (the first ones; 0: every step). 0 episodes: no forcing at all.
    forced_steps_per_episode: int = 0
    forced_episodes: int = -1  # -1: every held-out teacher episode
    confidence: float = 0.95
    resamples: int = 2000  # bootstrap resamples of every mean's interval
    seed: int = 0
    # Students to evaluate beside the teacher (jobs/evaluate.py): directories or MLflow registry URIs; empty:
    # every student trained from this teacher (its folder's students/*).
    students: tuple[str, ...] = ()
    # The Serve app evaluation plays through (one deployment per agent; serve/config.py ModelSpec).
    engine: Literal["vllm", "hf"] = "vllm"
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per replica ({teacher_gpu: 1})
    tensor_parallel_size: int = 1  # GPUs per engine; num_gpus must cover them
    max_model_len: int = 4096
    kv_cache_gib: float = 2.0

    def __post_init__(self) -> None:
        from sad_ray.envs import ENVIRONMENTS
        from sad_ray.envs.base import SPLITS

        unknown = [e for e in self.envs if e not in ENVIRONMENTS]
        if unknown or not self.envs:
            raise ValueError(f"envs must name some of {', '.join(ENVIRONMENTS)}, got {list(self.envs)}")
        if len(self.tasks) != len(self.envs) or any(n < 0 for n in self.tasks) or not any(self.tasks):
            raise ValueError(f"tasks needs one count >= 0 per env ({len(self.envs)}: {list(self.envs)}), some > 0")
        if self.split not in SPLITS or self.split == "train":
            raise ValueError(f"split must be a held-out split (val or test), got {self.split!r}")
        if not 0 < self.cot_threshold <= 1:
            raise ValueError(f"cot_threshold must be in (0, 1], got {self.cot_threshold}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        check_resources("resources", self.resources)
        check_tensor_parallel(self.tensor_parallel_size, self.num_gpus)
        if self.in_flight < 1 or self.max_new_tokens < 1 or self.resamples < 100:
            raise ValueError("in_flight and max_new_tokens must be >= 1, resamples >= 100")
        if self.forced_steps_per_episode < 0 or self.forced_episodes < -1:
            raise ValueError("forced_steps_per_episode must be >= 0 and forced_episodes >= -1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        from sad_ray.rollout.engines import check_kv_cache_gib

        check_kv_cache_gib(self.kv_cache_gib)
        if self.engine not in ("vllm", "hf"):
            raise ValueError(f"engine must be 'vllm' or 'hf', got {self.engine!r}")


@dataclass(frozen=True)
class ForcedStep:
    """One teacher-forced step: what the teacher wrote there and what the agent wrote instead."""

    episode: str
    env: str
    task_type: str
    step: int  # 0-based index of the teacher's assistant turn
    teacher_thought: str
    teacher_action: str | None
    thought: str
    action: str | None
    rouge_l: float
    action_agrees: bool
    seconds: float
    tokens: int

    def matches(self, threshold: float) -> bool:
        return self.rouge_l >= threshold


@dataclass
class AgentRun:
    """Everything one agent did in an evaluation, as stored (episodes.jsonl and forced.jsonl)."""

    name: str
    parameters: int
    episodes: list[Episode] = field(default_factory=list)
    forced: list[ForcedStep] = field(default_factory=list)
    seconds: float = 0.0


def held_out_tasks(cfg: EvalConfig, env_kwargs: dict[str, dict] | None = None) -> list[Task]:
    """The same held-out tasks for every agent: `cfg.tasks[i]` of environment `cfg.envs[i]`'s held-out split."""
    from sad_ray.envs import make_env

    tasks: list[Task] = []
    for name, n in zip(cfg.envs, cfg.tasks, strict=True):
        if n:
            env = make_env(name, **(env_kwargs or {}).get(name, {}))
            tasks.extend(env.tasks(cfg.split, n))
            env.close()
    return tasks


def thought_and_action(text: str, fmt: str, on_unparsed: str = "reason") -> tuple[str, str | None]:
    """A turn's thought (its [REASON] spans, label removed) and its action (the last `Action:` line)."""
    reason = " ".join(text[s.start:s.end] for s in segment(text, fmt, on_unparsed).spans if s.kind == "reason")
    return strip_thought_label(reason), parse_action(text)


def reason_texts(text: str, fmt: str, on_unparsed: str = "reason") -> str:
    """The text of a turn's [REASON] spans, as the loss masks see it (labels included)."""
    return "".join(text[s.start:s.end] for s in segment(text, fmt, on_unparsed).spans if s.kind == "reason")


def play_agent(engine: Engine, tasks: Sequence[Task], cfg: EvalConfig, context_chars: int | None,
               env_kwargs: dict[str, dict] | None = None, stats: PlayStats | None = None) -> list[Episode]:
    """Every task played to its end, greedily; episodes in the order of `tasks`."""
    from sad_ray.envs import make_env

    kwargs = env_kwargs or {}

    def env_of(name: str):
        env = make_env(name, **kwargs.get(name, {}))
        if cfg.max_steps is not None:  # a cap on the environment's own limit, never a raise of it
            env.max_steps = min(env.max_steps, cfg.max_steps)
        return env

    play_cfg = PlayConfig(max_in_flight=cfg.in_flight, context_chars=context_chars,
                          sampling=SamplingConfig(temperature=0.0, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed))
    order = {t.id: i for i, t in enumerate(tasks)}
    episodes: list[Episode] = []
    start = time.perf_counter()
    for ep in play(engine, env_of, tasks, play_cfg, stats):
        episodes.append(ep)
        elapsed = time.perf_counter() - start
        log.info("eval %s: %d/%d episodes (%s %s in %d steps), %.0f s, ~%.0f s left", engine.model_id,
                 len(episodes), len(tasks), ep.id, "won" if ep.success else "lost", ep.steps, elapsed,
                 elapsed / len(episodes) * (len(tasks) - len(episodes)))
    return sorted(episodes, key=lambda e: order[e.id])


def forced_prompts(teacher: Sequence[Episode], cfg: EvalConfig) -> Iterator[tuple[Episode, int, int]]:
    """(episode, step, index of the teacher's turn) of every step to force, in order."""
    chosen = teacher if cfg.forced_episodes < 0 else teacher[:cfg.forced_episodes]
    for ep in chosen:
        steps = [i for i, t in enumerate(ep.turns) if t["role"] == "assistant"]
        if cfg.forced_steps_per_episode:
            steps = steps[:cfg.forced_steps_per_episode]
        for step, index in enumerate(steps):
            yield ep, step, index


def force_agent(engine: Engine, teacher: Sequence[Episode], cfg: EvalConfig, context_chars: int | None,
                fmt: str, on_unparsed: str = "reason") -> list[ForcedStep]:
    """The agent's turn at every forced step of the teacher's episodes, given the teacher's history before it."""
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    todo = list(forced_prompts(teacher, cfg))
    out: list[ForcedStep] = []
    for start in range(0, len(todo), cfg.in_flight):
        batch = todo[start:start + cfg.in_flight]
        turns = generate_timed(engine, [context_window(list(ep.turns[:i]), context_chars) for ep, _, i in batch],
                               sampling)
        for (ep, step, index), turn in zip(batch, turns, strict=True):
            t_thought, t_action = thought_and_action(ep.turns[index]["content"], fmt, on_unparsed)
            thought, action = thought_and_action(turn.text, fmt, on_unparsed)
            out.append(ForcedStep(
                episode=ep.id, env=ep.env, task_type=ep.task_type, step=step, teacher_thought=t_thought,
                teacher_action=t_action, thought=thought, action=action, rouge_l=rouge_l_f1(thought, t_thought),
                action_agrees=t_action is not None and normalise_action(action) == normalise_action(t_action),
                seconds=turn.seconds, tokens=turn.completion_tokens))
    return out


def evaluate_agent_run(name: str, parameters: int, engine: Engine, tasks: Sequence[Task],
                       teacher: Sequence[Episode] | None, cfg: EvalConfig, context_chars: int | None, fmt: str,
                       on_unparsed: str = "reason", env_kwargs: dict[str, dict] | None = None) -> AgentRun:
    """One agent: play the tasks, then (given the teacher's episodes) answer the teacher-forced steps."""
    start = time.perf_counter()
    episodes = play_agent(engine, tasks, cfg, context_chars, env_kwargs)
    forced_on = episodes if teacher is None else teacher
    forced = force_agent(engine, forced_on, cfg, context_chars, fmt, on_unparsed) if cfg.forced_episodes else []
    return AgentRun(name, parameters, episodes, forced, time.perf_counter() - start)


def episode_row(agent: str, ep: Episode) -> dict:
    """An episode as one JSON line of episodes.jsonl."""
    return {"agent": agent, **asdict(ep), "turns": list(ep.turns)}


def episode_of(row: dict) -> Episode:
    fields = {k: v for k, v in row.items() if k != "agent"}
    return Episode(**{**fields, "turns": tuple(fields["turns"]), "step_seconds": tuple(fields["step_seconds"]),
                      "step_tokens": tuple(fields["step_tokens"])})


EngineFactory = Callable[[str], Engine]
