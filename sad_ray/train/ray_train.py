"""Training on trajectory records with Ray Train: records through Ray Data, the SAD loss, the curriculum,
checkpoints, MLflow. It trains students, and the bootstrapped teacher on demonstration records.

The driver checks everything that can be checked before a worker starts (records, model, tokenizer, resources),
then runs a `TorchTrainer`. Each worker reads its own shard of the records (`get_dataset_shard`), validates every
row, and trains under DDP (the CPU default) or DeepSpeed ZeRO-2/3; its curriculum sampler orders its shard.
Every `checkpoint_every` steps the workers report a checkpoint (model, optimizer, scheduler, sampler state by
record id, RNG); a rerun of the same run, or Ray Train restarting a killed worker, resumes from the last one.
The final checkpoint carries the student as a Hugging Face directory, which the driver copies out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sad_ray import storage
from sad_ray.atomic import replace_dir
from sad_ray.console import clock
from sad_ray.method.curriculum import CurriculumConfig
from sad_ray.method.losses import LossConfig
from sad_ray.records import COMMON_COLUMNS, shard_paths
from sad_ray.resources import check_resources

log = logging.getLogger(__name__)

CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered
HF_SUBDIR = "hf"


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


class TrainSetupError(ValueError):
    """A training run that cannot start: names the setting or file and what was expected."""


@dataclass(frozen=True)
class TrainConfig:
    """How to train, apart from the loss and the curriculum (`train.*` in the config)."""

    steps: int = 30
    batch_size: int = 4  # examples per worker per micro-batch
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2  # torch threads per worker
    # DDP is the CPU default; DeepSpeed ZeRO-2/3 the GPU one (it also runs on CPU, with gloo).
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: Literal[2, 3] = 2
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Custom Ray resources each worker also asks for: {train_gpu: 1} keeps the workers on the nodes that offer
    # train_gpu (cluster.yaml's gpu-train type), away from the teacher's.
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    # How Ray places the workers' group: PACK fills a node before the next (DDP's all-reduce stays local), SPREAD
    # puts each worker on another node where it can (one worker per GPU node), STRICT_* refuse to do otherwise.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Recompute each decoder layer's activations in backward instead of keeping them: activation memory falls from
    # O(layers x batch x tokens) to about one layer's worth, for more compute. Same gradients, same run.
    gradient_checkpointing: bool = False
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    max_failures: int = 2
    log_every: int = 1
    split: Literal["train", "val", "test"] = "train"
    # 0: each worker holds its whole shard of the records in memory (the curriculum draws from all of it). N > 0:
    # each worker streams its Ray Data shard once through a buffer of N records, and the curriculum draws within
    # the buffer and decides which records leave it for the next ones (BufferedCurriculum): memory stays flat
    # however large the data. Use it for data that does not fit a worker's memory; a run longer than one pass
    # keeps training on the last buffer.
    buffer_records: int = 0
    # A record shard that cannot be read whole (truncated, corrupt, another schema version, an invalid record):
    # refuse the run naming it, or skip it with a warning (scan_records).
    bad_shards: Literal["refuse", "skip"] = "refuse"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "num_workers", "checkpoint_every", "keep_checkpoints",
                     "log_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.max_failures < 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be > 0, warmup_steps and max_failures >= 0")
        if self.buffer_records and self.buffer_records < self.batch_size * self.grad_accum:
            raise ValueError(f"buffer_records ({self.buffer_records}) must hold at least one step's examples "
                             f"(batch_size x grad_accum = {self.batch_size * self.grad_accum}), or be 0")
        if not self.use_gpu and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0 without GPUs, got {self.cpus_per_worker}")
        check_resources("resources_per_worker", self.resources_per_worker)
        if self.bad_shards not in ("refuse", "skip"):
            raise ValueError(f"bad_shards must be 'refuse' or 'skip', got {self.bad_shards!r}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(f"placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                             f"got {self.placement_strategy!r}")


@dataclass(frozen=True)
class DataSummary:
    records: int
    fingerprint: str
    bounds: tuple[list[float], list[float]]  # per-feature min and max of the complexity features
    ids_digest: str  # sha256 over the sorted record ids: which data this is
    teacher: str = ""  # the teacher id every record carries (sad_ray.models.identity.teacher_id)
    shards: tuple[str, ...] = ()  # the shards to train on
    skipped: tuple[str, ...] = ()  # shards left out as unreadable (bad_shards="skip")


def scan_records(records_dir: str | Path | Sequence[str | Path], split: str = "train", teacher: str | None = None,
                 bad_shards: str = "refuse") -> DataSummary:
    """Validate every record (streamed shard by shard, nothing kept) and summarise the split to train on.

    Runs on the driver before any worker starts, so a bad dataset stops the run at once with a RecordError-style
    message naming the record, the field and the file. Every record must come from `teacher` (a teacher id), or,
    without one, from one and the same teacher; a record of another is refused with its file named.
    A shard that cannot be read whole (truncated or corrupt Parquet, another schema version, an invalid record)
    is refused, or with `bad_shards="skip"` left out with a warning naming it: the workers then read only the
    shards listed in the summary, so none of them ever opens a broken file.
    """
    from sad_ray.records import RecordError, iter_records, teacher_mismatch

    folders = [records_dir] if isinstance(records_dir, (str, Path)) else list(records_dir)
    for folder in folders:
        if not storage.exists(folder):
            raise TrainSetupError(f"records directory {folder} does not exist")
        if not shard_paths(folder):
            raise TrainSetupError(f"records directory {folder} holds no record shards (part-*.parquet)")
    records_dir = ", ".join(map(str, folders))  # for messages
    if bad_shards not in ("refuse", "skip"):
        raise TrainSetupError(f"bad_shards must be 'refuse' or 'skip', got {bad_shards!r}")
    feats: list[tuple[int, int, float]] = []
    ids: list[str] = []
    fingerprints: set[str] = set()
    good: list[str] = []
    skipped: list[str] = []
    other = 0
    first_teacher: tuple[str, Path] | None = None  # without an expected teacher: the first record's, and its file
    for shard in [s for folder in folders for s in shard_paths(folder)]:
        rows: list[tuple[int, int, float]] = []
        shard_ids: list[str] = []
        shard_fps: set[str] = set()
        try:
            for r in iter_records(shard):
                if teacher is not None and r.teacher_model != teacher:
                    raise TrainSetupError(teacher_mismatch(shard, r.teacher_model, teacher))
                if first_teacher is None:
                    first_teacher = (r.teacher_model, shard)
                elif r.teacher_model != first_teacher[0]:
                    raise TrainSetupError(
                        f"records in {shard} were made by teacher {r.teacher_model}, those in {first_teacher[1]} by "
                        f"teacher {first_teacher[0]}; train on one teacher's records")
                if r.split != split:
                    other += 1
                    continue
                rows.append((r.reasoning_length, r.action_length, r.teacher_entropy))
                shard_ids.append(r.id)
                shard_fps.add(r.tokenizer_fingerprint)
        except TrainSetupError:
            raise
        except (RecordError, OSError, ValueError) as exc:  # invalid data, an unreadable or foreign Parquet file
            problem = f"invalid training data: {exc}" if isinstance(exc, RecordError) else \
                f"record shard {shard} cannot be read: {exc}"
            if bad_shards == "refuse":
                raise TrainSetupError(f"{problem} (train.bad_shards=skip leaves such shards out)") from None
            log.warning("train: skipping shard %s: %s", shard, problem)
            skipped.append(str(shard))
            continue
        feats += rows
        ids += shard_ids
        fingerprints |= shard_fps
        good.append(str(shard))
    if not feats:
        raise TrainSetupError(f"records directory {records_dir} holds no records of split {split!r} "
                              f"({other} records in other splits, {len(skipped)} shards skipped)")
    if len(fingerprints) != 1:
        raise TrainSetupError(f"records in {records_dir} were tokenized by {len(fingerprints)} different tokenizers; "
                              "train on one tokenizer's records")
    arr = np.asarray(feats, dtype=np.float64).T
    return DataSummary(records=len(feats), fingerprint=fingerprints.pop(),
                       bounds=(arr.min(axis=1).tolist(), arr.max(axis=1).tolist()),
                       ids_digest=hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest(),
                       teacher=first_teacher[0] if first_teacher else "", shards=tuple(good),
                       skipped=tuple(skipped))


def check_model(student_dir: str | Path, fingerprint: str, trust_remote_code: bool = False) -> int:
    """The student must be a loadable HF directory whose tokenizer made the records; returns its vocab size."""
    from transformers import AutoConfig, AutoTokenizer

    from sad_ray.models.tokenizers import tokenizer_fingerprint

    student_dir = Path(student_dir)
    if not (student_dir / "config.json").is_file():
        raise TrainSetupError(f"student model {student_dir} is not a Hugging Face directory (no config.json)")
    try:
        AutoConfig.from_pretrained(student_dir, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(student_dir, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise TrainSetupError(f"student model {student_dir} cannot be loaded: {exc}") from None
    got = tokenizer_fingerprint(tokenizer)
    if got != fingerprint:
        raise TrainSetupError(
            f"student tokenizer in {student_dir} (fingerprint {got}) is not the tokenizer the records were made "
            f"with (fingerprint {fingerprint}); token ids would not line up with the teacher's"
        )
    return len(tokenizer)


def normalised_complexity(rl, al, te, bounds, weights) -> np.ndarray:
    """Complexity of examples with the dataset-wide min/max (a worker sees only its shard)."""
    feats = np.stack([np.asarray(x, dtype=np.float64) for x in (rl, al, te)])
    lo, hi = np.asarray(bounds[0])[:, None], np.asarray(bounds[1])[:, None]
    span = hi - lo
    norm = np.divide(feats - lo, span, out=np.zeros_like(feats), where=span > 0)
    w = np.asarray(weights, dtype=np.float64)
    return (w[:, None] * norm).sum(axis=0) / w.sum()


def lr_factor(step: int, settings: TrainConfig) -> float:
    if settings.warmup_steps and step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.schedule == "cosine":
        span = max(1, settings.steps - settings.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - settings.warmup_steps) / span)))
    return 1.0


# ------------------------------------------------------------------------------------------------- worker side


def _absolute_tracking_uri(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return uri


class _MetricsSink:
    """Rank 0 logs straight into the driver's MLflow run (no Ray report per step: those cost ~2 s each)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None) -> None:
        self.client = None
        if tracking_uri and run_id:
            from mlflow import MlflowClient

            self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                                    if math.isfinite(float(v))])

    def tag(self, tags: dict[str, str]) -> None:
        if self.client is not None:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)


