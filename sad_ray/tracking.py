"""MLflow runs for a distillation: one parent run per job, one nested child run per stage."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from sad_ray.config import Config, to_flat_dict

log = logging.getLogger(__name__)


def configure(cfg: Config) -> None:
    import mlflow

    mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    mlflow.set_experiment(cfg.tracking.experiment)


@contextlib.contextmanager
def job_run(cfg: Config, job: str) -> Iterator[Any]:
    """The parent run of a job, with the whole config as parameters.

    Resumes the parent run whose id a previous attempt left in `output_dir/mlflow_run_id`, so a rerun after a
    crash keeps one run per distillation instead of scattering its stages.
    """
    import mlflow

    configure(cfg)
    marker = os.path.join(os.path.expanduser(cfg.paths.output_dir), f"mlflow_run_id.{job}")
    run_id = None
    if os.path.exists(marker):
        with open(marker) as f:
            run_id = f.read().strip() or None
        if run_id is not None and mlflow.get_run(run_id).info.lifecycle_stage != "active":
            run_id = None
    with mlflow.start_run(run_id=run_id, run_name=cfg.tracking.run_name or job) as run:
        if run_id is None:
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            with open(marker, "w") as f:
                f.write(run.info.run_id)
            mlflow.log_params({k: _param(v) for k, v in to_flat_dict(cfg).items()})
        mlflow.set_tag("sad_ray.job", job)
        yield run


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """A child run of the active job run for one stage."""
    import mlflow

    with mlflow.start_run(run_name=stage, nested=mlflow.active_run() is not None) as run:
        mlflow.set_tag("sad_ray.stage", stage)
        if params:
            mlflow.log_params({k: _param(v) for k, v in params.items()})
        yield run


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def _param(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
