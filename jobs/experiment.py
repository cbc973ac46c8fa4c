"""The experiment of docs/RESULTS.md: every arm of `experiment.arms` (SAD, token-level KD, SFT, ablations, ...)
trained from the same teacher, records and student-init, evaluated through the Serve app on the same held-out
tasks, then the report regenerated from the stored results. Resumable: a rerun goes on with the (arm, seed) pairs
not yet stored.

    python jobs/experiment.py --config configs/experiment.yaml [--arms sad,token_kd] [key=value ...]
    python jobs/experiment.py --config configs/experiment.yaml --report-only
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sad_ray.cli import main  # noqa: E402
from sad_ray.experiment import report_only, run_experiment  # noqa: E402
from serve.local import serve_models_for  # noqa: E402


def add_arguments(parser):
    parser.add_argument("--arms", default="", help="comma-separated arm names to run this time (default: all)")
    parser.add_argument("--report-only", action="store_true",
                        help="only regenerate experiment.report from experiment.results_dir")


def experiment(cfg, args):
    if args.report_only:
        return report_only(cfg)
    return run_experiment(cfg, serve_models_for(cfg), [a for a in args.arms.split(",") if a])


if __name__ == "__main__":
    sys.exit(main(experiment, __doc__, add_arguments=add_arguments))
