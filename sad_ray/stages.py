"""The distillation job's stages, wired together: models -> teacher records -> student training.

Each stage records itself in MLflow as a child run and leaves its output in `paths.output_dir`, where a rerun
finds it: records already written are skipped, a finished student is not trained again. The output folder is a
local path or a URI (`file://` on a shared folder, `s3://`, `gs://`; sad_ray.storage): records and checkpoints
are written through it, models are built locally and uploaded whole, and whatever needs a local directory (the
student for a tokenizer check, a model to register) is staged from it.

Everything derived from a teacher lives in that teacher's folder, named by its id (folder name and weights
fingerprint, `sad_ray.models.identity`), so a new teacher (e.g. after `jobs/bootstrap_teacher.py`) starts fresh
folders and the old ones stay as they were:

    <output_dir>/teacher-<name>-<fingerprint>/
        teacher.json                 the teacher id and where the teacher was read from
        student-init/                the student cut from this teacher (rebuilt when its recipe changes)
        records/                     part-*.parquet shards and dropped-episodes.jsonl
        students/<objective>-seed<seed>/   one trained student per training run, side by side
        ray_train/<objective>-seed<seed>-<run identity>/   that run's checkpoints
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sad_ray import storage, tracking
from sad_ray.config import Config, resolve_auto, to_flat_dict
from sad_ray.envs.base import Episode
from sad_ray.envs.seed import seed_episodes
from sad_ray.records import (
    ShardWriter,
    check_teacher,
    episode_id,
    existing_ids,
    finished_episodes,
    iter_records,
    read_records,
    write_jsonl,
)
from sad_ray.rollout.score import ScoreReport, score_episodes

if TYPE_CHECKING:
    from sad_ray.eval.job import ServeModels

log = logging.getLogger(__name__)


TRAJECTORY_FIELDS = ('"id", "env", "task_type", "split", "turns": [{"role", "content"}, ...], optional "success", '
                     '"reward", "steps"')


def load_episodes(path: str | Path) -> Iterator[Episode]:
    """Episodes from a JSON-lines file; a bad line is an error naming the file, the line and the field.

    A file with no episode, or an id on two lines, is an error too: the file is read whole before anything is
    scored, so a bad line never leaves part of a file written.
    """
    from sad_ray.method.masks import validate_turns

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.trajectories: no file at {path}")
    required = {"id": str, "env": str, "task_type": str, "split": str, "turns": list}
    optional = {"success": ((bool,), "a bool"), "reward": ((int, float), "a number"), "steps": ((int,), "an int")}
    seen: dict[str, int] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
            for name, kind in required.items():
                if not isinstance(row.get(name), kind):
                    raise ValueError(f"{path}:{lineno}: field {name!r} must be a {kind.__name__}, got {row.get(name)!r}")
            for name, (kinds, kind_name) in optional.items():
                value = row.get(name)
                # bool is an int to Python; `"success": "false"` would be truthy.
                if name in row and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
                    raise ValueError(f"{path}:{lineno}: field {name!r} must be {kind_name}, got {value!r}")
            try:
                validate_turns(row["turns"])
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: field {exc}") from None
            if row["id"] in seen:
                raise ValueError(f"{path}:{lineno}: id {row['id']!r} is already on line {seen[row['id']]}")
            seen[row["id"]] = lineno
            yield Episode(
                id=row["id"], env=row["env"], task_type=row["task_type"], split=row["split"], turns=row["turns"],
                success=row.get("success", True), reward=float(row.get("reward", 1.0)),
                steps=row.get("steps", sum(t["role"] == "assistant" for t in row["turns"])),
            )
    if not seen:
        raise ValueError(f"data.trajectories {path}: no episodes; expected one JSON object a line: {TRAJECTORY_FIELDS}")


def episodes_for(cfg: Config) -> list[Episode]:
    if cfg.data.source == "jsonl":
        return list(load_episodes(cfg.data.trajectories))
    if cfg.data.source == "seed":
        return seed_episodes(cfg.data.seed_episodes)
    return list(demonstrations(cfg))


def demonstrations(cfg: Config) -> Iterator[Episode]:
    """Expert demonstrations in ReAct form from the training split of each configured environment."""
    from sad_ray.envs import make_env
    from sad_ray.envs.react import demonstration

    for name in cfg.data.envs:
        env = make_env(name, **env_kwargs(cfg).get(name, {}))
        try:
            for task in env.tasks("train", cfg.data.episodes_per_env):
                yield demonstration(env, task)
        finally:
            env.close()


@dataclass(frozen=True)
class TeacherFolders:
    """One teacher and the folders derived from it (see the module docstring)."""

    teacher: Path  # the teacher model's directory
    teacher_id: str  # `<name>@<fingerprint>`: what its records carry in `teacher_model`
    root: Path | str  # <output_dir>/teacher-<name>-<fingerprint>: a local Path or a URI (sad_ray.storage)

    @property
    def records(self) -> Path | str:
        return storage.join(self.root, "records")

    @property
    def student_init(self) -> Path | str:
        return storage.join(self.root, "student-init")

    def student(self, name: str) -> Path | str:
        return storage.join(self.root, "students", name)

    def file(self, name: str) -> Path | str:
        return storage.join(self.root, name)


def teacher_folder_name(teacher: str) -> str:
    """`teacher-<name>-<12 hex of the fingerprint>` for a teacher id `<name>@<fingerprint>`."""
    name, _, fingerprint = teacher.rpartition("@")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    return f"teacher-{safe}-{fingerprint[:12]}"


def output_root(cfg: Config) -> Path | str:
    """`paths.output_dir`, made: an absolute local Path, or the URI as given."""
    out = storage.absolute(cfg.paths.output_dir)
    storage.make_dirs(out)
    return out


def teacher_folders(cfg: Config, out: Path | str) -> TeacherFolders:
    """Resolve `models.teacher`, identify it by content, and make (or find) its folder under `out` (a local
    path or a URI)."""
    from sad_ray.models.identity import teacher_id
    from sad_ray.models.starter import resolve_model

    teacher = resolve_model(cfg.models.teacher, Path(cfg.paths.cache_dir).expanduser())
    tid = teacher_id(teacher)
    root = storage.join(out, teacher_folder_name(tid))
    storage.make_dirs(root)
    info = storage.join(root, "teacher.json")
    if not storage.exists(info):
        storage.write_bytes(info, (json.dumps({"teacher_id": tid, "path": str(teacher)}, indent=2) + "\n").encode())
    log.info("teacher %s (%s): its records, student-init and students are in %s", tid, teacher, root)
    return TeacherFolders(teacher, tid, root)


def training_run_name(cfg: Config) -> str:
    """A training run's folder (`students/<name>`) and MLflow child run (`train-<name>`): objective and seed, after
    `onpolicy-` for an on-policy run (whose rounds live in `on_policy/<name>-<settings key>`)."""
    return f"{'onpolicy-' if cfg.loss.mode == 'on_policy' else ''}{cfg.loss.objective}-seed{cfg.train.seed}"


def _student_info(where: Path | str) -> dict:
    """The info file build_student left in a student folder, local or remote ({} when there is none)."""
    from sad_ray.models.student import STUDENT_INFO_NAME, read_student_info

    if not storage.is_remote(where):
        return read_student_info(Path(where)) or {}
    info = storage.join(where, STUDENT_INFO_NAME)
    try:
        return json.loads(storage.read_bytes(info)) if storage.is_file(info) else {}
    except (OSError, ValueError):
        return {}


def stage_models(cfg: Config, folders: TeacherFolders) -> tuple[Path | str, int]:
    """The student to start from (a local Path or a URI) and the vocabulary it shares with the teacher.

    Without `models.student`, the student is cut from the teacher into the teacher's `student-init/`, rebuilt
    whenever its info file names another teacher id or recipe (`models.student_layers`) than the current ones.
    Under a URI output folder it is built in a local temporary folder and uploaded whole.
    """
    from sad_ray.models.starter import resolve_model
    from sad_ray.models.student import build_student, student_recipe
    from sad_ray.models.tokenizers import check_compatible

    cache = Path(cfg.paths.cache_dir).expanduser()
    with tracking.stage_run("models", {"teacher_id": folders.teacher_id}):
        if cfg.models.student:
            student = resolve_model(cfg.models.student, cache)
        else:
            student = folders.student_init
            info = _student_info(student)
            want = {"teacher_id": folders.teacher_id, "recipe": student_recipe(cfg.models.student_layers)}
            have = {k: info.get(k) for k in want}
            if have != want:
                if info:
                    log.info("models: %s was built as %s, this run wants %s; rebuilding it", student, have, want)
                if storage.is_remote(student):
                    storage.staging_root().mkdir(parents=True, exist_ok=True)
                    with tempfile.TemporaryDirectory(prefix="student-init-", dir=storage.staging_root()) as tmp:
                        built = build_student(folders.teacher, Path(tmp) / "student-init", cfg.models.student_layers,
                                              cfg.models.trust_remote_code)
                        storage.upload_dir(Path(tmp) / "student-init", student)
                else:
                    built = build_student(folders.teacher, student, cfg.models.student_layers,
                                          cfg.models.trust_remote_code)
                tracking.log_metrics({"teacher_params": built.teacher_params, "student_params": built.student_params})
        vocab = check_compatible(folders.teacher, storage.stage(student), cfg.models.trust_remote_code)
        tracking.log_metrics({"shared_vocab": vocab})
    return student, vocab


def stage_records(cfg: Config, folders: TeacherFolders) -> ScoreReport:
    """Teacher records for every episode not yet written: scored demonstrations or the teacher's rollouts.

    Records already in the folder must be this teacher's: another teacher's are refused, naming the file.
    """
    if cfg.data.source != "rollouts":
        return score_stage(cfg, folders, finished_episodes(folders.records))
    report = stage_rollouts(cfg, folders)
    have = existing_ids(folders.records)
    if len(have) < cfg.data.min_records:
        # A weak teacher keeps few of its episodes: the tasks it failed get the expert's demonstration instead,
        # scored by the same teacher (its logits on a good trajectory: still its distribution to distill).
        log.warning("records: the teacher's rollouts kept %d records, fewer than data.min_records (%d); the "
                    "tasks without records get the expert's demonstrations, scored by the teacher",
                    len(have), cfg.data.min_records)
        more = score_stage(cfg, folders, {episode_id(i) for i in have})
        report.kept += more.kept
        report.dropped.update(more.dropped)
    return report


def score_stage(cfg: Config, folders: TeacherFolders, done: set[str]) -> ScoreReport:
    """The teacher's top-k on the configured episodes (demonstrations, a jsonl file or the seed set) not in
    `done`, written as records."""
    from transformers import AutoTokenizer

    from sad_ray.models.tokenizers import tokenizer_fingerprint
    from sad_ray.rollout.engines import HFEngine

    check_teacher(folders.records, folders.teacher_id)
    teacher, records_dir = folders.teacher, folders.records
    report = ScoreReport()
    with tracking.stage_run("records", {"top_k": cfg.records.top_k, "format": cfg.segment.format}):
        todo = [e for e in episodes_for(cfg) if e.id not in done]
        log.info("records: %d episodes to score, %d already done", len(todo), len(done))
        if todo:
            tokenizer = AutoTokenizer.from_pretrained(teacher, trust_remote_code=cfg.models.trust_remote_code)
            engine = HFEngine(teacher, precision=cfg.precision, trust_remote_code=cfg.models.trust_remote_code)
            with ShardWriter(records_dir, cfg.records.records_per_shard) as writer:
                for record in score_episodes(
                    todo, tokenizer, engine, fmt=cfg.segment.format, top_k=cfg.records.top_k,
                    fingerprint=tokenizer_fingerprint(tokenizer), on_unparsed=cfg.segment.on_unparsed,
                    drop_with_issues=cfg.segment.drop_trajectories_with_issues, max_tokens=cfg.data.max_tokens,
                    report=report, context_chars=cfg.rollout.context_chars, teacher_model=folders.teacher_id,
                ):
                    writer.add(record)
        tracking.log_metrics({
            "records_written": report.kept, "records_total": len(done) + report.kept,
            **{f"dropped/{k}": v for k, v in report.dropped.items()},
            **{f"segmentation/{k}": v for k, v in report.segmentation_issues.items()},
        })
    return report


def env_kwargs(cfg: Config) -> dict[str, dict]:
    """Each environment's constructor arguments from `environments.*` (see sad_ray/config.py)."""
    from sad_ray.envs.alfworld.env import env_data_dir

    e = cfg.environments
    # ALFWorld: the configured folder, else $ALFWORLD_DATA (read by the environment, which names it in errors),
    # else games generated into the cache.
    if e.alfworld.data_dir:
        alfworld = {"data_dir": str(Path(e.alfworld.data_dir).expanduser()),
                    "data_setting": "environments.alfworld.data_dir"}
    elif env_data_dir() is not None:
        alfworld = {}
    else:
        alfworld = {"cache_dir": str(Path(cfg.paths.cache_dir).expanduser() / "alfworld")}
    questions = e.hotpotqa.questions_path
    hotpotqa = ({"questions_path": ({split: str(Path(p).expanduser()) for split, p in questions.items()}
                                    if isinstance(questions, dict) else str(Path(questions).expanduser())),
                 "corpus_path": str(Path(e.hotpotqa.corpus_path).expanduser()) if e.hotpotqa.corpus_path else None}
                if e.hotpotqa.questions_path else {})
    webshop = {"num_products": e.webshop.num_products, "catalogue_seed": e.webshop.catalogue_seed}
    return {"alfworld": alfworld, "hotpotqa": hotpotqa, "webshop": webshop}


