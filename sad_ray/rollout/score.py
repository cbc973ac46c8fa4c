"""Turn finished teacher chats into trajectory records: segment, build masks, score with the teacher."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sad_ray.envs.base import Episode
from sad_ray.envs.react import episode_windows
from sad_ray.method.curriculum import bucket_entropy
from sad_ray.method.masks import MaskResult, build_masks
from sad_ray.models.identity import teacher_id
from sad_ray.records import TrajectoryRecord, window_id
from sad_ray.rollout.engines import Engine

log = logging.getLogger(__name__)


@dataclass
class ScoreReport:
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    segmentation_issues: Counter = field(default_factory=Counter)


def score_episodes(
    episodes: Iterable[Episode],
    tokenizer,
    engine: Engine,
    *,
    fmt: str,
    top_k: int,
    fingerprint: str,
    on_unparsed: str = "reason",
    drop_with_issues: bool = False,
    max_tokens: int = 1024,
    report: ScoreReport | None = None,
    on_drop: Callable[[Episode, str], None] | None = None,
    score_batch: int = 16,
    context_chars: int | None = None,
    teacher_model: str | None = None,
    policy: str = "teacher",
    round: int = 0,
) -> Iterator[TrajectoryRecord]:
    """Records for the episodes that pass; every drop is counted by reason in `report` (and told to `on_drop`).

    Each record's `teacher_model` is `teacher_model` if given, else the engine's teacher id (`engine_teacher_id`).

    With `context_chars`, a chat longer than that is cut into windows the way the agent loop sees it
    (`episode_windows`): one record per window, ids `<episode id>#w<n>`, each assistant turn supervised once.

    `policy` and `round` say who played the episodes (the teacher, or the student in an on-policy round); an
    episode's `teacher_turns` become each record's indices of the turns the teacher wrote.
    """
    report = report if report is not None else ScoreReport()
    teacher = teacher_model or engine_teacher_id(engine)

    def drop(ep: Episode, reason: str) -> None:
        report.dropped[reason] += 1
        if on_drop is not None:
            on_drop(ep, reason)

    pending: list[tuple[Episode, MaskResult]] = []
    for episode in episodes:
        windows = episode_windows(episode.turns, context_chars)
        # A window holds the episode's own turn objects: the teacher's turns are found in it by identity.
        written = {id(episode.turns[i]) for i in episode.teacher_turns}
        for n, (chat, supervised_turns) in enumerate(windows):
            ep = replace(episode, id=episode.id if len(windows) == 1 else window_id(episode.id, n), turns=tuple(chat),
                         teacher_turns=tuple(i for i, t in enumerate(chat) if id(t) in written))
            masks = build_masks(tokenizer, list(ep.turns), fmt, on_unparsed=on_unparsed,
                                supervised_turns=None if len(windows) == 1 else set(supervised_turns))
            report.segmentation_issues.update(masks.issues)
            sup = masks.reason_mask | masks.act_mask
            if drop_with_issues and sum(masks.issues.values()):
                drop(ep, "segmentation_issue")
            elif not sup.any():
                drop(ep, "nothing_supervised")
            elif len(masks.input_ids) > max_tokens:
                drop(ep, "too_long")
            else:
                pending.append((ep, masks))
            if len(pending) >= score_batch:
                yield from _scored(pending, engine, top_k, fingerprint, report, teacher, policy, round)
                pending = []
    yield from _scored(pending, engine, top_k, fingerprint, report, teacher, policy, round)


def engine_teacher_id(engine: Engine) -> str:
    """The id records carry for the engine's model: `teacher_id` of its folder (name and weights fingerprint);
    an engine that is not a model folder (the demonstrations) keeps its own `model_id`."""
    path = Path(engine.model_id)
    return teacher_id(path) if (path / "config.json").is_file() else engine.model_id


def _scored(
    pending: list[tuple[Episode, MaskResult]], engine: Engine, top_k: int, fingerprint: str,
    report: ScoreReport, teacher: str, policy: str, round: int,
) -> Iterator[TrajectoryRecord]:
    """One engine call scores the whole batch (vLLM batches the prefills)."""
    if not pending:
        return
    scores = engine.score([m.input_ids for _, m in pending], [m.reason_mask | m.act_mask for _, m in pending], top_k)
    for (ep, masks), (ids, lp, tail) in zip(pending, scores, strict=True):
        report.kept += 1
        yield TrajectoryRecord(
            id=ep.id, env=ep.env, task_type=ep.task_type, split=ep.split, turns=tuple(ep.turns),
            input_ids=masks.input_ids, reason_mask=masks.reason_mask, act_mask=masks.act_mask,
            topk_ids=ids, topk_logprobs=lp, tail_logprob=tail, success=ep.success, reward=ep.reward,
            steps=ep.steps, teacher_entropy=float(np.mean(bucket_entropy(lp, tail))),
            teacher_model=teacher, tokenizer_fingerprint=fingerprint, policy=policy, round=round,
            teacher_turns=tuple(ep.teacher_turns),
        )
