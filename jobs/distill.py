"""The main job: distill a teacher agent into a student, evaluate both through a Serve app, then leave the student
served (`serve.keep: true`) or print the command that serves it
(`python jobs/distill.py --config ... key=value ...`; `eval.enabled=false` skips the evaluation)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sad_ray.cli import main  # noqa: E402
from sad_ray.stages import run_distill  # noqa: E402
from serve.local import deploy, serve_models_for  # noqa: E402


def distill(cfg):
    result = run_distill(cfg, serve_models_for(cfg))
    # serve.keep: the student stays served; otherwise the summary says how to serve it.
    result["serve"] = deploy(cfg, {"student": result["student"]})
    return result


if __name__ == "__main__":
    sys.exit(main(distill, __doc__))
