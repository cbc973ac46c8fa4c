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
    if started_ray:
        ray.init(ignore_reinit_error=True, log_to_driver=False)
    port = port or free_port(host)
    serve.start(http_options={"host": host, "port": port})
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


def eval_app_args(cfg, models: Mapping[str, str], api_key: str | None) -> AppArgs:
    """One deployment per agent (`name -> source`) with the config's `eval` engine settings, its precision, and
    the rollouts' context window and segmentation, so a served agent sees what a rollout shows it."""
    e = cfg.eval
    specs = [{"source": source, "name": name, "engine": e.engine, "num_replicas": e.replicas, "num_cpus": e.num_cpus,
              "num_gpus": e.num_gpus, "max_model_len": e.max_model_len, "kv_cache_gib": e.kv_cache_gib,
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
