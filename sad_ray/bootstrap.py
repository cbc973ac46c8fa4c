"""A teacher that actually plays: fine-tune a base model on the environments' expert demonstrations.

demonstrations (train split) -> windowed records with the demonstrations as a one-hot teacher -> Ray Train
(cross entropy through the same trainer as distillation) -> greedy evaluation on held-out tasks with vLLM ->
`<cache_dir>/teachers/<name>` + the MLflow model registry. A teacher that already exists with the same settings
is reused; a crashed bootstrap resumes (records and training checkpoints are kept in `<name>.work`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sad_ray import storage, tracking
from sad_ray.config import Config, to_flat_dict
from sad_ray.envs.base import Task
from sad_ray.models.starter import TEACHER_MANIFEST, bootstrapped_teacher_dir
from sad_ray.records import ShardWriter, finished_episodes
from sad_ray.rollout.score import ScoreReport, score_episodes
from sad_ray.train.ray_train import result_settings

log = logging.getLogger(__name__)

MANIFEST = TEACHER_MANIFEST
# The experts' demonstrations, versioned: a change to what they say or do makes teachers built on the old ones
# stale (2: ALFWorld's searcher says which places are left to search; 3: it lists every plausible place, one
# number per instance, and drops the one it searched).
DEMONSTRATIONS_VERSION = 3


def teacher_home(cfg: Config) -> Path:
    return bootstrapped_teacher_dir(Path(cfg.paths.cache_dir), cfg.bootstrap.name)


def settings_hash(cfg: Config) -> str:
    """What makes two bootstrapped teachers the same: base model, data, training, prompt window."""
    b = cfg.bootstrap
    key = {"base": b.base, "envs": b.envs, "demos": b.demos, "demonstrations": DEMONSTRATIONS_VERSION,
           "train": result_settings(b.train),
           "precision": cfg.precision,
           "curriculum": asdict(b.curriculum),
           "context_chars": cfg.rollout.context_chars, "format": cfg.segment.format}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def env_tasks(cfg: Config, split: str, counts: tuple[int, ...]) -> list[Task]:
    from sad_ray.envs import make_env
    from sad_ray.stages import env_kwargs

    tasks: list[Task] = []
    for name, n in zip(cfg.bootstrap.envs, counts, strict=True):
        if n:
            env = make_env(name, **env_kwargs(cfg).get(name, {}))
            tasks.extend(env.tasks(split, n))
            env.close()
    return tasks


def demo_records(cfg: Config, base_dir: Path, records_dir: Path) -> ScoreReport:
    """Windowed one-hot records of the expert demonstrations not yet written (a rerun continues)."""
    from transformers import AutoTokenizer

    from sad_ray.console import Progress
    from sad_ray.models.tokenizers import tokenizer_fingerprint
    from sad_ray.rollout.demos import play_demonstrations
    from sad_ray.rollout.engines import DemonstrationTeacher
    from sad_ray.stages import env_kwargs

    done = finished_episodes(records_dir)
    tasks = [t for t in env_tasks(cfg, "train", cfg.bootstrap.demos) if t.id not in done]
    report = ScoreReport()
    if not tasks:
        return report
    tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=cfg.models.trust_remote_code)
    progress = Progress("bootstrap: demonstrations", len(tasks), "episodes")

    def demos():
        for done, episode in enumerate(play_demonstrations(tasks, env_kwargs(cfg))):
            yield episode
            progress.update(done + 1, f"{report.kept} records")

    with ShardWriter(records_dir, cfg.records.records_per_shard) as writer:
        for record in score_episodes(
            demos(), tokenizer, DemonstrationTeacher(), fmt=cfg.segment.format, top_k=1,
            fingerprint=tokenizer_fingerprint(tokenizer), on_unparsed=cfg.segment.on_unparsed,
            max_tokens=cfg.data.max_tokens, report=report, context_chars=cfg.rollout.context_chars,
        ):
            writer.add(record)
    return report


def run_bootstrap(cfg: Config) -> dict[str, Any]:
    """`jobs/bootstrap_teacher.py`: build (or reuse) the bootstrapped teacher; returns its summary."""
    from sad_ray.eval.agent_eval import EvalReport, evaluate_agent
    from sad_ray.method.losses import LossConfig
    from sad_ray.models.starter import resolve_model
    from sad_ray.stages import env_kwargs
    from sad_ray.train.ray_train import train_on_records

    home = teacher_home(cfg)
    digest = settings_hash(cfg)
    manifest_path = home / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings_hash") == digest:
            if manifest.get("registered_version") is None:  # a crash between saving and registering
                with tracking.job_run(cfg, "bootstrap_teacher"), tracking.stage_run("register"):
                    manifest["registered_version"] = tracking.register_model(home, cfg.bootstrap.register_as)
                manifest_path.write_text(json.dumps(manifest, indent=2))
            log.info("bootstrap: reusing the teacher at %s (settings %s)", home, digest)
            return {**manifest, "teacher": str(home), "reused": True}
        log.warning("bootstrap: %s was built with other settings (%s, now %s); rebuilding",
                    home, manifest.get("settings_hash"), digest)
    work = home.parent / f"{cfg.bootstrap.name}.work" / digest
    work.mkdir(parents=True, exist_ok=True)
    storage.make_dirs(storage.absolute(cfg.paths.output_dir))  # the job run's marker goes there
    with tracking.job_run(cfg, "bootstrap_teacher") as run:
        base = resolve_model(cfg.bootstrap.base, Path(cfg.paths.cache_dir).expanduser())
        with tracking.stage_run("demonstrations", {"demos": cfg.bootstrap.demos, "envs": cfg.bootstrap.envs}):
            report = demo_records(cfg, base, work / "records")
            tracking.log_metrics({"records_written": report.kept,
                                  **{f"dropped/{k}": v for k, v in report.dropped.items()}})
        with tracking.stage_run("train", {f"train.{k}": v for k, v in to_flat_dict(cfg.bootstrap.train).items()}) \
                as train_run:
            result = train_on_records(
                work / "records", base, work, cfg.bootstrap.train, LossConfig(objective="sft"),
                cfg.bootstrap.curriculum, run_name="bootstrap",
                tracking_uri=cfg.tracking.tracking_uri, mlflow_run_id=train_run.info.run_id,
                trust_remote_code=cfg.models.trust_remote_code, precision=cfg.precision,
            )
            tracking.log_metrics({"train/final_loss": result.loss, "train/tokens_per_second": result.tokens_per_second})
        evaluation = EvalReport()
        if any(cfg.bootstrap.eval_tasks):  # none: the job that uses the teacher evaluates it (jobs/distill.py)
            with tracking.stage_run("eval", {"eval_tasks": cfg.bootstrap.eval_tasks}):
                tasks = env_tasks(cfg, "test", cfg.bootstrap.eval_tasks)
                evaluation = evaluate_agent(
                    result.student_dir, tasks, cfg.bootstrap.eval_engine,
                    max_new_tokens=cfg.bootstrap.eval_max_new_tokens, max_in_flight=cfg.bootstrap.eval_in_flight,
                    max_steps=cfg.bootstrap.eval_max_steps,
                    context_chars=cfg.rollout.context_chars, env_kwargs=env_kwargs(cfg), precision=cfg.precision)
                metrics = evaluation.metrics("eval")
                tracking.log_metrics(metrics)
                (work / "eval.md").write_text(evaluation.table() + "\n")
                import mlflow

                mlflow.log_artifact(str(work / "eval.md"))
                mlflow.log_artifact(str(evaluation.write_episodes(work / "eval_episodes.jsonl")))
        manifest = {
            "settings_hash": digest, "base": str(base), "mlflow_run_id": run.info.run_id,
            "success_rate": {env: evaluation.success_rate(env) for env in cfg.bootstrap.envs
                             if any(e.env == env for e in evaluation.episodes)},
            "eval_episodes": len(evaluation.episodes), "train": asdict(result), "eval_table": evaluation.table(),
        }
        tmp = home.parent / f".{cfg.bootstrap.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(result.student_dir, tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        from sad_ray.atomic import replace_dir

        replace_dir(tmp, home)
        with tracking.stage_run("register"):
            manifest["registered_version"] = tracking.register_model(home, cfg.bootstrap.register_as)
        manifest_path.write_text(json.dumps(manifest, indent=2))
        return {**manifest, "teacher": str(home), "reused": False}