def _load_shard(split: str):
    """This worker's records, every row validated on read; returns (records, seconds spent)."""
    import ray.train

    from sad_ray.records import record_from_row

    start = time.perf_counter()
    shard = ray.train.get_dataset_shard("train")
    records = []
    for batch in shard.iter_batches(batch_format="pyarrow", batch_size=64):
        for row in batch.to_pylist():
            if row["split"] == split:
                records.append(record_from_row(row, "train dataset (Ray Data shard)"))
    # Shard order depends on Ray Data's scheduling; a stable order makes the curriculum reproducible.
    records.sort(key=lambda r: r.id)
    return records, time.perf_counter() - start


class _ShardStream:
    """This worker's records of one split, streamed once from its Ray Data shard in shard order (the split keeps
    file order, `_deterministic_shards`), validated on read; `position` counts the records handed out, so a
    restored worker can read up to where its checkpoint was and pick its buffered records back up."""

    def __init__(self, split: str, bounds, weights) -> None:
        import ray.train

        self.split, self.bounds, self.weights = split, bounds, weights
        self._rows = self._read(ray.train.get_dataset_shard("train"))
        self.position = 0
        self.exhausted = False

    def _read(self, shard) -> Iterator[Any]:
        from sad_ray.records import record_from_row

        for batch in shard.iter_batches(batch_format="pyarrow", batch_size=64):
            for row in batch.to_pylist():
                if row["split"] == self.split:
                    yield record_from_row(row, "train dataset (Ray Data shard)")

    def next(self) -> Any | None:
        """The next record, or None once the shard is read."""
        record = next(self._rows, None)
        if record is None:
            self.exhausted = True
            return None
        self.position += 1
        return record

    def complexity(self, record) -> float:
        return float(normalised_complexity([record.reasoning_length], [record.action_length],
                                           [record.teacher_entropy], self.bounds, self.weights)[0])

    def skip_to(self, position: int, wanted: set[str]) -> dict[str, Any]:
        """Read up to `position`, keeping only the records in `wanted` (a restored buffer's)."""
        kept = {}
        while self.position < position:
            record = self.next()
            if record is None:
                raise TrainSetupError(f"the checkpoint was {position} records into this worker's shard, which now "
                                      f"holds {self.position}: it was made on other data")
            if record.id in wanted:
                kept[record.id] = record
        return kept


