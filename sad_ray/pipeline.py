"""The distillation job's stages, wired together: models -> teacher records -> student training.

Each stage records itself in MLflow as a child run and leaves its output in `paths.output_dir`, where a rerun
finds it: records already written are skipped, a finished student is not trained again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from sad_ray import tracking
from sad_ray.config import Config, resolve_auto, to_flat_dict
from sad_ray.envs.base import Episode
from sad_ray.envs.seed import seed_episodes
from sad_ray.records import ShardWriter, finished_episodes, iter_records, read_records, write_jsonl
from sad_ray.rollout.score import ScoreReport, score_episodes

log = logging.getLogger(__name__)


def load_episodes(path: str | Path) -> Iterator[Episode]:
    """Episodes from a JSON-lines file; a bad line is an error naming the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.trajectories: no file at {path}")
    required = {"id": str, "env": str, "task_type": str, "split": str, "turns": list}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
            for name, kind in required.items():
                if not isinstance(row.get(name), kind):
                    raise ValueError(f"{path}:{lineno}: field {name!r} must be a {kind.__name__}, got {row.get(name)!r}")
            yield Episode(
                id=row["id"], env=row["env"], task_type=row["task_type"], split=row["split"], turns=row["turns"],
                success=bool(row.get("success", True)), reward=float(row.get("reward", 1.0)),
                steps=int(row.get("steps", sum(t.get("role") == "assistant" for t in row["turns"] if isinstance(t, dict)))),
            )


def episodes_for(cfg: Config) -> list[Episode]:
    if cfg.data.source == "jsonl":
        return list(load_episodes(cfg.data.trajectories))
    if cfg.data.source == "seed":
        return seed_episodes(cfg.data.seed_episodes)
    return list(demonstrations(cfg))


def demonstrations(cfg: Config) -> Iterator[Episode]:
    """Expert demonstrations in ReAct form from the training split of each configured environment."""
    from sad_ray.envs import make_env
    from sad_ray.envs.react import demonstration

    for name in cfg.data.envs:
        env = make_env(name, **env_kwargs(cfg).get(name, {}))
        try:
            for task in env.tasks("train", cfg.data.episodes_per_env):
                yield demonstration(env, task)
        finally:
            env.close()


def stage_models(cfg: Config, out: Path) -> tuple[Path, Path, int]:
    """Teacher and student directories and the shared vocabulary size."""
    from sad_ray.models.starter import resolve_model
    from sad_ray.models.student import build_student
    from sad_ray.models.tokenizers import check_compatible

    cache = Path(cfg.paths.cache_dir).expanduser()
    with tracking.stage_run("models"):
        teacher = resolve_model(cfg.models.teacher, cache)
        if cfg.models.student:
            student = resolve_model(cfg.models.student, cache)
        else:
            student = out / "student-init"
            info_path = student / "sad_ray_student.json"
            if not info_path.exists():
                info = build_student(teacher, student, cfg.models.student_layers, cfg.models.trust_remote_code)
                tracking.log_metrics({"teacher_params": info.teacher_params, "student_params": info.student_params})
        vocab = check_compatible(teacher, student, cfg.models.trust_remote_code)
        tracking.log_metrics({"shared_vocab": vocab})
    return teacher, student, vocab


def stage_records(cfg: Config, teacher: Path, records_dir: Path) -> ScoreReport:
    """Teacher records for every episode not yet written: scored demonstrations or the teacher's rollouts."""
    if cfg.data.source == "rollouts":
        return stage_rollouts(cfg, teacher, records_dir)
    from transformers import AutoTokenizer

    from sad_ray.models.tokenizers import tokenizer_fingerprint
    from sad_ray.rollout.engines import HFTeacherEngine

    report = ScoreReport()
    with tracking.stage_run("records", {"top_k": cfg.records.top_k, "format": cfg.segment.format}):
        done = finished_episodes(records_dir)
        todo = [e for e in episodes_for(cfg) if e.id not in done]
        log.info("records: %d episodes to score, %d already done", len(todo), len(done))
        if todo:
            tokenizer = AutoTokenizer.from_pretrained(teacher, trust_remote_code=cfg.models.trust_remote_code)
            engine = HFTeacherEngine(teacher, trust_remote_code=cfg.models.trust_remote_code)
            with ShardWriter(records_dir, cfg.records.records_per_shard) as writer:
                for record in score_episodes(
                    todo, tokenizer, engine, fmt=cfg.segment.format, top_k=cfg.records.top_k,
                    fingerprint=tokenizer_fingerprint(tokenizer), on_unparsed=cfg.segment.on_unparsed,
                    drop_with_issues=cfg.segment.drop_trajectories_with_issues, max_tokens=cfg.data.max_tokens,
                    report=report, context_chars=cfg.rollout.context_chars,
                ):
                    writer.add(record)
        tracking.log_metrics({
            "records_written": report.kept, "records_total": len(done) + report.kept,
            **{f"dropped/{k}": v for k, v in report.dropped.items()},
            **{f"segmentation/{k}": v for k, v in report.segmentation_issues.items()},
        })
    return report


