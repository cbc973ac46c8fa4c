"""`python -m serve --model <dir-or-uri> [--model ...]`: serve models over HTTP until interrupted.

    python -m serve --model starter --name teacher \\
        --model outputs/default/teacher-.../students/sad-seed0 --name student --port 8000 --api-key "$KEY"

Each `--model` is a Hugging Face directory, `starter`, `bootstrap[:name]` or an MLflow registry URI
(`models:/sad-ray-student/3`); `--name` (in the same order) is what clients put in the OpenAI `model` field.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading

from pydantic import ValidationError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="DIR_OR_URI",
                   help="a model to serve (repeat for several)")
    p.add_argument("--name", action="append", default=[], help="its name in the API, one per --model, in order")
    p.add_argument("--engine", choices=["vllm", "hf"], default="vllm", help="engine of every model (default vllm)")
    p.add_argument("--replicas", type=int, default=1, help="replicas per model")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer <key>` (default: $SAD_RAY_SERVE_API_KEY if set; prefer "
                        "the variable, a flag is visible in the process list)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with a model (off by default)")
    p.add_argument("--cache-dir", default=None, help="where starter/bootstrap/registry models live")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ sources")
    args = p.parse_args(argv)
    if args.name and len(args.name) != len(args.model):
        p.error(f"--name must be given once per --model ({len(args.model)}) or not at all")
    return args


def app_args(ns: argparse.Namespace):
    from serve.config import AppArgs

    models = [{"source": src, "engine": ns.engine, "num_replicas": ns.replicas, "num_cpus": ns.num_cpus,
               "num_gpus": ns.num_gpus, "max_model_len": ns.max_model_len, "trust_remote_code": ns.trust_remote_code,
               **({"name": ns.name[i]} if ns.name else {})} for i, src in enumerate(ns.model)]
    extra = {k: v for k, v in {"api_key": ns.api_key, "cache_dir": ns.cache_dir,
                               "tracking_uri": ns.tracking_uri}.items() if v is not None}
    return AppArgs.model_validate({"models": models, "precision": ns.precision, **extra})


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = app_args(ns)
    except ValidationError as exc:
        print(f"python -m serve: {exc}", file=sys.stderr)
        return 2
    keyed = args.api_key is not None or bool(os.environ.get(args.api_key_env))
    if not _is_loopback(ns.host) and not keyed:
        logging.warning("serving on %s without an API key: anyone who can reach it can use the models", ns.host)

    import ray
    from ray import serve

    from sad_ray.console import ray_address
    from serve.app import APP_NAME, build_app

    ray.init(ray_address(), ignore_reinit_error=True)  # RAY_ADDRESS's cluster, else a local one
    try:
        serve.start(http_options={"host": ns.host, "port": ns.port})
        serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
        names = ", ".join(m.name for m in args.models)
        print(f"serving {names} on http://{ns.host}:{ns.port}/v1 (Ctrl-C or SIGTERM stops)", flush=True)
        # Both signals stop it cleanly (a service manager sends SIGTERM; a shell's background job ignores SIGINT
        # unless a handler is installed).
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()  # shuts every engine down with its replica
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
