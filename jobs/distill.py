"""The main job: distill a teacher agent into a student, then evaluate both through a Serve app
(`python jobs/distill.py --config ... key=value ...`; `eval.enabled=false` skips the evaluation)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sad_ray.cli import main  # noqa: E402
from sad_ray.stages import run_distill  # noqa: E402
from serve.local import serve_models_for  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(lambda cfg: run_distill(cfg, serve_models_for(cfg)), __doc__))
