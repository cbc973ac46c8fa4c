"""Evaluation as a stage: serve the teacher and students, play the held-out tasks through HTTP, write the report.

The Serve app is started by whoever calls (jobs/evaluate.py, jobs/distill.py hand in `serve.local.serving`): the
library never imports `serve/`. Each agent's results are stored under `<teacher folder>/eval/agents/<name>/` with
the key of what produced them (model fingerprint, evaluation settings, tasks, the teacher's episodes); a rerun
reuses agents whose key is unchanged, so a crash loses at most the agent being played, and every table and plot
is regenerated from the stored episodes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path

from sad_ray import storage, tracking
from sad_ray.atomic import replacing_file
from sad_ray.config import Config, resolve_auto
from sad_ray.eval import report
from sad_ray.eval.evaluate import (
    AgentRun,
    ForcedStep,
    episode_of,
    episode_row,
    evaluate_agent_run,
    held_out_tasks,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """A running Serve app: its base URL and the key its /v1 routes want (None: none)."""

    url: str
    api_key: str | None = None


# name -> model source (directory or models:/ URI) in; the running app out. The caller stops it on exit.
ServeModels = Callable[[Mapping[str, str]], AbstractContextManager[Endpoint]]


@dataclass(frozen=True)
class Agent:
    name: str
    source: str  # a model directory, a folder's URI (s3://..., staged where it is served) or an MLflow registry URI


def agent_key(agent: Agent, cfg: Config, tasks: Sequence[str], reference_key: str | None) -> str | None:
    """What an agent's stored results were produced by; None when it cannot be told (a registry alias may move)."""
    from sad_ray.models.identity import model_fingerprint

    if agent.source.startswith("models:/"):
        if "@" in agent.source:
            return None
        model = agent.source
    else:
        model = model_fingerprint(storage.stage(agent.source))
    settings = {k: v for k, v in asdict(cfg.eval).items()
                if k not in ("enabled", "students", "replicas", "num_cpus", "num_gpus", "resources", "confidence", "resamples")}
    key = {"model": model, "eval": settings, "tasks": list(tasks), "precision": cfg.precision,
           "context_chars": cfg.rollout.context_chars, "segment": asdict(cfg.segment), "reference": reference_key}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


class AgentStore:
    """`<root>/<agent>/{key, episodes.jsonl, forced.jsonl, run.json}`: one agent's finished evaluation."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, name: str) -> Path:
        return self.root / name.replace("/", "--")

    def load(self, name: str, key: str | None) -> AgentRun | None:
        d = self._dir(name)
        if key is None or not (d / "key").is_file() or (d / "key").read_text().strip() != key:
            return None
        return stored_run(d, name)

    def save(self, run: AgentRun, key: str | None) -> None:
        d = self._dir(run.name)
        d.mkdir(parents=True, exist_ok=True)
        (d / "key").unlink(missing_ok=True)  # the key goes last: a half-written agent is never reused
        _write_lines(d / "episodes.jsonl", [episode_row(run.name, e) for e in run.episodes])
        _write_lines(d / "forced.jsonl", [asdict(f) for f in run.forced])
        with replacing_file(d / "run.json") as tmp:
            tmp.write_text(json.dumps({"parameters": run.parameters, "seconds": run.seconds}))
        if key is not None:
            with replacing_file(d / "key") as tmp:
                tmp.write_text(key)


def stored_run(d: Path, name: str) -> AgentRun:
    """An agent's results as AgentStore saved them in `d` (run.json, episodes.jsonl, forced.jsonl)."""
    if not (d / "run.json").is_file():
        raise FileNotFoundError(f"{d}: no stored evaluation of {name} (run.json missing)")
    meta = json.loads((d / "run.json").read_text())
    episodes = [episode_of(json.loads(line)) for line in (d / "episodes.jsonl").read_text().splitlines()]
    forced = [ForcedStep(**json.loads(line)) for line in (d / "forced.jsonl").read_text().splitlines()]
    return AgentRun(name, meta["parameters"], episodes, forced, meta["seconds"])


def _write_lines(path: Path, rows: Sequence[dict]) -> None:
    with replacing_file(path) as tmp, tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _parameters(endpoint: Endpoint, names: Sequence[str]) -> dict[str, int]:
    import httpx

    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    resp = httpx.get(f"{endpoint.url}/v1/models", headers=headers, timeout=60)
    resp.raise_for_status()
    cards = {c["id"]: c for c in resp.json()["data"]}
    return {n: int(cards.get(n, {}).get("parameters", 0)) for n in names}