def _refill(w: _Worker, slots: Sequence[int]) -> None:
    """Put the stream's next records into the buffer's free `slots` (left empty once the shard is read)."""
    for slot in slots:
        record = w.stream.next()
        w.records[slot] = record
        if record is not None:
            w.sampler.put(slot, record.id, w.stream.complexity(record))


@dataclass
class _Worker:
    """What one worker trains with: its shard, its curriculum, the model and how it is stepped."""

    records: list
    ids: list[str]
    sampler: Any
    tokenizer: Any
    pad_id: int
    module: Any  # the SupervisedHead
    model: Any  # what the forward runs through: module, its DDP wrapper, or the DeepSpeed engine
    optimizer: Any
    scheduler: Any
    scaler: Any
    engine: Any  # DeepSpeed engine or None
    precision: str  # resolved: bf16 | fp16 | fp32
    device: Any
    load_seconds: float
    stream: _ShardStream | None = None  # buffer_records > 0: where the buffer is refilled from


def _setup_worker(config: dict[str, Any], rank: int, world: int) -> _Worker:
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sad_ray.method.curriculum import BufferedCurriculum, CurriculumSampler
    from sad_ray.precision import log_choice
    from sad_ray.train.step import SupervisedHead

    s: TrainConfig = config["settings"]
    cur: CurriculumConfig = config["curriculum"]
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed + rank)
    precision = log_choice(config["precision"], "cuda" if s.use_gpu else "cpu", f"training (rank {rank})")

    local_batch = s.batch_size * s.grad_accum
    stream = None
    if s.buffer_records:  # filled by train_loop: from the start, or up to where a checkpoint was
        stream = _ShardStream(s.split, config["bounds"], cur.weights)
        records, load_seconds = [None] * s.buffer_records, 0.0
        sampler = BufferedCurriculum(replace(cur, seed=cur.seed * 1000 + rank), s.buffer_records, local_batch,
                                     s.steps)
    else:
        records, load_seconds = _load_shard(s.split)
        if len(records) < local_batch:
            raise TrainSetupError(f"worker {rank} got {len(records)} records, fewer than batch_size x grad_accum "
                                  f"({local_batch}); lower train.batch_size or train.num_workers")
        complexity = normalised_complexity([r.reasoning_length for r in records], [r.action_length for r in records],
                                           [r.teacher_entropy for r in records], config["bounds"], cur.weights)
        # One sampler per rank over its own shard (sad_ray.method.curriculum); ranks draw with their own seeds.
        sampler = CurriculumSampler(complexity, replace(cur, seed=cur.seed * 1000 + rank), local_batch, s.steps)

    student_dir = storage.stage(config["student_dir"])  # a URI is copied to this node once
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lm = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    lm.config.use_cache = False
    if s.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = SupervisedHead(lm)
    optimizer = torch.optim.AdamW(module.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, s))
    engine, scaler = None, None
    if s.strategy == "deepspeed":
        import deepspeed

        ds_config = {
            "train_micro_batch_size_per_gpu": s.batch_size,
            "gradient_accumulation_steps": s.grad_accum,
            "gradient_clipping": s.grad_clip,
            "zero_optimization": {"stage": s.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
            # DeepSpeed's own half-precision weights on GPUs; on CPU the forward's autocast carries the precision.
            "bf16": {"enabled": s.use_gpu and precision == "bf16"},
            "fp16": {"enabled": s.use_gpu and precision == "fp16"},
            "steps_per_print": 10**9,
        }
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        model = engine
    else:
        model = ray.train.torch.prepare_model(module) if world > 1 or s.use_gpu else module
        if precision == "fp16":
            scaler = torch.amp.GradScaler("cuda" if s.use_gpu else "cpu")
    model.train()
    ids = [r.id for r in records] if stream is None else []  # a buffer's ids live in its curriculum's slots
    return _Worker(records, ids, sampler, tokenizer, pad_id, module, model, optimizer, scheduler, scaler, engine,
                   precision, next(module.parameters()).device, load_seconds, stream)


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker loop (Ray Train calls it on every worker): draw, step, re-weight, log, checkpoint."""
    import ray.train

    from sad_ray.console import attach
    from sad_ray.precision import host_summary
    from sad_ray.train.step import MemoryWatch, curriculum_step, peak_memory_gb

    s: TrainConfig = config["settings"]
    memory = MemoryWatch()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    attach(config.get("relay"), f"train worker {rank}")  # our log lines reach the driver's console
    w = _setup_worker(config, rank, world)
    sink = _MetricsSink(config.get("tracking_uri"), config.get("run_id") if rank == 0 else None)
    step = 0
    if (start := ray.train.get_checkpoint()) is not None:
        with start.as_directory() as d:
            step = _restore(Path(d), w, rank)
        log.info("worker %d resumed at step %d", rank, step)
        sink.log({"train/resumed_from_step": step}, step)
    else:
        if w.stream is not None:
            _refill(w, w.sampler.free())
            if len(w.sampler.filled) < s.batch_size * s.grad_accum:
                raise TrainSetupError(f"worker {rank}'s shard holds {len(w.sampler.filled)} records, fewer than "
                                      f"batch_size x grad_accum; lower train.batch_size or train.num_workers")
        if rank == 0:
            sink.tag({f"sad_ray.train.{k}": v for k, v in host_summary(config["precision"],
                                                                       "cuda" if s.use_gpu else "cpu").items()})
            sink.log({"train/data_load_seconds": w.load_seconds,
                      **({"train/records_on_rank0": len(w.ids)} if w.stream is None else {})}, 0)
    tokens, t0 = 0, time.perf_counter()
    progress = _Progress(ctx.get_experiment_name(), step, s.steps) if rank == 0 else None
    while step < s.steps:
        _, out = curriculum_step(w.model, w.sampler, w.records, s.batch_size, w.pad_id, config["loss"],
                                 vocab_size=config["vocab_size"], precision=w.precision, optimizer=w.optimizer,
                                 scheduler=w.scheduler, grad_clip=s.grad_clip, scaler=w.scaler, engine=w.engine)
        if w.stream is not None and not w.stream.exhausted:
            _refill(w, w.sampler.evict(s.batch_size * s.grad_accum))
        step += 1
        tokens += out.n_reason + out.n_act  # the whole step's, over every rank
        elapsed = time.perf_counter() - t0
        metrics = {"step": step, "loss": out.loss, "loss_cot": out.loss_cot, "loss_act": out.loss_act,
                   "loss_ce": out.loss_ce, "tokens": tokens, "seconds": elapsed + w.load_seconds,
                   "data_wait_seconds": w.load_seconds, "peak_memory_gb": peak_memory_gb(w.device),
                   **{f"peak_{kind}_memory_gb": gb for kind, gb in memory.sample().items()}}
        if rank == 0 and (step % s.log_every == 0 or step == s.steps):
            sink.log({**metrics, "lr": w.scheduler.get_last_lr()[0], "grad_norm": out.grad_norm,
                      "tokens_per_second": tokens / elapsed if elapsed else 0.0,
                      "data_wait_fraction": w.load_seconds / (elapsed + w.load_seconds), **w.sampler.stats(),
                      **({"train/stream_position": w.stream.position} if w.stream is not None else {})}, step)
        if progress is not None:
            progress.step(step, out.loss, tokens / elapsed if elapsed else 0.0)
        if step % s.checkpoint_every == 0 or step == s.steps:
            _checkpoint(ctx.get_experiment_name(), step, w, rank, metrics, final=step == s.steps,
                        zero3=w.engine is not None and s.zero_stage == 3)
    memory.stop()


class _Progress:
    """One line a person can follow, at most every `every` seconds (and at the last step): step n/total, loss,
    tokens/s, elapsed and time left at the rate so far. Logged by rank 0, relayed to the driver's console."""

    def __init__(self, run: str, first: int, total: int, every: float = 15.0) -> None:
        self.run, self.first, self.total, self.every = run, first, total, every
        self.t0 = self.last = time.perf_counter()

    def step(self, step: int, loss: float, tokens_per_s: float) -> None:
        now = time.perf_counter()
        if now - self.last < self.every and step != self.total:
            return
        self.last = now
        done = step - self.first
        left = (now - self.t0) / done * (self.total - step) if done else float("nan")
        # (a logger, not print: sad_ray.console relays our loggers' records to the driver)
        log.info("train %s: step %d/%d  loss %.3f  %.0f tok/s  %s elapsed, ~%s left", self.run, step, self.total, loss,
                 tokens_per_s, clock(now - self.t0), clock(left))


def _checkpoint(run: str, step: int, w: _Worker, rank: int, metrics: dict[str, float], final: bool,
                zero3: bool) -> None:
    import ray.train

    with _staging(run, rank) as d:
        _save(d, step, w, rank, metrics)
        if final and rank == 0:
            _save_hf(d / HF_SUBDIR, w, {**metrics, "precision": w.precision})
        elif final and zero3:
            _save_hf(None, w, metrics)  # every rank joins the gather
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))


