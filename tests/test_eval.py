"""Evaluation: the metrics as docs/evaluation.md defines them, then the teacher and a student played through the real
Serve app (real vLLM engine, real HTTP, real environments, real MLflow store) into the table, plots and files."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import pytest

from sad_ray.eval.metrics import (
    bootstrap_mean,
    normalise_action,
    paired_difference,
    rouge_l_f1,
    strip_thought_label,
    wilson,
)

# ------------------------------------------------------------------------------------------------ the metrics


def test_rouge_l_f1_is_the_lcs_f_measure_over_words():
    # LCS of "the cat sat on the mat" and "the cat lay on the mat" is 5 words of 6 each: P = R = F = 5/6.
    assert rouge_l_f1("The cat sat on the mat.", "the cat lay on the mat") == pytest.approx(5 / 6)
    # Candidate 3 words, reference 6, LCS 3: P = 1, R = 1/2, F = 2/3.
    assert rouge_l_f1("go to desk", "I should go to the desk 1") == pytest.approx(2 * 1 * (3 / 7) / (1 + 3 / 7))
    assert rouge_l_f1("", "") == 1.0
    assert rouge_l_f1("anything", "") == 0.0
    assert rouge_l_f1("a b c", "c b a") == pytest.approx(1 / 3)  # order matters: LCS is 1
    assert strip_thought_label("Thought 2: go to the desk") == "go to the desk"


def test_actions_compare_in_their_normal_form():
    assert normalise_action("  Go To  desk 1. ") == normalise_action("go to desk 1")
    assert normalise_action("search[ red  Shoes ]") == "search[red shoes]"
    assert normalise_action("`click[Buy Now]`") == "click[buy now]"
    assert normalise_action(None) == ""
    assert normalise_action("go to desk 1") != normalise_action("go to desk 2")


def test_wilson_and_bootstrap_intervals():
    # Reference values (Wilson 1927; e.g. statsmodels proportion_confint(method="wilson")).
    assert wilson(5, 10).low == pytest.approx(0.2366, abs=1e-4)
    assert wilson(5, 10).high == pytest.approx(0.7634, abs=1e-4)
    zero = wilson(0, 10)
    assert (zero.value, zero.low) == (0.0, 0.0) and zero.high == pytest.approx(0.2775, abs=1e-4)
    assert wilson(10, 10).high == 1.0 and wilson(10, 10).low == pytest.approx(0.7225, abs=1e-4)
    assert math.isnan(wilson(0, 0).value)
    with pytest.raises(ValueError, match="successes"):
        wilson(11, 10)
    mean = bootstrap_mean([1.0, 2.0, 3.0, 4.0, 5.0] * 8)
    assert mean.value == 3.0 and 2.5 < mean.low < 3.0 < mean.high < 3.5
    assert bootstrap_mean([7.0]).low == 7.0
    diff = paired_difference([1, 1, 1, 0], [0, 0, 1, 0])
    assert diff.value == 0.5 and diff.low >= 0.0
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1], [1, 2])


def test_eval_config_names_the_bad_key():
    from sad_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="eval"):
        load_config(None, ["eval.tasks=[1,1]"])
    with pytest.raises(ConfigError, match="eval"):
        load_config(None, ["eval.split=train"])
    with pytest.raises(ConfigError, match="eval.cot_thresold"):
        load_config(None, ["eval.cot_thresold=0.4"])


# --------------------------------------------------------------------------------------- through the Serve app


@pytest.fixture(scope="module")
def student_dir(starter_dir, tmp_path_factory) -> Path:
    """The student the main job starts from: the starter teacher with 6 of its 30 layers."""
    from sad_ray.models.student import build_student

    return build_student(starter_dir, tmp_path_factory.mktemp("student") / "student", num_layers=6).path


@pytest.fixture(scope="module")
def evaluated(starter_dir, student_dir, tmp_path_factory):
    import mlflow

    from sad_ray.config import load_config
    from sad_ray.eval.job import Agent, evaluation_stage
    from serve.local import serve_models_for

    root = tmp_path_factory.mktemp("eval")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(None, [
        "eval.tasks=[1,1,1]", "eval.max_steps=3", "eval.forced_steps_per_episode=2", "eval.max_new_tokens=48",
        "eval.max_model_len=2048", "eval.kv_cache_gib=1", f"tracking.tracking_uri={uri}",
        f"paths.output_dir={root / 'out'}"])
    served: list[dict] = []
    client_checks: dict = {}
    serve_models = serve_models_for(cfg)

    @contextlib.contextmanager
    def recording(models):
        served.append(dict(models))
        with serve_models(models) as endpoint:
            client_checks.update(_client_checks(endpoint))  # while the app is up: one app for the module
            yield endpoint

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.MlflowClient(uri).create_experiment("eval-test")
    try:
        with mlflow.start_run(experiment_id=experiment) as parent:
            result = evaluation_stage(cfg, starter_dir, [Agent("student", str(student_dir))], root / "out" / "eval",
                                      recording)
    finally:
        mlflow.set_tracking_uri(previous)
    return {"cfg": cfg, "result": result, "dir": root / "out" / "eval", "served": served, "uri": uri,
            "parent": parent.info.run_id, "student": student_dir, "client": client_checks,
            "teacher": starter_dir}


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


@pytest.mark.slow
def test_teacher_and_student_play_the_same_tasks_through_http(evaluated):
    (models,) = evaluated["served"]  # one app served both agents
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


@pytest.mark.slow
def test_teacher_forcing_compares_each_step_with_the_teachers(evaluated):
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
    # (Batching may flip a bf16 argmax now and then, hence 80%; a history one turn short gave 2 of 6.)
    own = [f for f in forced if f["agent"] == "teacher"]
    same = sum(f["thought"] == f["teacher_thought"] and f["action"] == f["teacher_action"] for f in own)
    assert same >= 0.8 * len(own), f"the teacher rewrote only {same} of its {len(own)} forced steps"


@pytest.mark.slow
def test_the_report_has_every_agent_env_and_interval(evaluated):
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


@pytest.mark.slow
def test_the_report_is_in_mlflow(evaluated):
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


@pytest.mark.slow
def test_a_rerun_reuses_stored_agents_and_regenerates_the_same_report(evaluated):
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


@pytest.mark.slow
def test_the_endpoint_client_names_what_the_server_refused(evaluated):
    checks = evaluated["client"]
    (turn,) = checks["good"]
    assert turn.text and turn.completion_tokens > 0 and turn.prompt_tokens > 0 and turn.seconds > 0
    assert "HTTP 404" in checks["unknown model"] and "no-such-model" in checks["unknown model"]
    assert "HTTP 401" in checks["wrong key"]
