"""What a person sees on a job's console: our own progress lines, not the chatter of Ray, vLLM and the libraries.

Ray forwards every actor's and worker's stdout and stderr to the driver: the train controller's resource
requests, Ray Data's execution plans, vLLM's start-up banners, progress bars of weight loading. `init_ray` starts
or joins Ray with that forwarding off (the full logs stay in Ray's log folder, `<temp>/ray/session_latest/logs`)
and `relay` brings back what our own code logs inside workers (the `sad_ray` loggers, INFO and up): a small actor
that the workers' log records are pushed to (`attach`), drained by a thread on the driver that logs them there. Driver-side noise
is turned down in `quiet_driver`: deprecation warnings of the libraries, MLflow's store set-up lines, Ray's own
INFO lines.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

# Loggers of the libraries we call on the driver, and the lowest level of theirs a person needs to see.
_LIBRARY_LEVELS = {
    "ray": logging.WARNING,  # "Started a local Ray instance", Ray Data's execution plans, Serve's deploy lines
    "mlflow": logging.WARNING,  # "Creating initial MLflow database tables", "Experiment ... does not exist"
    "alembic": logging.WARNING,  # MLflow's schema migrations
    "httpx": logging.WARNING,  # a line per request of an evaluation
    "bm25s": logging.WARNING,  # "Building index from tokens" at DEBUG
    "filelock": logging.WARNING,
    "urllib3": logging.WARNING,
    "DeepSpeed": logging.ERROR,  # "Setting accelerator to CPU" wherever it is imported
}
# Warnings that ask nothing of a user of ours (Ray's token auth is on by design; we turn the bars off ourselves).
_NOISE = ("Token authentication is enabled", "Progress bars disabled")


class _LibraryFilter(logging.Filter):
    """Drops a library's records below its level in `_LIBRARY_LEVELS` (some reset their loggers' levels when
    imported, bm25s to DEBUG: a filter on the console handler holds whatever they do)."""

    def filter(self, record: logging.LogRecord) -> bool:
        top = record.name.split(".", 1)[0]
        if top == "sad_ray":
            return True
        if record.levelno < _LIBRARY_LEVELS.get(top, logging.NOTSET):
            return False
        try:
            message = record.getMessage()
        except Exception:
            return True
        return not any(noise in message for noise in _NOISE)


def _add_filter(target: logging.Filterer) -> None:
    if not any(isinstance(f, _LibraryFilter) for f in target.filters):
        target.addFilter(_LibraryFilter())


def _filter_consoles() -> None:
    """Put the filter on every handler that writes to a terminal stream, wherever a library attached it (Ray Data
    and DeepSpeed bring their own, with propagation off); file handlers keep everything."""
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if type(handler) is logging.StreamHandler:
                _add_filter(handler)
    # DeepSpeed resets its logger's level and handler when imported, later: a filter on the logger stays.
    _add_filter(logging.getLogger("DeepSpeed"))


def quiet_driver() -> None:
    """Turn the libraries' console output down to what a person must act on; our `sad_ray` loggers keep INFO.
    Call it after `logging.basicConfig` (its handlers get the filter) and before MLflow is imported."""
    # MLflow configures its own handler when imported, at this level.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Progress bars of weight loading and saving (transformers, huggingface_hub, any tqdm).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    # transformers reads that variable once, when imported; a job that imported it already is told directly.
    import sys

    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    for name, level in _LIBRARY_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger("sad_ray").setLevel(logging.INFO)
    _filter_consoles()
    # Deprecations inside the libraries are theirs to fix, and tell a user of ours nothing. Ray registers its
    # own filter for RayDeprecationWarning at import ("module": once per module), so ours goes in after it.
    from ray.util.annotations import RayDeprecationWarning

    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning, RayDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def _cluster_address() -> str:
    """The running cluster this process joins: `ray job submit` sets RAY_ADDRESS for its driver, and so does a
    user pointing a job at a cluster (`auto`: the one `ray start` last started on this machine). Empty: Ray starts
    a local one, even where a `ray start` cluster is running (plain `ray.init()` would join that one: a leftover
    of another checkout or test run, with other code and other resources)."""
    return os.environ.get("RAY_ADDRESS", "")


def ray_address() -> str:
    """What to pass `ray.init`: the cluster `_cluster_address` names, else "local" (a new local cluster)."""
    return _cluster_address() or "local"


def started_local_cluster() -> bool:
    """Whether this process started its own Ray cluster (nothing will join it) rather than joining one, where
    an autoscaler may add the nodes a request waits for."""
    import ray

    return ray.is_initialized() and not _cluster_address()


def init_ray(**kwargs: Any) -> None:
    """Start a local Ray cluster, or join the one `RAY_ADDRESS` (or `ray job submit`) names, with workers' output
    kept in Ray's log folder instead of the console. A no-op when Ray is already up."""
    import ray

    quiet_driver()
    if ray.is_initialized():
        return
    address = _cluster_address()
    # A new local cluster turns token authentication on by itself (a token made once in ~/.ray) and warns so at
    # every start; the summary line below says it instead. (Setting RAY_AUTH_MODE here would come too late: Ray
    # reads it into its config when imported.)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # configure_logging=False: Ray's driver loggers propagate to ours (filtered) instead of a handler of its own.
    context = ray.init(ray_address(), ignore_reinit_error=True, log_to_driver=False, configure_logging=False,
                       **kwargs)
    import ray.data  # noqa: F401  (it configures its own console handler when imported: filter that one too)

    _filter_consoles()
    resources = ray.cluster_resources()
    dashboard = getattr(context, "dashboard_url", None)
    try:  # Ray's own check (private: a release that moves it only loses the note)
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:
        def is_token_auth_enabled() -> bool:
            return False
    log.info("ray: %s (%g CPUs, %g GPUs%s%s); workers' logs are in Ray's log folder, session_latest/logs",
             f"joined the cluster at {address}" if address else "started a local cluster",
             resources.get("CPU", 0), resources.get("GPU", 0), f", dashboard http://{dashboard}" if dashboard else "",
             ", token authentication on" if is_token_auth_enabled() else "")