@contextmanager
def _staging(run: str, rank: int) -> Iterator[Path]:
    """The local folder a rank writes a checkpoint in before Ray Train persists it: one fixed name per run and
    rank, emptied before each use and removed after, so a worker killed mid-save (out of memory, a lost node)
    leaves at most one behind, which the resumed run reuses, instead of a new temp folder each time."""
    d = Path(tempfile.gettempdir()) / f"sad-ray-ckpt-{run}-rank{rank}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _rng_state() -> dict[str, Any]:
    import random

    import torch

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _save(d: Path, step: int, w: _Worker, rank: int, metrics: dict[str, float]) -> None:
    import torch

    if w.stream is not None:  # the buffer by record id, and how far into the shard it was filled
        sampler_state = {"buffer": w.sampler.state_dict(), "position": w.stream.position}
    else:  # the curriculum by record id: restoring checks that this rank holds the same records in the same order
        sampler_state = {"step": w.sampler.step, "order_ids": [w.ids[i] for i in w.sampler.order],
                         "running_loss": dict(zip(w.ids, w.sampler.running_loss.tolist(), strict=True))}
    torch.save({"sampler": sampler_state, "rng": _rng_state()}, d / f"worker-{rank}.pt")
    if w.engine is not None:
        w.engine.save_checkpoint(str(d / "deepspeed"), tag="state")  # collective: every rank writes its part
    elif rank == 0:
        torch.save({"model": w.module.state_dict(), "optimizer": w.optimizer.state_dict(),
                    "scheduler": w.scheduler.state_dict(),
                    "scaler": w.scaler.state_dict() if w.scaler is not None else None}, d / "state.pt")
    if rank == 0:
        (d / "progress.json").write_text(json.dumps({"step": step, **metrics}))


