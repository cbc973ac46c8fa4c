"""The rollout stage alone: the teacher plays the environments on Ray Data and writes trajectory records."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sad_ray.cli import main  # noqa: E402
from sad_ray.stages import run_rollout_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(run_rollout_job, __doc__))
