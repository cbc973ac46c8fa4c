"""The experiment: does SAD beat token-level distillation? One resumable runner over a grid of arms.

An experiment is a config with an `experiment` section (configs/experiment.yaml). Every arm shares the teacher,
the records (made once, as the distill job makes them), the student-init and the held-out tasks; an arm changes
the config by overrides (`loss.objective=token_kd`, `loss.lambda_reason=0.5`, `curriculum.reweight=false`) and
runs once per seed. For each (arm, seed), in order:

1. train the student (stage_train) into `<teacher folder>/students/<experiment>/<arm>-seed<seed>`;
2. evaluate it through the Serve app beside the teacher, on the same tasks (the teacher is played once and
   stored; each agent's results are stored with the key of what produced them);
3. copy its stored results to `experiment.results_dir` (a folder kept in the repository) with the arm's
   settings, compute time and MLflow run ids in `manifest.json`.

A rerun skips every (arm, seed) already stored with the same key and goes on with the rest, so a grid runs in
chunks (`--arms` picks some). The report (`experiment.report`, docs/RESULTS.md) is regenerated from
`results_dir` alone (`render_results`): nothing in it is typed by hand.

Intervals: success and CoT match / action agreement are Wilson intervals, other means bootstrap intervals, over
the episodes of all seeds of an arm pooled (each seed's tasks are the same held-out tasks); the success of each
seed is listed beside it, so the spread between seeds shows. Paired differences pair the same task of the same
seed in two arms and bootstrap over those pairs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sad_ray import storage, tracking
from sad_ray.atomic import replace_dir, replacing_file
from sad_ray.config import ArmConfig, Config, ConfigError, apply_overrides, resolve_auto

if TYPE_CHECKING:
    from sad_ray.eval.evaluate import AgentRun
    from sad_ray.eval.job import ServeModels

log = logging.getLogger(__name__)

TEACHER = "teacher"
MANIFEST = "manifest.json"


# What the report keeps of each on-policy round (sad_ray.onpolicy's round figures).
ROUND_FIGURES = ("round", "episodes", "won", "success_rate", "records", "mixed_records", "divergence",
                 "divergence_reason", "divergence_act", "reasoning_tokens_per_turn", "teacher_turns",
                 "weight_sync_seconds", "rollout_seconds", "train_seconds")


def agent_name(arm: ArmConfig, seed: int) -> str:
    return f"{arm.name}-seed{seed}"


def arm_config(cfg: Config, arm: ArmConfig, seed: int) -> Config:
    """The experiment's config with the arm's overrides and the seed (the torch seed and the curriculum's, which
    orders the data: every arm of one seed sees the same order unless it changes the curriculum); an override
    that does not fit names the arm."""
    try:
        return apply_overrides(cfg, [*arm.set, f"train.seed={seed}", f"curriculum.seed={seed}"])
    except ConfigError as exc:
        raise ConfigError(f"experiment.arms[{arm.name}].set: {exc}") from None


def run_experiment(cfg: Config, serve_models: ServeModels, only: Sequence[str] = ()) -> dict:
    """Every (arm, seed) not yet stored, then the report. `only`: the names of the arms to run this time."""
    from sad_ray.eval.job import Agent, evaluation_stage
    from sad_ray.precision import host_summary
    from sad_ray.stages import (
        output_root,
        stage_models,
        stage_records,
        teacher_folders,
        train_student,
    )

    exp = cfg.experiment
    if not exp.arms:
        raise ConfigError("experiment.arms is empty: an experiment needs at least one arm (configs/experiment.yaml)")
    unknown = [a for a in only if a not in {arm.name for arm in exp.arms}]
    if unknown:
        raise ConfigError(f"--arms: no arm {unknown[0]!r} in experiment.arms ({', '.join(a.name for a in exp.arms)})")
    for arm in exp.arms:  # every arm's overrides checked before hours of work
        for seed in arm.seeds:
            arm_config(cfg, arm, seed)
    if cfg.models.teacher == "auto" and cfg.bootstrap.auto:
        from sad_ray.bootstrap import run_bootstrap

        run_bootstrap(cfg)
    cfg = resolve_auto(cfg)
    folders = teacher_folders(cfg, output_root(cfg))
    eval_dir = folders.file(f"experiments/{exp.name}/eval")
    results = Path(exp.results_dir).expanduser() if exp.results_dir else None
    todo = [(arm, seed) for arm in exp.arms if not only or arm.name in only for seed in arm.seeds]
    done: list[str] = []
    with tracking.job_run(cfg, "experiment", {"teacher": folders.teacher_id, "experiment": exp.name}) as run:
        student_init, _ = stage_models(cfg, folders)
        start = time.perf_counter()
        # The teacher's records: the off-policy arms' data (and part of their compute, when made now).
        records_seconds = time.perf_counter() - start if stage_records(cfg, folders).kept else None
        for i, (arm, seed) in enumerate(todo, 1):
            name = agent_name(arm, seed)
            acfg = arm_config(cfg, arm, seed)
            log.info("experiment %s: %s (%d/%d)", exp.name, name, i, len(todo))
            if arm.train:
                summary = train_student(acfg, folders, student_init, name=f"{exp.name}/{name}")
                source = summary["student_dir"]
                train = {**{k: summary.get(k) for k in ("steps", "seconds", "loss", "tokens_per_second",
                                                         "run_identity")},
                         "mlflow_run_id": summary["registered"].get("mlflow_run_id")}
                if "rounds" in summary:  # on-policy: each round's figures (sad_ray.onpolicy)
                    train["rounds"] = [{k: f.get(k) for k in ROUND_FIGURES} for f in summary["rounds"]]
            else:
                source, train = str(student_init), {}
            evaluation = evaluation_stage(acfg, folders.teacher, [Agent(name, source)], eval_dir, serve_models)
            log.info("experiment %s: %s evaluated, success %s", exp.name, name,
                     {k: round(v.get("success", 0.0), 3) for k, v in evaluation["agents"].items()})
            if results is not None:
                publish(results, eval_dir, cfg, acfg, arm, seed, train, run.info.run_id, folders.teacher_id,
                        folders.teacher, host_summary(cfg.precision), records_seconds)
            done.append(name)
        report = None
        if results is not None and exp.report:
            report = write_results(results, Path(exp.report).expanduser())
    return {"mlflow_run_id": run.info.run_id, "teacher_id": folders.teacher_id, "ran": done,
            "results_dir": str(results) if results else None, "report": str(report) if report else None}


def publish(results: Path, eval_dir, cfg: Config, acfg: Config, arm: ArmConfig, seed: int, train: dict,
            job_run_id: str, teacher_id: str, teacher_dir: Path, host: dict,
            records_seconds: float | None = None) -> None:
    """Copy the teacher's and this (arm, seed)'s stored results into `results` and record them in its manifest
    (settings, compute, run ids), replacing any earlier entry of the same (arm, seed). Results made against
    another teacher evaluation (other tasks, settings or teacher) no longer pair with it: they are dropped, with
    a warning naming them. A rerun that reused a stored run keeps the host it was measured on."""
    from sad_ray.config import to_dict

    results.mkdir(parents=True, exist_ok=True)
    name = agent_name(arm, seed)
    with storage.working_copy(eval_dir) as local:
        keys = {n: (local / "agents" / n / "key").read_text().strip() for n in (TEACHER, name)}
        manifest = _read_manifest(results)
        if manifest.get("teacher_key") not in (None, keys[TEACHER]):
            log.warning("experiment: the teacher's evaluation changed (key %s, was %s): the stored runs %s were "
                        "made against the old one and are dropped from %s", keys[TEACHER],
                        manifest["teacher_key"], sorted(manifest.get("runs", {})), results)
            for old in manifest.get("runs", {}):
                shutil.rmtree(results / "agents" / old, ignore_errors=True)
            manifest = {}
        for agent in (TEACHER, name):
            dst = results / "agents" / agent
            tmp = dst.with_name(f".{agent}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(local / "agents" / agent, tmp)
            replace_dir(tmp, dst)
    tokenizer = results / "tokenizer"
    if not tokenizer.is_dir():  # the report counts reasoning tokens with the teacher's tokenizer
        from sad_ray.models.identity import TOKENIZER_FILES

        tmp = results / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in TOKENIZER_FILES:
            if (Path(teacher_dir) / f).is_file():
                shutil.copy2(Path(teacher_dir) / f, tmp / f)
        replace_dir(tmp, tokenizer)
    manifest.update({
        "experiment": cfg.experiment.name, "title": cfg.experiment.title, "teacher_id": teacher_id,
        "teacher_key": keys[TEACHER],
        "baseline": cfg.experiment.baseline, "job_mlflow_run_id": job_run_id,
        "eval": to_dict(cfg)["eval"], "segment": to_dict(cfg)["segment"],
    })
    if records_seconds is not None:  # made by this job (a rerun that found them keeps the time they took)
        manifest["records_seconds"] = records_seconds
    manifest.setdefault("arms", {})[arm.name] = {"set": list(arm.set), "train": arm.train, "note": arm.note,
                                                "order": [a.name for a in cfg.experiment.arms].index(arm.name)}
    before = manifest.setdefault("runs", {}).get(name, {})
    manifest["runs"][name] = {
        "arm": arm.name, "seed": seed, "train": train, "key": keys[name],
        "host": before["host"] if before.get("key") == keys[name] and "host" in before else host,
        # the agent's own evaluation time as stored (a rerun that reuses it keeps the time it took)
        "eval_seconds": json.loads((results / "agents" / name / "run.json").read_text())["seconds"],
        "config": {k: v for k, v in to_dict(acfg).items()
                   if k in ("loss", "curriculum", "train", "models", "on_policy", "rollout")},
    }
    with replacing_file(results / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")


def _read_manifest(results: Path) -> dict:
    path = results / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); restore it from git or delete it to start over") from None


# ------------------------------------------------------------------------------------------------- the report


@dataclass
class ArmRuns:
    name: str
    seeds: dict[int, AgentRun] = field(default_factory=dict)


def load_results(results: Path) -> tuple[dict, AgentRun, list[ArmRuns]]:
    """The manifest, the teacher's run and each arm's runs by seed, in the grid's order, from `results` alone."""
    from sad_ray.eval.job import stored_run

    manifest = _read_manifest(results)
    if not manifest.get("runs"):
        raise FileNotFoundError(f"{results}: no finished runs ({MANIFEST} lists none); run jobs/experiment.py first")
    teacher = stored_run(results / "agents" / TEACHER, TEACHER)
    arms: dict[str, ArmRuns] = {}
    for name, entry in manifest["runs"].items():
        arm = arms.setdefault(entry["arm"], ArmRuns(entry["arm"]))
        arm.seeds[int(entry["seed"])] = stored_run(results / "agents" / name, name)
    order = {name: a.get("order", 0) for name, a in manifest.get("arms", {}).items()}
    return manifest, teacher, sorted(arms.values(), key=lambda a: (order.get(a.name, 0), a.name))