def env_kwargs(cfg: Config) -> dict[str, dict]:
    return {"alfworld": {"cache_dir": str(Path(cfg.paths.cache_dir).expanduser() / "alfworld")}}


def stage_rollouts(cfg: Config, teacher: Path, records_dir: Path) -> ScoreReport:
    """The teacher plays the environments on Ray Data; records are streamed into shards."""
    import mlflow

    from sad_ray.rollout.pipeline import SegmentSettings, run_rollouts

    seg = SegmentSettings(fmt=cfg.segment.format, on_unparsed=cfg.segment.on_unparsed,
                          drop_with_issues=cfg.segment.drop_trajectories_with_issues, top_k=cfg.records.top_k,
                          max_tokens=cfg.data.max_tokens)
    with tracking.stage_run("rollout", {f"rollout.{k}": v for k, v in to_flat_dict(cfg.rollout).items()}):
        result = run_rollouts(teacher, records_dir, cfg.rollout, seg, env_kwargs(cfg), cfg.records.records_per_shard)
        tracking.log_metrics(result.metrics())
        if result.shards:
            sample = [r.to_row() for r in read_records(result.shards[0])[:3]]
            write_jsonl(sample, records_dir.parent / "rollout_sample.jsonl")
            mlflow.log_artifact(str(records_dir.parent / "rollout_sample.jsonl"))
    log.info("rollout: %s", result.metrics())
    return ScoreReport(kept=result.written, dropped=result.dropped)


def stage_train(cfg: Config, records_dir: Path, student_init: Path, vocab: int, out: Path) -> dict:
    """The student trained on the records under Ray Train (sad_ray.train.ray_train), then registered in MLflow."""
    import itertools

    import mlflow

    from sad_ray.train.ray_train import train_student

    with tracking.stage_run("train", {"objective": cfg.loss.objective,
                                      **{f"train.{k}": v for k, v in to_flat_dict(cfg.train).items()}}) as run:
        if records_dir.exists() and not (out / "records_sample.jsonl").exists():
            write_jsonl([r.to_row() for r in itertools.islice(iter_records(records_dir), 3)],
                        out / "records_sample.jsonl")
            mlflow.log_artifact(str(out / "records_sample.jsonl"))
        result = train_student(
            records_dir, student_init, out, cfg.train, cfg.loss, cfg.curriculum, run_name="train",
            tracking_uri=cfg.tracking.tracking_uri, mlflow_run_id=run.info.run_id,
            trust_remote_code=cfg.models.trust_remote_code,
        )
        tracking.log_metrics({"train/final_loss": result.loss, "train/tokens_per_second": result.tokens_per_second,
                              "train/data_wait_fraction": result.data_wait_seconds / result.seconds
                              if result.seconds else 0.0})
        marker = Path(result.student_dir) / "sad_ray_registered.json"
        if not marker.exists():
            version = tracking.register_model(Path(result.student_dir), cfg.tracking.register_student_as)
            marker.write_text(json.dumps({"name": cfg.tracking.register_student_as, "version": version}))
        summary = {**asdict(result), "tokens_per_second": result.tokens_per_second,
                   "registered": json.loads(marker.read_text())}
    return summary


def run_train_job(cfg: Config) -> dict:
    """`jobs/train_student.py`: train the student on the records already in `output_dir/records`."""
    import torch

    torch.set_num_threads(cfg.train.threads)
    cfg = resolve_auto(cfg)
    out = Path(cfg.paths.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with tracking.job_run(cfg, "train_student") as run:
        _, student_init, vocab = stage_models(cfg, out)
        summary = stage_train(cfg, out / "records", student_init, vocab, out)
        return {"mlflow_run_id": run.info.run_id, "student": str(out / "student"), "train": summary}


def run_distill(cfg: Config) -> dict:
    """The main job on whatever stages exist; returns a summary for the caller to print."""
    import torch

    torch.set_num_threads(cfg.train.threads)
    cfg = resolve_auto(cfg)
    log.info("distill: teacher %s, trajectories from %s", cfg.models.teacher, cfg.data.source)
    out = Path(cfg.paths.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with tracking.job_run(cfg, "distill") as run:
        teacher, student_init, vocab = stage_models(cfg, out)
        report = stage_records(cfg, teacher, out / "records")
        summary = stage_train(cfg, out / "records", student_init, vocab, out)
        return {
            "mlflow_run_id": run.info.run_id,
            "teacher": str(teacher),
            "student": str(out / "student"),
            "records": str(out / "records"),
            "records_written_now": report.kept,
            "dropped": dict(report.dropped),
            "train": summary,
        }


def run_rollout_job(cfg: Config) -> dict:
    """The rollout stage on its own (`jobs/rollout.py`): records from the teacher's play, into output_dir."""
    from sad_ray.models.starter import resolve_model

    cfg = resolve_auto(cfg)
    out = Path(cfg.paths.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with tracking.job_run(cfg, "rollout") as run:
        teacher = resolve_model(cfg.models.teacher, Path(cfg.paths.cache_dir).expanduser())
        report = stage_rollouts(cfg, teacher, out / "records")
        return {"mlflow_run_id": run.info.run_id, "records": str(out / "records"),
                "records_written_now": report.kept, "dropped": dict(report.dropped)}