def stage_rollouts(cfg: Config, folders: TeacherFolders) -> ScoreReport:
    """The teacher plays the environments on Ray Data; records are streamed into shards."""
    from sad_ray.rollout.pipeline import RecordRecipe, run_rollouts

    check_teacher(folders.records, folders.teacher_id)
    teacher, records_dir = folders.teacher, folders.records
    seg = RecordRecipe(fmt=cfg.segment.format, on_unparsed=cfg.segment.on_unparsed,
                       drop_with_issues=cfg.segment.drop_trajectories_with_issues, top_k=cfg.records.top_k,
                       max_tokens=cfg.data.max_tokens)
    with tracking.stage_run("rollout", {f"rollout.{k}": v for k, v in to_flat_dict(cfg.rollout).items()}):
        result = run_rollouts(teacher, records_dir, cfg.rollout, seg, env_kwargs(cfg), cfg.records.records_per_shard,
                              precision=cfg.precision)
        tracking.log_metrics(result.metrics())
        if result.shards:
            write_sample([r.to_row() for r in read_records(result.shards[0])[:3]], folders.file("rollout_sample.jsonl"))
    log.info("rollout: %s", result.metrics())
    return ScoreReport(kept=result.written, dropped=result.dropped)


def write_sample(rows: list[dict], where: Path | str) -> None:
    """A few records as JSON lines at `where` (local or URI) and as an artifact of the active MLflow run."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / storage.name(where)
        write_jsonl(rows, local)
        mlflow.log_artifact(str(local))
        storage.write_bytes(where, local.read_bytes())


def stage_train(cfg: Config, folders: TeacherFolders, student_init: Path | str, name: str | None = None, *,
                records: Sequence[Path | str] | None = None, final: Path | str | None = None,
                register: bool = True) -> dict:
    """The student trained on the teacher's records under Ray Train (sad_ray.train.ray_train), then registered.

    Each training run has its own folder, `students/<objective>-seed<seed>`, and its own MLflow child run,
    `train-<objective>-seed<seed>`, so runs of different objectives or seeds never overwrite one another; each
    trained student is a version of `tracking.register_student_as` tagged with its objective, seed, teacher and
    run identity. `name` replaces `<objective>-seed<seed>` (jobs/experiment.py: `<experiment>/<arm>-seed<seed>`).
    An on-policy round (sad_ray.onpolicy) trains on its own `records` folders into its own `final` folder, and
    registers only its last round's student (`register`).
    """
    import itertools

    import mlflow

    from sad_ray.train.ray_train import train_on_records

    name = name or training_run_name(cfg)
    final = final if final is not None else folders.student(name)
    train_records = list(records) if records is not None else folders.records
    tags = {"sad_ray.objective": cfg.loss.objective, "sad_ray.seed": cfg.train.seed,
            "sad_ray.teacher": folders.teacher_id}
    sample = folders.file("records_sample.jsonl")
    with tracking.stage_run("train", {"objective": cfg.loss.objective,
                                      **{f"train.{k}": v for k, v in to_flat_dict(cfg.train).items()}},
                            name=f"train-{name}", tags=tags) as run:
        if records is None and storage.exists(folders.records) and not storage.exists(sample):
            write_sample([r.to_row() for r in itertools.islice(iter_records(folders.records), 3)], sample)
        result = train_on_records(
            train_records, student_init, folders.root, cfg.train, cfg.loss, cfg.curriculum, run_name=name,
            tracking_uri=cfg.tracking.tracking_uri, mlflow_run_id=run.info.run_id,
            trust_remote_code=cfg.models.trust_remote_code, precision=cfg.precision,
            teacher=folders.teacher_id, final_dir=final,
        )
        tracking.log_metrics({"train/final_loss": result.loss, "train/tokens_per_second": result.tokens_per_second,
                              "train/data_wait_fraction": result.data_wait_seconds / result.seconds
                              if result.seconds else 0.0})
        identity = json.loads(storage.read_bytes(storage.join(final, "sad_ray_train.json")))["run"]
        mlflow.set_tag("sad_ray.run_identity", identity)
        marker = storage.join(final, "sad_ray_registered.json")
        registered = json.loads(storage.read_bytes(marker)) if storage.is_file(marker) else {}
        if register and (registered.get("run") != identity
                         or registered.get("name") != cfg.tracking.register_student_as):
            version = tracking.register_model(storage.stage(final), cfg.tracking.register_student_as,
                                              tags={**tags, "sad_ray.run_identity": identity})
            # `mlflow_run_id`: the child run that trained and registered it (a rerun's own finds it here)
            registered = {"name": cfg.tracking.register_student_as, "version": version, "run": identity,
                          "mlflow_run_id": run.info.run_id}
            storage.write_bytes(marker, json.dumps(registered).encode())
        elif not register:
            registered = {}
        summary = {**asdict(result), "tokens_per_second": result.tokens_per_second, "registered": registered,
                   "run_identity": identity}
    return summary


def train_student(cfg: Config, folders: TeacherFolders, student_init: Path | str, name: str | None = None) -> dict:
    """The student of `loss.mode`: trained on the teacher's records (stage_train), or in on-policy rounds on its
    own play scored by the teacher (sad_ray.onpolicy). Either way the summary has `student_dir`, `steps`,
    `seconds`, `loss`, `tokens_per_second`, `run_identity` and `registered`."""
    if cfg.loss.mode == "on_policy":
        from sad_ray.onpolicy import run_on_policy

        return run_on_policy(cfg, folders, student_init, name)
    return stage_train(cfg, folders, student_init, name)


def needs_teacher_records(cfg: Config) -> bool:
    """Off-policy training reads the teacher's records; on-policy rounds only when they mix some in."""
    return cfg.loss.mode == "off_policy" or cfg.on_policy.fraction < 1.0