def evaluate_agents(cfg: Config, agents: Sequence[Agent], out_dir: Path | str, serve_models: ServeModels,
                    tokenizer_dir: Path) -> dict:
    """Every agent on the same held-out tasks through the endpoint (the first agent is the reference whose
    episodes are teacher-forced), then the report under `out_dir` and in the active MLflow run.

    A URI `out_dir` is worked on through a local copy (storage.working_copy), uploaded after each agent's results
    are stored and once more with the report, so a crash loses no more than with a local folder."""
    with storage.working_copy(out_dir) as local:
        def publish() -> None:
            if storage.is_remote(out_dir):
                storage.upload_dir(local, out_dir)

        result = _evaluate_agents(cfg, agents, local, serve_models, tokenizer_dir, publish)
    return {**result, "dir": str(out_dir)}


def _evaluate_agents(cfg: Config, agents: Sequence[Agent], out_dir: Path, serve_models: ServeModels,
                     tokenizer_dir: Path, publish: Callable[[], None]) -> dict:
    from sad_ray.rollout.http_engine import HTTPEngine
    from sad_ray.stages import env_kwargs

    tasks = held_out_tasks(cfg.eval, env_kwargs(cfg))
    ids = [t.id for t in tasks]
    store = AgentStore(out_dir / "agents")
    runs: dict[str, AgentRun] = {}
    keys: dict[str, str | None] = {}
    reference_key: str | None = None
    for i, agent in enumerate(agents):
        keys[agent.name] = agent_key(agent, cfg, ids, reference_key if i else None)
        if i == 0:
            reference_key = keys[agent.name]
        stored = store.load(agent.name, keys[agent.name])
        if stored is not None and (i == 0 or runs.get(agents[0].name) is not None):
            runs[agent.name] = stored
            log.info("eval: %s's results are stored (%s); not played again", agent.name, keys[agent.name])
    todo = [a for a in agents if a.name not in runs]
    if todo:
        with serve_models({a.name: a.source for a in todo}) as endpoint:
            params = _parameters(endpoint, [a.name for a in todo])
            for agent in todo:
                teacher = None if agent is agents[0] else runs[agents[0].name].episodes
                engine = HTTPEngine(endpoint.url, agent.name, api_key=endpoint.api_key,
                                    max_concurrency=cfg.eval.in_flight)
                try:
                    run = evaluate_agent_run(agent.name, params[agent.name], engine, tasks, teacher, cfg.eval,
                                             cfg.rollout.context_chars, cfg.segment.format, cfg.segment.on_unparsed,
                                             env_kwargs(cfg))
                finally:
                    engine.close()
                log.info("eval: %s played %d episodes and %d forced steps in %.0f s (%d requests, %d retried)",
                         agent.name, len(run.episodes), len(run.forced), run.seconds, engine.stats.requests,
                         engine.stats.retries)
                store.save(run, keys[agent.name])
                publish()
                runs[agent.name] = run
    return write_report(cfg, [runs[a.name] for a in agents], out_dir, tokenizer_dir)