def _restore(d: Path, w: _Worker, rank: int) -> int:
    import random

    import torch

    step = json.loads((d / "progress.json").read_text())["step"]
    own = d / f"worker-{rank}.pt"
    if not own.is_file():
        raise TrainSetupError(f"checkpoint {d} has no state for worker {rank}: it was made by fewer workers")
    saved = torch.load(own, weights_only=False)
    if w.stream is not None:
        _restore_buffer(d, w, rank, saved["sampler"])
    else:
        _restore_sampler(d, w, rank, step, saved["sampler"])
    if w.engine is not None:
        w.engine.load_checkpoint(str(d / "deepspeed"), tag="state")
    else:
        state = torch.load(d / "state.pt", weights_only=False)
        w.module.load_state_dict(state["model"])
        w.optimizer.load_state_dict(state["optimizer"])
        w.scheduler.load_state_dict(state["scheduler"])
        if w.scaler is not None and state.get("scaler") is not None:
            w.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(saved["rng"]["torch"])
    np.random.set_state(saved["rng"]["numpy"])
    random.setstate(saved["rng"]["python"])
    return step


def _restore_buffer(d: Path, w: _Worker, rank: int, saved: dict[str, Any]) -> None:
    """The buffer as checkpointed: its slots' records read back from the shard, the stream where it was."""
    if "buffer" not in saved:
        raise TrainSetupError(f"checkpoint {d} was made without a record buffer (train.buffer_records 0)")
    state = saved["buffer"]
    w.sampler.load_state_dict(state)
    wanted = {rid for rid in state["ids"] if rid is not None}
    found = w.stream.skip_to(int(saved["position"]), wanted)
    if len(found) != len(wanted):
        raise TrainSetupError(f"checkpoint {d} was made on other data: {len(wanted) - len(found)} of worker {rank}'s "
                              f"buffered records are not in its shard")
    w.records = [found[rid] if rid is not None else None for rid in state["ids"]]


