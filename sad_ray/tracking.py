"""MLflow runs for a distillation: one parent run per job, one nested child run per stage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sad_ray.config import Config, to_flat_dict

log = logging.getLogger(__name__)


def configure(cfg: Config) -> None:
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    mlflow.set_experiment(cfg.tracking.experiment)


def config_key(cfg: Config, identity: Mapping[str, str] | None = None) -> str:
    """A short hash of the whole flat config (and `identity`, e.g. the teacher id): which job run this is."""
    key = {"config": {k: _param(v) for k, v in to_flat_dict(cfg).items()}, "identity": dict(identity or {})}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def job_run(cfg: Config, job: str, identity: Mapping[str, str] | None = None) -> Iterator[Any]:
    """The parent run of a job, with the whole config as parameters and `identity` (e.g. the teacher id, which
    the config names only by path) as `sad_ray.<key>` tags.

    Resumes the parent run whose id a previous attempt with the same config and identity left in
    `output_dir/mlflow_run_id.<job>.<config_key>`, so a rerun after a crash keeps one run per distillation instead
    of scattering its stages; any other config (`loss.objective=token_kd`, another teacher) gets its own run, whose
    parameters say what it ran.
    """
    import mlflow

    configure(cfg)
    from sad_ray import storage

    marker = storage.join(storage.absolute(cfg.paths.output_dir), f"mlflow_run_id.{job}.{config_key(cfg, identity)}")
    run_id = None
    if storage.is_file(marker):
        run_id = storage.read_bytes(marker).decode().strip() or None
        if run_id is not None and mlflow.get_run(run_id).info.lifecycle_stage != "active":
            run_id = None
    with mlflow.start_run(run_id=run_id, run_name=cfg.tracking.run_name or job) as run:
        if run_id is None:
            storage.write_bytes(marker, run.info.run_id.encode())
            mlflow.log_params({k: _param(v) for k, v in to_flat_dict(cfg).items()})
        mlflow.set_tags({"sad_ray.job": job, **{f"sad_ray.{k}": v for k, v in (identity or {}).items()}})
        # The precision `auto` chose on the driver, and the CPU behind it, next to every timing this run logs
        # (train workers and engine actors log their own choice: they may sit on other hardware).
        from sad_ray.precision import host_summary

        mlflow.set_tags({f"sad_ray.driver.{k}": v for k, v in host_summary(cfg.precision).items()})
        yield run


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | None = None, *, name: str | None = None,
              tags: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """A child run of the active job run for one stage, named `name` (default: the stage)."""
    import mlflow

    with mlflow.start_run(run_name=name or stage, nested=mlflow.active_run() is not None) as run:
        mlflow.set_tags({"sad_ray.stage": stage, **{k: str(v) for k, v in (tags or {}).items()}})
        if params:
            mlflow.log_params({k: _param(v) for k, v in params.items()})
        yield run


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def register_model(model_dir: Path, name: str, artifact_path: str = "model",
                   tags: Mapping[str, Any] | None = None) -> str:
    """Log a Hugging Face directory to the active MLflow run and add it to the model registry as a new version
    of `name`, with `tags` on the version; returns the version number. (MLflow 3's `register_model` wants a
    flavor-logged model; a plain directory of weights is registered through the client with the run's artifact URI
    as the source.)"""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.log_artifacts(str(model_dir), artifact_path)
    run = mlflow.active_run()
    client = mlflow.MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="sad-ray model (Hugging Face directory)")
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run.info.run_id,
                                          tags={"sad_ray.model_dir": str(model_dir),
                                                **{k: str(v) for k, v in (tags or {}).items()}})
    return str(version.version)


def _param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