def pooled(arm: ArmRuns) -> AgentRun:
    """One run of an arm over all its seeds: episode and forced-step ids prefixed by the seed, so that two arms
    pair on (seed, task)."""
    from sad_ray.eval.evaluate import AgentRun

    episodes, forced, seconds, params = [], [], 0.0, 0
    for seed, run in sorted(arm.seeds.items()):
        episodes += [dataclasses.replace(e, id=f"s{seed}/{e.id}") for e in run.episodes]
        forced += [dataclasses.replace(f, episode=f"s{seed}/{f.episode}") for f in run.forced]
        seconds += run.seconds
        params = run.parameters
    return AgentRun(arm.name, params, episodes, forced, seconds)


def render_results(results: Path, plots_dir: Path | None = None, report_dir: Path | None = None) -> str:
    """The report's Markdown from the stored results (and its plots into `plots_dir`, linked relative to
    `report_dir`, where the report goes)."""
    from transformers import AutoTokenizer

    from sad_ray.config import section_from_dict
    from sad_ray.eval import report
    from sad_ray.eval.evaluate import EvalConfig

    manifest, teacher, arms = load_results(results)
    eval_cfg = section_from_dict(EvalConfig, manifest["eval"], "eval")
    segment = manifest["segment"]
    tokenizer_dir = results / "tokenizer"
    if not (tokenizer_dir / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{tokenizer_dir}: the teacher's tokenizer files are missing (the report counts "
                                "reasoning tokens with it); rerun one arm of jobs/experiment.py to restore them")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    counter = report.ReasonTokens(lambda text: len(tok(text, add_special_tokens=False)["input_ids"]),
                                  segment["format"], segment["on_unparsed"])
    runs = [teacher, *(pooled(a) for a in arms)]
    table = report.rows(runs, eval_cfg, counter)
    by_name = {a.name: a for a in arms}
    baseline = manifest.get("baseline") or ""
    differences = []
    if baseline in by_name:
        base = pooled(by_name[baseline])
        differences = report.diffs([base, *(pooled(a) for a in arms if a.name != baseline)], eval_cfg, counter)
    lines = [f"# {manifest.get('title', 'Results')}", "",
             f"Regenerated from `{_shown(results)}` by `python jobs/experiment.py --report-only --config "
             f"<the experiment's config>`; do not edit by hand.", ""]
    lines += _headline(differences, baseline)
    records_s = manifest.get("records_seconds")
    lines += ["## Arms", "", "Compute per seed: training (on-policy: its rounds of play, scoring and training); "
              "with the teacher's records: plus the time the teacher's records took, for every arm that trains on "
              "them (off-policy, or on-policy mixing them in), the figure to compare arms by.", "",
              "| arm | seeds | what it changes | compute per seed | with the teacher's records | evaluation per seed |",
              "|---|---|---|---|---|---|"]
    for arm in arms:
        entries = [manifest["runs"][f"{arm.name}-seed{s}"] for s in sorted(arm.seeds)]
        train_s = [e["train"].get("seconds") or 0.0 for e in entries]
        eval_s = [e["eval_seconds"] for e in entries]
        info = manifest["arms"].get(arm.name, {})
        what = ", ".join(f"`{s}`" for s in info.get("set", [])) or "the experiment's config"
        if not info.get("train", True):
            what = "untrained (the student-init)"
        lines.append(f"| {arm.name} | {', '.join(map(str, sorted(arm.seeds)))} | {what}"
                     f"{' (' + info['note'] + ')' if info.get('note') else ''} | "
                     f"{_minutes(sum(train_s) / len(train_s))} | {_with_records(entries, train_s, records_s)} | "
                     f"{_minutes(sum(eval_s) / len(eval_s))} |")
    lines += ["", "## Per arm, every environment", "",
              "Per-seed success (over all held-out tasks): " + "; ".join(
                  f"{a.name} " + ", ".join(f"s{s} {_rate(r)}" for s, r in sorted(a.seeds.items())) for a in arms),
              "", report.markdown(table, differences, eval_cfg)]
    lines += _rounds_table(manifest)
    hosts = {json.dumps(e["host"], sort_keys=True) for e in manifest["runs"].values()}
    lines += ["## Compute", ""]
    for h in sorted(hosts):
        host = json.loads(h)
        cpus = f", {host['cpus']} CPUs" if host.get("cpus") else ""
        lines.append(f"- {host.get('cpu_model', '?')} (bf16 CPU flags: {host.get('cpu_bf16_flags', '?')}{cpus}), "
                     f"precision {host.get('precision_resolved', '?')}")
    total = sum((e["train"].get("seconds") or 0.0) + e["eval_seconds"] for e in manifest["runs"].values())
    lines += [f"- {total / 3600:.2f} h of training and evaluation in all "
              f"({len(manifest['runs'])} runs), records and teacher not counted"]
    if manifest.get("records_seconds") is not None:
        lines.append(f"- the teacher's records, which the off-policy arms and the on-policy arms mixing them in "
                     f"train on: {_minutes(manifest['records_seconds'])} (in the arms' compute \"with the teacher's "
                     "records\")")
    lines += ["",
              "## MLflow", "", f"- the experiment's job run: `{manifest.get('job_mlflow_run_id')}`"]
    lines += [f"- {name}: training run `{e['train'].get('mlflow_run_id')}`" for name, e in sorted(manifest["runs"].items())
              if e["train"].get("mlflow_run_id")]
    if plots_dir is not None:
        plots_dir.mkdir(parents=True, exist_ok=True)
        written = report.plots(table, plots_dir)
        base = report_dir if report_dir is not None else Path.cwd()
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({os.path.relpath(p, base)})" for p in written]
    return "\n".join(lines) + "\n"