def write_report(cfg: Config, runs: Sequence[AgentRun], out_dir: Path, tokenizer_dir: Path) -> dict:
    """table.md/.csv, diffs.csv, summary.md, episodes.jsonl, forced.jsonl and the plots, from the stored runs;
    also MLflow artifacts (under `eval/`) and metrics of the active run."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    reason_tokens = report.ReasonTokens(count, cfg.segment.format, cfg.segment.on_unparsed)
    table = report.rows(runs, cfg.eval, reason_tokens)
    differences = report.diffs(runs, cfg.eval, reason_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"table.md": report.markdown(table, differences, cfg.eval), "table.csv": report.to_csv(table),
             "diffs.csv": report.to_csv(differences), "summary.md": report.summary_markdown(table)}
    for name, text in files.items():
        with replacing_file(out_dir / name) as tmp:
            tmp.write_text(text)
    _write_lines(out_dir / "episodes.jsonl", [episode_row(r.name, e) for r in runs for e in r.episodes])
    _write_lines(out_dir / "forced.jsonl", [{"agent": r.name, **asdict(f)} for r in runs for f in r.forced])
    written = [out_dir / n for n in (*files, "episodes.jsonl", "forced.jsonl")] + report.plots(table, out_dir)
    _log_to_mlflow(table, written)
    overall = {r.agent: {"success": r.success.value, "step_seconds_p50": r.step_seconds_p50,
                         "step_seconds_p95": r.step_seconds_p95, "parameters": r.parameters,
                         "cot_match": r.cot_match.value, "action_agreement": r.action_agreement.value}
               for r in table if r.env == report.ALL}
    # JSON has no NaN: a number that could not be measured (no forced step had an action) is null.
    overall = {a: {k: None if v != v else v for k, v in m.items()} for a, m in overall.items()}
    return {"dir": str(out_dir), "agents": overall, "summary": files["summary.md"]}


def _log_to_mlflow(table: Sequence[report.Row], files: Sequence[Path]) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    for path in files:
        mlflow.log_artifact(str(path), artifact_path="eval")
    metrics: dict[str, float] = {}
    for r in table:
        where = r.agent if r.env == report.ALL else f"{r.agent}/{r.env}" + ("" if r.task_type == report.ALL
                                                                             else f"/{r.task_type}")
        for name, value in (("success", r.success.value), ("steps", r.steps.value),
                            ("cot_match", r.cot_match.value), ("action_agreement", r.action_agreement.value),
                            ("reason_tokens_per_step", r.reason_tokens_per_step.value),
                            ("step_seconds_p50", r.step_seconds_p50), ("step_seconds_p95", r.step_seconds_p95),
                            ("tokens_per_second", r.tokens_per_second), ("no_action", r.no_action.value)):
            if value == value:  # NaN: nothing to log
                metrics[f"eval/{where}/{name}".replace("@", "_")] = float(value)
    tracking.log_metrics(metrics)


def student_agents(cfg: Config, students_root: Path | str) -> list[Agent]:
    """`eval.students`, or every finished student under the teacher's `students/` folder. A student may be a model
    directory, an MLflow registry URI, or a Hugging Face Hub id (downloaded once into `<cache_dir>/hub`)."""
    from sad_ray.models.starter import is_hub_id, resolve_model

    if cfg.eval.students:
        out = []
        for source in cfg.eval.students:
            path = Path(source).expanduser()
            if source.startswith("models:/"):
                out.append(Agent(_agent_name(source), source))
                continue
            if not (path / "config.json").is_file() and is_hub_id(source):
                path = resolve_model(source, Path(cfg.paths.cache_dir).expanduser())
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"eval.students: {source} is neither a model directory (no config.json), "
                                        "an MLflow registry URI (models:/<name>/<version> or @<alias>) nor a "
                                        "Hugging Face Hub id (<org>/<name>)")
            out.append(Agent(_agent_name(source), str(path)))
        return out
    found = [p for p in storage.list_dirs(students_root) if storage.is_file(storage.join(p, "sad_ray_train.json"))]
    return [Agent(f"student-{storage.name(p)}", str(p)) for p in found]


def _agent_name(source: str) -> str:
    if source.startswith("models:/"):
        return source.removeprefix("models:/").replace("/", "-v").replace("@", "-")
    return Path(source.rstrip("/")).name


def evaluation_stage(cfg: Config, teacher: Path, students: Sequence[Agent], out_dir: Path | str,
                     serve_models: ServeModels) -> dict:
    """An `evaluate` child run of the active job run: the teacher first (the reference), then the students."""
    agents = [Agent("teacher", str(teacher)), *students]
    names = [a.name for a in agents]
    if len(set(names)) != len(names):
        raise ValueError(f"agents to evaluate need distinct names, got {names}")
    with tracking.stage_run("evaluate", {f"eval.{k}": v for k, v in asdict(cfg.eval).items()},
                            tags={"sad_ray.agents": ",".join(names)}):
        return evaluate_agents(cfg, agents, out_dir, serve_models, teacher)


def run_evaluate_job(cfg: Config, serve_models: ServeModels) -> dict:
    """`jobs/evaluate.py`: the teacher and its students (`eval.students`, default every one trained from it)."""
    from sad_ray.stages import output_root, teacher_folders

    cfg = resolve_auto(cfg)
    folders = teacher_folders(cfg, output_root(cfg))
    students = student_agents(cfg, folders.file("students"))
    if not students:
        log.warning("no trained student under %s and none in eval.students: evaluating the teacher alone",
                    folders.file("students"))
    with tracking.job_run(cfg, "evaluate", {"teacher": folders.teacher_id}) as run:
        result = evaluation_stage(cfg, folders.teacher, students, folders.file("eval"), serve_models)
        return {"mlflow_run_id": run.info.run_id, "teacher_id": folders.teacher_id, "eval": result}
