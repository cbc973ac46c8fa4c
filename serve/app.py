"""The Ray Serve application: one deployment per model (its own replicas, autoscaling and engine) behind one FastAPI
ingress that checks every request and routes it by the OpenAI `model` field.

Routes: `POST /v1/chat/completions` (OpenAI schema, `stream: true` as server-sent events), `GET /v1/models`,
`GET /healthz` (the engines' own health checks; no key needed) and `POST /v1/agent/step` (the next ReAct turn of an
episode, prompted exactly as rollouts prompt it, with its thought, action and [REASON]/[ACT] spans). Build it with
`build_app(args)`; `serve run serve/example.yaml` and `python -m serve` both do.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.config import AppArgs, ModelSpec
from serve.engines import BadEngineInput, Chunk, EngineUnavailable, Sampling, make_engine
from serve.schema import (
    AgentStepRequest,
    ApiError,
    ChatCompletionRequest,
    check_messages,
    max_tokens_of,
    parse_body,
    stop_list,
)

log = logging.getLogger("ray.serve")

APP_NAME = "sad-ray"


@dataclass(frozen=True)
class Generate:
    """What the ingress asks of a model replica: a chat (template applied there) and how to sample it."""

    messages: list[dict[str, str]]
    sampling: Sampling
    max_prompt_tokens: int
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


# ------------------------------------------------------------------------------------------------- the models


@serve.deployment(graceful_shutdown_timeout_s=30, health_check_period_s=10, health_check_timeout_s=30)
class ModelDeployment:
    """One model: its engine, its tokenizer's chat template, and the prompt-length limit (only it can count)."""

    def __init__(self, spec: ModelSpec, precision: str, cache_dir: str, tracking_uri: str) -> None:
        self.spec = spec
        self.engine = make_engine(spec, precision, cache_dir, tracking_uri)
        self.tokenizer = self.engine.tokenizer
        self.started = time.time()
        # Serve exports its own request latency histograms; time to first token and decode speed are ours.
        self.ttft = metrics.Histogram(
            "sad_ray_time_to_first_token_s", description="Seconds from a request reaching the engine to its first token.",
            boundaries=[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30], tag_keys=("model",))
        self.tokens_per_s = metrics.Histogram(
            "sad_ray_generation_tokens_per_s", description="Generated tokens per second of one request.",
            boundaries=[1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500], tag_keys=("model",))
        self.generated = metrics.Counter("sad_ray_generated_tokens", description="Tokens generated.",
                                         tag_keys=("model",))
        for m in (self.ttft, self.tokens_per_s, self.generated):
            m.set_default_tags({"model": spec.name})
        log.info("model %s (%s, %s) ready", spec.name, self.engine.kind, self.engine.precision)

    def _prompt(self, req: Generate) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
        except Exception as exc:  # a template that refuses the chat (e.g. roles out of order)
            raise ApiError(400, "messages", f"the model's chat template refused them: {exc}") from None
        ids = list(ids)
        limit = min(req.max_prompt_tokens, self.spec.max_model_len - 1)
        if len(ids) > limit:
            raise ApiError(400, "messages", f"the prompt is {len(ids)} tokens, over the limit of {limit}",
                           "prompt_too_long")
        if len(ids) + req.sampling.max_tokens > self.spec.max_model_len:
            raise ApiError(400, "max_tokens", f"{req.sampling.max_tokens} new tokens after a {len(ids)}-token prompt "
                           f"exceed the model's context of {self.spec.max_model_len} tokens", "context_length_exceeded")
        return ids

    async def _generate(self, ids: list[int], req: Generate) -> AsyncIterator[Chunk]:
        start = time.perf_counter()
        first, tokens = None, 0
        async for chunk in self.engine.generate(ids, req.sampling, req.request_id):
            if first is None and chunk.tokens:
                first = time.perf_counter()
                self.ttft.observe(first - start)
            tokens += chunk.tokens
            yield chunk
        if tokens:
            self.generated.inc(tokens)
            self.tokens_per_s.observe(tokens / max(time.perf_counter() - start, 1e-6))

    async def chat(self, req: Generate) -> dict[str, Any]:
        """The whole answer: {"text", "finish_reason", "prompt_tokens", "completion_tokens"} or {"error"}."""
        try:
            ids = self._prompt(req)
            text, tokens, finish = [], 0, None
            async for chunk in self._generate(ids, req):
                text.append(chunk.text)
                tokens += chunk.tokens
                finish = chunk.finish_reason or finish
            return {"text": "".join(text), "finish_reason": finish, "prompt_tokens": len(ids),
                    "completion_tokens": tokens}
        except Exception as exc:
            return {"error": _error_of(exc).body()}

    async def chat_stream(self, req: Generate) -> AsyncIterator[dict[str, Any]]:
        """First {"prompt_tokens"} (or {"error"}: the ingress answers 4xx before any event), then
        {"text", "tokens", "finish_reason"} deltas; an error after the first item ends the stream."""
        try:
            ids = self._prompt(req)
        except Exception as exc:
            yield {"error": _error_of(exc).body()}
            return
        yield {"prompt_tokens": len(ids)}
        try:
            async for chunk in self._generate(ids, req):
                yield {"text": chunk.text, "tokens": chunk.tokens, "finish_reason": chunk.finish_reason}
        except Exception as exc:
            yield {"error": _error_of(exc).body()}

    async def card(self) -> dict[str, Any]:
        return {"id": self.spec.name, "object": "model", "created": int(self.started), "owned_by": "sad-ray",
                "root": self.spec.source, "engine": self.engine.kind, "precision": self.engine.precision,
                "max_model_len": self.spec.max_model_len, "parameters": self.engine.parameters}

    async def health(self) -> dict[str, str]:
        try:
            await self.engine.check_health()
            return {"status": "ok"}
        except Exception as exc:
            return {"status": "error", "message": str(exc)[:300]}

    async def check_health(self) -> None:
        # Serve restarts a replica whose engine died.
        await self.engine.check_health()

    async def info(self) -> dict[str, Any]:
        """Which process this replica is (tests tell a restarted replica apart by it) and its engine's children."""
        import ray

        return {"pid": os.getpid(), "actor_id": ray.get_runtime_context().get_actor_id(),
                "replica_id": serve.get_replica_context().replica_id.unique_id,
                "engine_pids": self.engine.child_pids()}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _error_of(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, BadEngineInput):
        return ApiError(400, "messages", str(exc)[:300], "engine_rejected")
    if isinstance(exc, EngineUnavailable):
        return ApiError(503, "model", str(exc)[:300], "engine_unavailable")
    log.exception("model replica failed a request")
    return ApiError(500, "model", f"the engine failed: {type(exc).__name__}", "engine_error")