def _restore_sampler(d: Path, w: _Worker, rank: int, step: int, saved: dict[str, Any]) -> None:
    if "order_ids" not in saved:
        raise TrainSetupError(f"checkpoint {d} was made with a record buffer (train.buffer_records > 0)")
    order_ids = saved["order_ids"]
    index = {rid: i for i, rid in enumerate(w.ids)}
    if len(order_ids) != len(w.ids) or any(rid not in index for rid in order_ids):
        raise TrainSetupError(
            f"checkpoint {d} was made on other data: worker {rank}'s curriculum held {len(order_ids)} records, "
            f"this shard holds {len(w.ids)} ({sum(rid not in index for rid in order_ids)} of the saved ones missing)")
    # load_state_dict compares the saved curriculum order with the one built now from the same records.
    losses = saved["running_loss"]
    w.sampler.load_state_dict({"step": step, "order": np.array([index[rid] for rid in order_ids]),
                               "running_loss": np.array([losses[rid] for rid in w.ids], dtype=np.float64)})


def _save_hf(target: Path | None, w: _Worker, metrics) -> None:
    """The trained student as a Hugging Face directory."""
    state = None
    if w.engine is not None and w.engine.zero_optimization_stage() == 3:
        state = w.engine._zero3_consolidated_16bit_state_dict()  # gathers on every rank, returns on rank 0
    if target is None:
        return
    if state is not None:  # keys of the SupervisedHead wrapper: "lm.<name>"
        state = {k.removeprefix("lm."): v for k, v in state.items()}
    w.module.lm.save_pretrained(target, state_dict=state)
    w.tokenizer.save_pretrained(target)
    (target / "sad_ray_train.json").write_text(json.dumps(metrics, indent=2))


# ------------------------------------------------------------------------------------------------- driver side


@dataclass(frozen=True)
class TrainResult:
    student_dir: str
    steps: int
    loss: float
    loss_cot: float
    loss_act: float
    tokens: int
    seconds: float
    data_wait_seconds: float
    checkpoint: str
    peak_memory_gb: float = 0.0  # rank 0's peak resident memory (since its last restart)
    # Its two kinds, each sampled (step.MemoryWatch): its own pages, and the object store's it has read.
    peak_own_memory_gb: float = 0.0
    peak_shared_memory_gb: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


# Settings that change how a run goes but not what it computes: toggling one resumes the same run (e.g. turning on
# gradient checkpointing after an out-of-memory kill).
NOT_IN_RESULT = ("max_failures", "keep_checkpoints", "log_every", "checkpoint_every", "threads",
                 "gradient_checkpointing", "cpus_per_worker", "resources_per_worker", "placement_strategy",
                 "bad_shards")


def result_settings(settings: TrainConfig) -> dict[str, Any]:
    out = {k: v for k, v in asdict(settings).items() if k not in NOT_IN_RESULT}
    if not settings.buffer_records:  # the whole shard in memory, as before the buffer existed: same identities
        del out["buffer_records"]
    return out


