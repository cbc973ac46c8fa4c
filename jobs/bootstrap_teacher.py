"""Bootstrap a teacher: fine-tune the base model on the environments' expert demonstrations with Ray Train,
evaluate it on held-out tasks, register it in MLflow; an existing teacher with the same settings is reused."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sad_ray.bootstrap import run_bootstrap  # noqa: E402
from sad_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(run_bootstrap, __doc__))
