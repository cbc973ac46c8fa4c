"""The command line every job shares: `--config FILE key.sub=value ...`, then one library call."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sad_ray.config import ConfigError, load_config
from sad_ray.console import quiet_driver


def main(run: Callable[..., dict[str, Any]], description: str, argv: Sequence[str] | None = None,
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse `--config FILE key=value ...` (and a job's own flags, `add_arguments`: then `run(cfg, args)`), run the
    job, print its summary."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="YAML config (default: the built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=10")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_driver()  # the libraries' chatter off the console (sad_ray/console.py)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        result = run(cfg, args) if add_arguments is not None else run(cfg)
    except ConfigError as exc:  # settings only a job checks (an experiment arm's overrides)
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    evaluation = result.get("eval")
    if evaluation:  # the evaluation's table, readable (the JSON above holds its numbers too)
        print(f"\nEvaluation through the Serve app ({evaluation['dir']}/table.md has every task type):\n")
        print(evaluation["summary"])
    if isinstance(result.get("serve"), str):
        served = result["serve"]
        print(f"The student is served at {served}" if served.startswith("http") else f"Serve the student with:\n  {served}")
    return 0