class _RelayActor:
    """Holds the log records workers push until the driver takes them (a bounded buffer: a driver that stops
    reading loses the oldest lines, never blocks a worker)."""

    def __init__(self, size: int) -> None:
        self.records: deque[tuple[str, int, str]] = deque(maxlen=size)

    def put(self, record: tuple[str, int, str]) -> None:
        self.records.append(record)

    def take(self) -> list[tuple[str, int, str]]:
        out = list(self.records)
        self.records.clear()
        return out


class _RelayHandler(logging.Handler):
    """In a worker: sends each record of the `sad_ray` loggers to the relay actor, fire and forget."""

    def __init__(self, actor: Any, source: str) -> None:
        super().__init__(logging.INFO)
        self.actor, self.source = actor, source

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.actor.put.remote((record.name, record.levelno, f"({self.source}) {record.getMessage()}"))
        except Exception:  # the driver is gone or the actor died: the line is still in Ray's log folder
            self.handleError(record)


def attach(actor: Any, source: str) -> None:
    """In a worker or actor: relay what its `sad_ray` loggers log to the driver's console, as `(source) message`.
    `actor` is the handle `relay` gave the driver (None: relay nothing)."""
    if actor is None:
        return
    logger = logging.getLogger("sad_ray")
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        if isinstance(handler, _RelayHandler):
            logger.removeHandler(handler)
    logger.addHandler(_RelayHandler(actor, source))


@contextmanager
def relay(poll_s: float = 0.5, size: int = 1000) -> Iterator[Any]:
    """On the driver: an actor handle to give workers (`attach`), and a thread that logs what they send through the
    driver's own loggers while the block runs; the last lines are drained when it ends."""
    import ray

    actor = ray.remote(num_cpus=0)(_RelayActor).remote(size)
    stop = threading.Event()

    def drain() -> None:
        for name, level, message in ray.get(actor.take.remote()):
            logging.getLogger(name).log(level, "%s", message)

    def loop() -> None:
        while not stop.wait(poll_s):
            try:
                drain()
            except Exception:  # the relay is best effort; the job's own outcome is reported elsewhere
                log.debug("relay: poll failed", exc_info=True)

    thread = threading.Thread(target=loop, name="sad-ray-relay", daemon=True)
    thread.start()
    try:
        yield actor
    finally:
        stop.set()
        thread.join()
        try:
            drain()
        except Exception:
            log.debug("relay: last drain failed", exc_info=True)
        ray.kill(actor)


def clock(seconds: float) -> str:
    """`4m05s`, `1h12m`; `?` for an unknown (NaN) duration."""
    if seconds != seconds:
        return "?"
    m, sec = divmod(int(round(seconds)), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{sec:02d}s"


class Progress:
    """A stage's progress line, at most every `every` seconds and at the end: `what: done/total unit (extra),
    rate, elapsed, ~time left` at the rate so far."""

    def __init__(self, what: str, total: int, unit: str, every: float = 15.0) -> None:
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.t0 = time.perf_counter()
        self.last = float("-inf")

    def update(self, done: int, extra: str = "") -> None:
        now = time.perf_counter()
        if now - self.last < self.every and done < self.total:
            return
        self.last = now
        elapsed = now - self.t0
        rate = done / elapsed * 60 if elapsed > 0 else 0.0
        left = elapsed / done * (self.total - done) if done else float("nan")
        log.info("%s: %d/%d %s%s, %.1f/min, %s elapsed, ~%s left", self.what, done, self.total, self.unit,
                 f" ({extra})" if extra else "", rate, clock(elapsed), clock(left))
