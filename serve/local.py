"""The Serve app for the length of a `with` block: how jobs evaluate their agents through real HTTP.

`serving(args)` starts the app on this machine's Ray (a local one if none is running), on 127.0.0.1 and a free
port, and deletes it on exit (its engines shut down with their replicas). `serve_models_for(cfg)` is what
`sad_ray.eval.job` asks for: the project config's `eval` section turned into one deployment per agent, behind a
fresh random API key, so nothing else on the machine can use the models meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Iterator, Mapping

from sad_ray.console import init_ray
from serve.app import APP_NAME, build_app
from serve.config import AppArgs

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(args: AppArgs, host: str = "127.0.0.1", port: int = 0, access_log: bool = False) -> Iterator[str]:
    """The app running for the block; yields its base URL (`http://host:port`). Serve's line per request is off
    unless `access_log` (an evaluation sends thousands; its own files keep every episode)."""
    import ray
    from ray import serve

    # Serve holds a shutting-down proxy open for load balancers (30 s by default); none balances a job's app.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    started_ray = not ray.is_initialized()
    init_ray()
    port = port or free_port(host)
    serve.start(proxy_location=_proxy_location(), http_options={"host": host, "port": port})
    try:
        serve.run(build_app(args), name=APP_NAME, route_prefix="/",
                  logging_config={"enable_access_log": access_log})
        url = f"http://{host}:{port}"
        log.info("serving %s on %s", ", ".join(m.name for m in args.models), url)
        yield url
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()


def _proxy_location() -> str:
    """Where the job's app takes HTTP: every request comes from this driver to its own node's proxy, so on the
    head node (where `ray job submit` runs drivers) one proxy there is enough; Serve's default puts one on every
    node holding a replica, each bound to the same host and port. A driver on another node keeps the default."""
    import ray

    me = ray.get_runtime_context().get_node_id()
    head = any(n["NodeID"] == me and "node:__internal_head__" in n.get("Resources", {}) for n in ray.nodes())
    return "HeadOnly" if head else "EveryNode"


def eval_app_args(cfg, models: Mapping[str, str], api_key: str | None) -> AppArgs:
    """One deployment per agent (`name -> source`) with the config's `eval` engine settings, its precision, and
    the rollouts' context window and segmentation, so a served agent sees what a rollout shows it."""
    e = cfg.eval
    specs = [{"source": source, "name": name, "engine": e.engine, "num_replicas": e.replicas, "num_cpus": e.num_cpus,
              "num_gpus": e.num_gpus, "resources": dict(e.resources), "tensor_parallel_size": e.tensor_parallel_size,
              "max_model_len": e.max_model_len, "kv_cache_gib": e.kv_cache_gib,
              "max_ongoing_requests": max(32, e.in_flight), "trust_remote_code": cfg.models.trust_remote_code}
             for name, source in models.items()]
    return AppArgs.model_validate({
        "models": specs, "precision": cfg.precision, "api_key": api_key,
        "limits": {"max_tokens": max(1024, e.max_new_tokens), "max_prompt_tokens": e.max_model_len - e.max_new_tokens},
        "context_chars": cfg.rollout.context_chars, "agent_max_tokens": e.max_new_tokens,
        "segment_format": cfg.segment.format, "on_unparsed": cfg.segment.on_unparsed,
        "cache_dir": cfg.paths.cache_dir, "tracking_uri": cfg.tracking.tracking_uri})


def serve_models_for(cfg):
    """`sad_ray.eval.job.ServeModels` for `cfg`: the agents served locally behind a one-off API key."""
    from sad_ray.eval.job import Endpoint

    @contextlib.contextmanager
    def serve_models(models: Mapping[str, str]) -> Iterator[Endpoint]:
        key = secrets.token_urlsafe(24)
        with serving(eval_app_args(cfg, models, key)) as url:
            yield Endpoint(url, key)

    return serve_models


def serve_command(cfg, models: Mapping[str, str]) -> str:
    """The shell command that serves `models` (name -> directory) as the job would."""
    parts = ["python -m serve"]
    for name, source in models.items():
        parts += [f"--model {source}", f"--name {name}"]
    parts += [f"--host {cfg.serve.host}", f"--port {cfg.serve.port}", f"--precision {cfg.precision}"]
    return " ".join(parts)


def deploy(cfg, models: Mapping[str, str]) -> str:
    """`serve.keep`: serve `models` on `serve.host:port` and leave them served. On a cluster this job only joined
    (`ray job submit`) the app outlives the job; when the job started Ray itself, it serves until interrupted.
    Without `serve.keep`, the command that serves them is returned for the summary instead."""
    from ray import serve

    command = serve_command(cfg, models)
    if not cfg.serve.keep:
        return command
    key = os.environ.get(cfg.serve.api_key_env) or None
    args = eval_app_args(cfg, models, key)
    # A submitted job (or one given an address) leaves the app on its cluster; a plain `python jobs/distill.py`
    # owns its local Ray, which ends with it, so it keeps serving until interrupted.
    own_cluster = not (os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_ADDRESS"))
    init_ray()
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", logging_config={"enable_access_log": False})
    url = f"http://{cfg.serve.host}:{cfg.serve.port}/v1"
    print(f"serving {', '.join(models)} on {url}" + (" (Bearer key from $" + cfg.serve.api_key_env + ")" if key
                                                     else ""), flush=True)
    if own_cluster:
        import signal
        import threading

        print("Ctrl-C stops it", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.shutdown()
    return url