def run_train_job(cfg: Config) -> dict:
    """`jobs/train_student.py`: train the student on the records already in the teacher's folder
    (`output_dir/teacher-<name>-<fingerprint>/records`, as the distill and rollout jobs wrote them)."""
    import torch

    torch.set_num_threads(cfg.train.threads)
    cfg = resolve_auto(cfg)
    folders = teacher_folders(cfg, output_root(cfg))
    with tracking.job_run(cfg, "train_student", {"teacher": folders.teacher_id}) as run:
        student_init, _ = stage_models(cfg, folders)
        summary = train_student(cfg, folders, student_init)
        return {"mlflow_run_id": run.info.run_id, "teacher_id": folders.teacher_id,
                "student": summary["student_dir"], "train": summary}


def run_distill(cfg: Config, serve_models: ServeModels | None = None) -> dict:
    """The main job: records, the student trained on them, then (with `eval.enabled` and a `serve_models` to
    serve them, as jobs/distill.py hands in) the teacher and the student evaluated through HTTP. Returns a summary
    for the caller to print."""
    import torch

    torch.set_num_threads(cfg.train.threads)
    built = None
    if cfg.models.teacher == "auto" and cfg.bootstrap.auto:
        # The preset allows building the teacher it wants (reused once built with the same settings).
        from sad_ray.bootstrap import run_bootstrap

        log.info("distill: models.teacher auto with bootstrap.auto: the bootstrapped teacher %r first",
                 cfg.bootstrap.name)
        built = run_bootstrap(cfg)
    cfg = resolve_auto(cfg)
    log.info("distill: teacher %s, trajectories from %s", cfg.models.teacher, cfg.data.source)
    folders = teacher_folders(cfg, output_root(cfg))
    with tracking.job_run(cfg, "distill", {"teacher": folders.teacher_id}) as run:
        student_init, _ = stage_models(cfg, folders)
        report = stage_records(cfg, folders) if needs_teacher_records(cfg) else ScoreReport()
        summary = train_student(cfg, folders, student_init)
        evaluation = None
        if cfg.eval.enabled and serve_models is not None:
            from sad_ray.eval.job import Agent, evaluation_stage

            student = Agent(f"student-{training_run_name(cfg)}", summary["student_dir"])
            evaluation = evaluation_stage(cfg, folders.teacher, [student], folders.file("eval"), serve_models)
        return {
            "mlflow_run_id": run.info.run_id,
            "teacher": str(folders.teacher),
            "teacher_id": folders.teacher_id,
            "student_init": str(student_init),
            "student": summary["student_dir"],
            "records": str(folders.records),
            "records_written_now": report.kept,
            "dropped": dict(report.dropped),
            "train": summary,
            **({"bootstrap": {k: built.get(k) for k in ("teacher", "reused", "success_rate", "eval_episodes",
                                                         "mlflow_run_id")}} if built else {}),
            **({"eval": evaluation} if evaluation is not None else {}),
        }


def run_rollout_job(cfg: Config) -> dict:
    """The rollout stage on its own (`jobs/rollout.py`): records from the teacher's play, into the teacher's
    folder (`output_dir/teacher-<name>-<fingerprint>/records`), where the distill and train jobs read them."""
    cfg = resolve_auto(cfg)
    folders = teacher_folders(cfg, output_root(cfg))
    with tracking.job_run(cfg, "rollout", {"teacher": folders.teacher_id}) as run:
        report = stage_rollouts(cfg, folders)
        return {"mlflow_run_id": run.info.run_id, "teacher_id": folders.teacher_id, "records": str(folders.records),
                "records_written_now": report.kept, "dropped": dict(report.dropped)}
