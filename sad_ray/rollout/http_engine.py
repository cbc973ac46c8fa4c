"""An engine that is an HTTP client of our own Serve app (serve/): the agent loop plays through the endpoint, so the
latency evaluation measures is the real one, request by request.

Every chat of a `generate` call is its own `POST /v1/chat/completions`, sent concurrently (vLLM behind the endpoint
batches them continuously, as it would a crowd of users). The server applies the chat template; the client sends
the chat as the agent loop built it. A refusal that says the model is momentarily unavailable (a replica died and
Serve is replacing it: 503, or the connection dropped) is retried with backoff and counted; any other 4xx/5xx
raises `EndpointError` with the server's message, which names the request part it objects to.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np

from sad_ray.rollout.engines import Chat, Generation, SamplingConfig, TopK

_RETRY_STATUS = {429, 502, 503, 504}


class EndpointError(RuntimeError):
    """The endpoint refused a request for good (or kept refusing it past the retries)."""


@dataclass
class EndpointStats:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class HTTPEngine:
    """`generate` through `POST {base_url}/v1/chat/completions` with `model` set; `score` is not served."""

    kind = "http"

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 600.0,
                 max_concurrency: int = 64, retries: int = 4, backoff_s: float = 2.0) -> None:
        if max_concurrency < 1 or retries < 0:
            raise ValueError("max_concurrency must be >= 1 and retries >= 0")
        self.model_id = model
        self.base_url = base_url.rstrip("/")
        self.retries, self.backoff_s = retries, backoff_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s, limits=limits)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="http-engine")
        self._lock = threading.Lock()
        self.stats = EndpointStats()

    def generate(self, chats: Sequence[Chat], sampling: SamplingConfig) -> list[str]:
        return [g.text for g in self.generate_timed(chats, sampling)]

    def generate_timed(self, chats: Sequence[Chat], sampling: SamplingConfig) -> list[Generation]:
        """One concurrent request per chat; each one's own wall-clock seconds and token counts."""
        return list(self._pool.map(lambda chat: self._one(chat, sampling), chats))

    def _one(self, chat: Chat, sampling: SamplingConfig) -> Generation:
        body = {"model": self.model_id, "messages": list(chat), "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "stop": list(sampling.stop),
                "seed": sampling.seed}
        for attempt in range(self.retries + 1):
            start = time.perf_counter()
            try:
                resp = self._http.post("/v1/chat/completions", json=body)
            except httpx.TransportError as exc:  # connection refused or dropped mid-answer: the replica went away
                failure = f"{type(exc).__name__}: {exc}"
            else:
                seconds = time.perf_counter() - start
                if resp.status_code == 200:
                    return self._answer(resp, seconds)
                failure = f"HTTP {resp.status_code}: {_message(resp)}"
                if resp.status_code not in _RETRY_STATUS:
                    raise EndpointError(f"{self.base_url} refused a request for model {self.model_id!r}: {failure}")
            if attempt < self.retries:
                with self._lock:
                    self.stats.retries += 1
                time.sleep(self.backoff_s * 2 ** attempt)
        raise EndpointError(f"{self.base_url} did not answer a request for model {self.model_id!r} after "
                            f"{self.retries + 1} attempts; last: {failure}")

    def _answer(self, resp: httpx.Response, seconds: float) -> Generation:
        try:
            data = resp.json()
            text = data["choices"][0]["message"]["content"] or ""
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise EndpointError(f"{self.base_url} answered 200 without an OpenAI chat completion: {exc}") from None
        prompt, completion = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        with self._lock:
            self.stats.requests += 1
            self.stats.prompt_tokens += prompt
            self.stats.completion_tokens += completion
        return Generation(text, seconds, completion, prompt)

    def score(self, sequences: Sequence[np.ndarray], supervised: Sequence[np.ndarray], k: int) -> list[TopK]:
        raise NotImplementedError("the Serve app does not score token sequences; score with a vLLM or HF engine")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.close()


def _message(resp: httpx.Response) -> str:
    try:
        error = resp.json().get("error", {})
        return str(error.get("message") or error)
    except (ValueError, AttributeError):
        return resp.text[:300]