def run_identity(summary: DataSummary, student_dir, settings: TrainConfig, loss_cfg, curriculum_cfg,
                 precision: str = "auto") -> str:
    """What makes two trainings the same run: the teacher (id, from the records), the start model (by content:
    config, tokenizer and weights, wherever it lies), the data (record ids), and every setting that changes the
    result."""
    from sad_ray.models.identity import model_fingerprint

    kept = result_settings(settings)
    key = {"teacher": summary.teacher, "student": model_fingerprint(student_dir), "data": summary.ids_digest,
           "settings": kept, "loss": asdict(loss_cfg), "curriculum": asdict(curriculum_cfg), "precision": precision}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def drop_unregistered_checkpoints(run_dir: Path | str) -> list[str]:
    """Checkpoint folders of a run that Ray Train never registered: a copy cut short (the disk filled, the driver or
    its node died mid-upload). Ray Train restores only the checkpoints its snapshot names, so these are never read,
    but they hold the space the next checkpoint needs; a rerun removes them before it starts and names each.
    Registered checkpoints are left as they are. Without a snapshot that reads as expected nothing is removed."""
    folders = [d for d in storage.list_dirs(run_dir) if storage.name(d).startswith("checkpoint_")]
    snapshot = storage.join(run_dir, CHECKPOINT_SNAPSHOT)
    if not folders or not storage.is_file(snapshot):
        return []
    try:
        state = json.loads(storage.read_bytes(snapshot))
        registered = {r["checkpoint_dir_name"] for r in state["checkpoint_results"]}
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("train: %s is not the checkpoint snapshot this Ray writes (%r); no checkpoint folder removed",
                    snapshot, exc)
        return []
    dropped = [str(d) for d in folders if storage.name(d) not in registered]
    for d in dropped:
        log.warning("train: removing %s, a checkpoint Ray Train never registered (its write was cut short)", d)
        storage.remove_dir(d)
    return dropped