def _rounds_table(manifest: dict) -> list[str]:
    """On-policy runs' figures round by round (none: no lines)."""
    rows = []
    for name, entry in sorted(manifest["runs"].items()):
        for f in entry["train"].get("rounds") or ():
            rate = "n/a" if f.get("success_rate") is None else f"{100 * f['success_rate']:.0f}%"
            rows.append(f"| {name} | {f['round']} | {rate} of {f['episodes']} | {f['records']} | "
                        f"{f.get('divergence', 0.0):.3f} ({f.get('divergence_reason', 0.0):.3f} / "
                        f"{f.get('divergence_act', 0.0):.3f}) | {f['reasoning_tokens_per_turn']:.1f} | "
                        f"{f['teacher_turns']} | {f['weight_sync_seconds']:.1f} s | {_minutes(f['rollout_seconds'])} | "
                        f"{_minutes(f['train_seconds'])} |")
    if not rows:
        return []
    return ["## On-policy rounds", "",
            "The student's own play on training tasks, round by round: its success, its divergence from the teacher on "
            "the round's turns before training on them (token mean of the arm's loss.divergence, all / [REASON] / "
            "[ACT]; with teacher intervention the turns the teacher wrote are among them), [REASON] tokens per turn, "
            "turns the teacher wrote, the weight sync (loading the round's player into the rollout engines) and the "
            "time of play plus scoring, and of training.", "",
            "| run | round | success (training tasks) | records | divergence (all / reason / act) | reasoning "
            "tokens per turn | teacher turns | weight sync | play + scoring | training |",
            "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]


def _headline(differences, baseline: str) -> list[str]:
    if not differences:
        return []
    lines = [f"## Headline: each arm minus {baseline}, task by task", "",
             "| arm | env | paired tasks | success difference (points) | verdict |", "|---|---|---|---|---|"]
    for d in differences:
        s = d.success
        verdict = ("better" if s.low > 0 else "worse" if s.high < 0 else "no difference shown") \
            if d.tasks else "no paired tasks"
        lines.append(f"| {d.agent} | {d.env} | {d.tasks} | {100 * s.value:+.1f} [{100 * s.low:+.1f}, "
                     f"{100 * s.high:+.1f}] | {verdict} |")
    return [*lines, ""]


def _rate(run: AgentRun) -> str:
    n = len(run.episodes)
    return f"{sum(e.success for e in run.episodes)}/{n}" if n else "n/a"


def uses_teacher_records(config: dict) -> bool:
    """Whether a run trained on the teacher's records (stored config sections): every off-policy run, and an
    on-policy one mixing them in (on_policy.fraction < 1)."""
    if config.get("loss", {}).get("mode", "off_policy") != "on_policy":
        return True
    return float(config.get("on_policy", {}).get("fraction", 1.0)) < 1.0


def _with_records(entries: list[dict], train_s: list[float], records_s: float | None) -> str:
    if not entries[0]["train"]:  # an untrained arm
        return "-"
    mean = sum(train_s) / len(train_s)
    if not uses_teacher_records(entries[0].get("config", {})):
        return _minutes(mean)
    return "? (the records' time was not measured)" if records_s is None else _minutes(mean + records_s)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


REPORT_HEAD = ("# Results\n\nOne section per experiment, each regenerated from that experiment's stored results by "
               "`python jobs/experiment.py --report-only --config <its config>`; do not edit by hand.\n")


def report_section(text: str, name: str, body: str) -> str:
    """A report file's `text` ("" for a new one) with experiment `name`'s section replaced by `body` (its headings
    one level down), or added at the end: the sections of other experiments are kept as they are."""
    begin, end = f"<!-- experiment {name}: regenerated, do not edit -->", f"<!-- /experiment {name} -->"
    demoted = "\n".join("#" + line if line.startswith("#") else line for line in body.rstrip("\n").splitlines())
    section = f"{begin}\n{demoted}\n{end}"
    if begin in text and end in text[text.index(begin):]:
        before, rest = text.split(begin, 1)
        return before + section + rest.split(end, 1)[1]
    return (text if text.strip() else REPORT_HEAD).rstrip("\n") + "\n\n" + section + "\n"


def write_results(results: Path, report_path: Path) -> Path:
    """Regenerate the results' experiment's section of `report_path` (and its plots beside it, in
    `<stem>-plots/<experiment>/`) from `results`; other experiments' sections in the file stay."""
    name = _read_manifest(results).get("experiment") or results.name
    plots = report_path.parent / f"{report_path.stem}-plots" / name
    text = render_results(results, plots, report_path.parent)
    old = report_path.read_text() if report_path.is_file() else ""
    with replacing_file(report_path) as tmp:
        tmp.write_text(report_section(old, name, text))
    return report_path


def report_only(cfg: Config) -> dict:
    """`jobs/experiment.py --report-only`: the report regenerated from `experiment.results_dir`, nothing run."""
    exp = cfg.experiment
    if not exp.results_dir or not exp.report:
        raise ConfigError("--report-only needs experiment.results_dir and experiment.report")
    path = write_results(Path(exp.results_dir).expanduser(), Path(exp.report).expanduser())
    return {"report": str(path)}