def _renamed(error: dict[str, Any], rename: dict[str, str] | None = None) -> ApiError:
    e = error["error"]
    param = (rename or {}).get(e["param"], e["param"])
    message = e["message"].removeprefix(f"{e['param']}: ")
    status = {"authentication_error": 401, "not_found_error": 404, "server_error": 500}.get(e["type"], 400)
    if e["code"] in ("engine_unavailable", "model_unavailable"):
        status = 503
    return ApiError(status, param, message, e["code"])


_THOUGHT = re.compile(r"^\s*Thought(?:\s*\d+)?\s*:\s*(.*?)\s*(?=^\s*Action(?:\s*\d+)?\s*:|\Z)",
                      re.IGNORECASE | re.MULTILINE | re.DOTALL)


def parse_thought(text: str) -> str | None:
    """The first `Thought: ...` block of a ReAct turn (up to its `Action:` line), or None."""
    m = _THOUGHT.search(text)
    return m.group(1) if m and m.group(1) else None


# ------------------------------------------------------------------------------------------------- the ingress

# @serve.ingress freezes a copy of `api` (routes included) when the class below is decorated: every module-level name
# a route uses must be defined above this line, or the replica raises NameError.
api = FastAPI(title="sad-ray", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(ApiError(exc.status_code, "path", f"{request.method} {request.url.path}: {exc.detail}",
                                 "not_found" if exc.status_code == 404 else "bad_method").body(),
                        status_code=exc.status_code)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("ingress failed on %s", request.url.path)
    return JSONResponse(ApiError(500, "body", "internal error", "internal").body(), status_code=500)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    def __init__(self, models: dict[str, DeploymentHandle], args: AppArgs) -> None:
        self.models = models
        self.args = args
        self.limits = args.limits
        key = args.api_key.get_secret_value() if args.api_key else os.environ.get(args.api_key_env, "")
        self.api_key = key.encode() if key else None
        self._cards: dict[str, dict[str, Any]] = {}

    # ----------------------------------------------------------------------------------------------- checks

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
            raise ApiError(401, "authorization", "a valid `Authorization: Bearer <key>` header is required",
                           "invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "body", f"is {declared} bytes, over the limit of {limit}", "body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "body", f"is over the limit of {limit} bytes", "body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def _model(self, name: str) -> DeploymentHandle:
        if name not in self.models:
            raise ApiError(404, "model", f"no model {name[:100]!r} is served here; served: "
                           f"{', '.join(sorted(self.models))}", "model_not_found")
        return self.models[name]

    # ------------------------------------------------------------------------------------------------ routes

    @api.get("/healthz")
    async def healthz(self):
        async def one(name: str, handle: DeploymentHandle) -> dict[str, str]:
            try:
                return await asyncio.wait_for(handle.health.remote(), timeout=10)
            except Exception as exc:
                return {"status": "error", "message": f"{type(exc).__name__}: {str(exc)[:200]}"}

        results = await asyncio.gather(*(one(n, h) for n, h in self.models.items()))
        models = dict(zip(self.models, results, strict=True))
        ok = all(r.get("status") == "ok" for r in models.values())
        return JSONResponse({"status": "ok" if ok else "unhealthy", "models": models}, status_code=200 if ok else 503)

    @api.get("/v1/models")
    async def list_models(self, request: Request):
        self._authorize(request)
        for name, handle in self.models.items():
            if name not in self._cards:
                try:
                    self._cards[name] = await asyncio.wait_for(handle.card.remote(), timeout=30)
                except Exception:  # listed without its engine details until the replica answers
                    return {"object": "list", "data": [self._cards.get(n, {"id": n, "object": "model",
                                                                            "owned_by": "sad-ray"})
                                                       for n in self.models]}
        return {"object": "list", "data": [self._cards[n] for n in self.models]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        req = parse_body(ChatCompletionRequest, await self._body(request))
        handle = self._model(req.model)
        check_messages(req.messages, self.limits)
        for i, m in enumerate(req.messages):
            if isinstance(m.content, list) and not m.content:
                raise ApiError(400, f"messages.{i}.content", "must not be an empty list")
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options", "is only allowed with stream: true")
        sampling = Sampling(max_tokens=max_tokens_of(req, self.limits, self.limits.default_max_tokens),
                            temperature=req.temperature, top_p=req.top_p, stop=tuple(stop_list(req.stop, self.limits)),
                            seed=req.seed)
        gen = Generate([{"role": m.role, "content": m.text()} for m in req.messages], sampling,
                       self.limits.max_prompt_tokens)
        created = int(time.time())
        cid = f"chatcmpl-{gen.request_id}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream(handle, gen, cid, created, req.model, include_usage)
        out = await self._call(handle.chat, gen)
        usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                 "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}
        return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                             "finish_reason": out["finish_reason"]}], "usage": usage}

    @api.post("/v1/agent/step")
    async def agent_step(self, request: Request):
        from sad_ray.envs.react import INSTRUCTIONS, context_window, system_prompt
        from sad_ray.method.segment import segment
        from sad_ray.rollout.agent import parse_action
        from sad_ray.rollout.engines import SamplingConfig, cut_at_stop

        self._authorize(request)
        req = parse_body(AgentStepRequest, await self._body(request))
        handle = self._model(req.model)
        if req.env not in INSTRUCTIONS:
            raise ApiError(400, "env", f"no ReAct prompt for {req.env[:100]!r}; known: {', '.join(sorted(INSTRUCTIONS))}",
                           "unknown_env")
        check_messages(req.turns, self.limits, "turns")
        system = system_prompt(req.env)
        turns = [{"role": t.role, "content": t.content} for t in req.turns]
        if turns[0]["role"] == "system":
            if turns[0]["content"] != system:
                raise ApiError(400, "turns.0.content", f"is not the {req.env} system prompt; leave the system turn "
                               "out and the server adds it")
            turns = turns[1:]
        first = len(req.turns) - len(turns)
        for i, t in enumerate(turns):
            want = "user" if i % 2 == 0 else "assistant"
            if t["role"] != want:
                raise ApiError(400, f"turns.{first + i}.role", f"is {t['role']!r}, expected {want!r}: turns are the "
                               "observation, then assistant and user turns alternating")
        if not turns or turns[-1]["role"] != "user":
            raise ApiError(400, "turns", "must end with the latest observation (a user turn)")
        # Exactly what the agent loop (sad_ray.rollout.agent.play) sends for this episode.
        chat = context_window([{"role": "system", "content": system}, *turns], self.args.context_chars)
        stop = SamplingConfig().stop
        sampling = Sampling(max_tokens=max_tokens_of(req, self.limits, self.args.agent_max_tokens),
                            temperature=req.temperature, top_p=req.top_p, stop=stop, seed=req.seed)
        gen = Generate(chat, sampling, self.limits.max_prompt_tokens)
        out = await self._call(handle.chat, gen, rename={"messages": "turns"})
        text = cut_at_stop(out["text"], stop).strip()
        seg = segment(text, self.args.segment_format, self.args.on_unparsed)
        return {
            "id": f"step-{gen.request_id}", "object": "agent.step", "model": req.model, "env": req.env,
            "content": text, "thought": parse_thought(text), "action": parse_action(text),
            "spans": [{"start": s.start, "end": s.end, "kind": s.kind, "text": text[s.start:s.end]} for s in seg.spans],
            "segmentation_issues": dict(seg.issues), "finish_reason": out["finish_reason"],
            "context_turns": len(chat),
            "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                      "total_tokens": out["prompt_tokens"] + out["completion_tokens"]},
        }

    # ----------------------------------------------------------------------------------------- model calls

    async def _call(self, method, gen: Generate, rename: dict[str, str] | None = None) -> dict[str, Any]:
        try:
            out = await method.remote(gen)
        except Exception as exc:  # the replica died or Serve refused the request (back-pressure)
            raise ApiError(503, "model", f"the model is unavailable ({type(exc).__name__}); retry",
                           "model_unavailable") from None
        if "error" in out:
            raise _renamed(out["error"], rename)
        return out

    async def _stream(self, handle: DeploymentHandle, gen: Generate, cid: str, created: int, model: str,
                      include_usage: bool):
        stream = handle.options(stream=True).chat_stream.remote(gen)
        try:
            first = await stream.__anext__()
        except Exception as exc:
            raise ApiError(503, "model", f"the model is unavailable ({type(exc).__name__}); retry",
                           "model_unavailable") from None
        if "error" in first:
            raise _renamed(first["error"])
        prompt_tokens = first["prompt_tokens"]

        def event(delta: dict[str, Any], finish: str | None = None) -> str:
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                          "model": model, "choices": [{"index": 0, "delta": delta,
                                                                       "finish_reason": finish}]}) + "\n\n"

        async def events() -> AsyncIterator[str]:
            tokens, done = 0, False
            yield event({"role": "assistant", "content": ""})
            try:
                async for item in stream:
                    if "error" in item:
                        yield "data: " + json.dumps(item["error"]) + "\n\n"
                        return
                    tokens += item["tokens"]
                    if item["text"] or item["finish_reason"]:
                        yield event({"content": item["text"]} if item["text"] else {}, item["finish_reason"])
                done = True
            except Exception as exc:
                yield "data: " + json.dumps(ApiError(503, "model", f"the model failed mid-stream "
                                                     f"({type(exc).__name__})", "model_unavailable").body()) + "\n\n"
                return
            finally:
                if not done:  # the client went away (or the stream broke): stop generating for it
                    stream.cancel()
            if include_usage:
                yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                             "model": model, "choices": [], "usage": {
                                                 "prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                                                 "total_tokens": prompt_tokens + tokens}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def info(self) -> dict[str, Any]:
        import ray

        return {"pid": os.getpid(), "actor_id": ray.get_runtime_context().get_actor_id()}


# ---------------------------------------------------------------------------------------------------- building


def deployment_name(spec: ModelSpec, index: int) -> str:
    return f"model{index}-" + re.sub(r"[^A-Za-z0-9_.-]", "_", spec.name)


def build_app(args: dict[str, Any] | AppArgs) -> serve.Application:
    """The application for `args` (an AppArgs or its dict, e.g. `serve run`'s `args:`)."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    models = {}
    for i, spec in enumerate(args.models):
        source = spec.source
        # Relative directories are taken from where the app is built, not from a replica's working directory.
        if not source.startswith("models:/") and Path(source).expanduser().is_dir():
            spec = spec.model_copy(update={"source": str(Path(source).expanduser().resolve())})
        options: dict[str, Any] = {
            "name": deployment_name(spec, i), "max_ongoing_requests": spec.max_ongoing_requests,
            "max_queued_requests": spec.max_queued_requests,
            "ray_actor_options": {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus,
                                  **({"resources": spec.resources} if spec.resources else {})},
        }
        if spec.autoscaling is not None:
            options["autoscaling_config"] = spec.autoscaling.model_dump()
        else:
            options["num_replicas"] = spec.num_replicas
        models[spec.name] = ModelDeployment.options(**options).bind(spec, args.precision, args.cache_dir,
                                                                    args.tracking_uri)
    return Ingress.options(max_ongoing_requests=args.ingress_max_ongoing_requests).bind(models, args)
