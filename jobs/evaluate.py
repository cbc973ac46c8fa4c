"""Evaluate the teacher and its students through a Serve app on the held-out tasks: success, steps, reasoning
length, CoT match, action agreement and latency, with intervals; the table, plots and every episode land in
<teacher folder>/eval/ and in MLflow (`python jobs/evaluate.py --config ... eval.students=[dir, models:/...]`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sad_ray.cli import main  # noqa: E402
from sad_ray.eval.job import run_evaluate_job  # noqa: E402
from serve.local import serve_models_for  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(lambda cfg: run_evaluate_job(cfg, serve_models_for(cfg)), __doc__))