def _deterministic_shards():
    """Ray Data's split with blocks in file order and no node locality, so a worker gets the same records on every
    (re)start: its checkpointed curriculum is restored onto the same shard, which `_restore` checks by record id."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options, enable_shard_locality=False)


def _check_resources(s: TrainConfig) -> None:
    import ray

    from sad_ray.console import started_local_cluster

    have = ray.cluster_resources()
    # Ray Data's read tasks need a little CPU beside the workers (STACK.md: 2 workers x 1 CPU + a reader hang).
    need = {"CPU": s.num_workers * s.cpus_per_worker + 0.25, "GPU": s.num_workers if s.use_gpu else 0,
            **{k: v * s.num_workers for k, v in s.resources_per_worker.items()}}
    short = {k: v for k, v in need.items() if v > have.get(k, 0)}
    if not short:
        return
    what = ", ".join(f"{k} {v:g} (the cluster has {have.get(k, 0):g})" for k, v in short.items())
    if started_local_cluster():  # nothing will join this one: the run would wait forever
        raise TrainSetupError(
            f"train.num_workers ({s.num_workers}) workers need {what}: lower train.cpus_per_worker (fractions are "
            f"fine; reading records needs 0.25 CPU beside the workers), train.num_workers or "
            f"train.resources_per_worker")
    log.warning("train: %d workers need %s; waiting for the cluster's autoscaler to add nodes", s.num_workers, what)


def train_on_records(
    records_dir: str | Path | Sequence[str | Path],
    student_dir: str | Path,
    out_dir: str | Path,
    settings: TrainConfig,
    loss_cfg: LossConfig,
    curriculum_cfg: CurriculumConfig,
    *,
    run_name: str = "train",
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    trust_remote_code: bool = False,
    teacher: str | None = None,
    final_dir: str | Path | None = None,
    precision: str = "auto",
) -> TrainResult:
    """Train the model at `student_dir` on the records (a student on a teacher's records, or the bootstrapped teacher
    on one-hot demonstration records); the trained model lands in `final_dir` (default `out_dir/student`),
    checkpoints in `out_dir/ray_train/<run_name>-<run identity>`.

    `records_dir` is one records folder or several (on-policy rounds train on a round's records plus a sample of the
    teacher's). Each of them, `student_dir`, `out_dir` and `final_dir` is a local path or a URI (sad_ray.storage):
    workers read the records through Ray Data and stage the start model on their node; Ray Train persists the
    checkpoints to the URI and restores from it on whatever node a restarted worker lands.

    `teacher` is the teacher id the records must carry (records of another teacher are refused, naming the file).
    A run is identified by its teacher, start model (weights), data (record ids) and settings (`run_identity`):
    rerunning it resumes from its last checkpoint, or returns at once when it finished; a changed one is a new run.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from sad_ray.console import init_ray, relay

    out_dir = storage.absolute(out_dir)
    final = storage.absolute(final_dir) if final_dir is not None else storage.join(out_dir, "student")
    done_marker = storage.join(final, "sad_ray_train.json")
    student_dir = storage.absolute(student_dir)  # what the workers stage on their nodes
    start = storage.stage(student_dir)  # this node's copy, checked and fingerprinted here
    summary = scan_records(records_dir, settings.split, teacher, settings.bad_shards)
    vocab = check_model(start, summary.fingerprint, trust_remote_code)
    run_id = run_identity(summary, start, settings, loss_cfg, curriculum_cfg, precision)
    if storage.is_file(done_marker):
        saved = json.loads(storage.read_bytes(done_marker))
        if saved.get("run") == run_id:
            log.info("train: %s already holds the student of this run (%s)", final, run_id)
            return TrainResult(**saved["result"])
        log.info("train: data or settings changed since %s was trained; training run %s", final, run_id)
    per_worker = summary.records // settings.num_workers
    if per_worker < settings.batch_size * settings.grad_accum:
        raise TrainSetupError(
            f"{summary.records} {settings.split} records over {settings.num_workers} workers is {per_worker} each, "
            f"fewer than train.batch_size x train.grad_accum ({settings.batch_size * settings.grad_accum})")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    if settings.strategy == "deepspeed" and not settings.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path("~/.cache/sad-ray/torch_extensions").expanduser()))
    init_ray()
    _check_resources(settings)
    ray.data.DataContext.get_current().enable_progress_bars = False

    # Each worker keeps the rows of `settings.split` from its own shard (see _load_shard).
    fs = storage.resolve(summary.shards[0])[0] if storage.is_remote(summary.shards[0]) else None
    # The columns every schema version has (the trainer needs no more): folders that mix versions read as one.
    dataset = ray.data.read_parquet([storage.resolve(p)[1] for p in summary.shards] if fs else list(summary.shards),
                                    filesystem=fs, num_cpus=0.25, columns=COMMON_COLUMNS)
    ray_train_root, ray_train_run = storage.join(out_dir, "ray_train"), f"{run_name}-{run_id}"
    drop_unregistered_checkpoints(storage.join(ray_train_root, ray_train_run))
    with relay() as console:  # the workers' log lines, shown on this console
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "settings": settings, "loss": loss_cfg, "curriculum": curriculum_cfg, "bounds": summary.bounds,
                "student_dir": str(student_dir), "vocab_size": vocab,
                "tracking_uri": _absolute_tracking_uri(tracking_uri) if tracking_uri else None,
                "run_id": mlflow_run_id, "precision": precision, "relay": console,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=settings.num_workers, use_gpu=settings.use_gpu,
                # With GPUs Ray Train adds {"GPU": 1}; the CPUs are still asked for (data loading, the tokenizer).
                resources_per_worker={"CPU": settings.cpus_per_worker, **settings.resources_per_worker},
                placement_strategy=settings.placement_strategy,
            ),
            run_config=ray.train.RunConfig(
                name=ray_train_run, storage_path=str(ray_train_root),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings.keep_checkpoints),
                failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
                worker_runtime_env={"env_vars": {k: os.environ[k] for k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR")
                                                 if k in os.environ}},
            ),
            datasets={"train": dataset},
            dataset_config=_deterministic_shards(),
        )
        result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as d:
        progress = json.loads((Path(d) / "progress.json").read_text())
        hf = Path(d) / HF_SUBDIR
        if not hf.is_dir():
            raise RuntimeError(f"the final checkpoint {result.checkpoint.path} has no {HF_SUBDIR}/ model")
        if isinstance(final, Path):
            tmp = final.parent / f".{final.name}.tmp"
            final.parent.mkdir(parents=True, exist_ok=True)
        else:  # assembled here, uploaded below
            tmp = Path(tempfile.mkdtemp(prefix="sad-ray-student-")) / "student"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(hf, tmp)
    res = TrainResult(student_dir=str(final), steps=int(progress["step"]), loss=float(progress["loss"]),
                      loss_cot=float(progress["loss_cot"]), loss_act=float(progress["loss_act"]),
                      tokens=int(progress["tokens"]), seconds=float(progress["seconds"]),
                      data_wait_seconds=float(progress["data_wait_seconds"]), checkpoint=str(result.checkpoint.path),
                      peak_memory_gb=float(progress.get("peak_memory_gb", 0.0)),
                      peak_own_memory_gb=float(progress.get("peak_own_memory_gb", 0.0)),
                      peak_shared_memory_gb=float(progress.get("peak_shared_memory_gb", 0.0)))
    (tmp / "sad_ray_train.json").write_text(json.dumps({"result": asdict(res), "run": run_id,
                                                        "teacher": summary.teacher,
                                                        "settings": asdict(settings)}, indent=2))
    if isinstance(final, Path):
        replace_dir(tmp, final)
    else:
        # The marker goes last: a crash mid-upload leaves a student folder without it, which a rerun redoes.
        marker = tmp / "sad_ray_train.json"
        done = marker.read_bytes()
        marker.unlink()
        storage.upload_dir(tmp, final)
        storage.write_bytes(done_marker, done)
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return res
