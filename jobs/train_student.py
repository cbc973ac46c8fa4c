"""Train the student on the teacher's trajectory records (output_dir/teacher-<name>-<fingerprint>/records, as the
distill and rollout jobs leave them) with Ray Train (SAD loss, curriculum, DDP or DeepSpeed) into
students/<objective>-seed<seed>/, checkpointing as it goes; a rerun resumes, and the student is registered in MLflow."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sad_ray.cli import main  # noqa: E402
from sad_ray.stages import run_train_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(run_train_job, __doc__))
