"""Student training on Ray Train: records through Ray Data, the SAD loss, the curriculum, checkpoints, MLflow.

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
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from sad_ray.atomic import replace_dir
from sad_ray.method.curriculum import CurriculumConfig
from sad_ray.method.losses import LossConfig
from sad_ray.records import shard_paths

log = logging.getLogger(__name__)

HF_SUBDIR = "hf"


class TrainSetupError(ValueError):
    """A training run that cannot start: names the setting or file and what was expected."""


@dataclass(frozen=True)
class TrainerSettings:
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
    bf16: bool = True  # autocast where the hardware has it
    # Recompute each decoder layer's activations in backward instead of keeping them: activation memory falls from
    # O(layers x batch x tokens) to about one layer's worth, for more compute. Same gradients, same run.
    gradient_checkpointing: bool = False
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    max_failures: int = 2
    log_every: int = 1
    split: Literal["train", "val", "test"] = "train"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "num_workers", "checkpoint_every", "keep_checkpoints",
                     "log_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.max_failures < 0 or self.grad_clip <= 0:
            raise ValueError("lr and grad_clip must be > 0, warmup_steps and max_failures >= 0")
        if not self.use_gpu and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0 without GPUs, got {self.cpus_per_worker}")


@dataclass(frozen=True)
class DataSummary:
    records: int
    fingerprint: str
    bounds: tuple[list[float], list[float]]  # per-feature min and max of the complexity features
    ids_digest: str  # sha256 over the sorted record ids: which data this is


def scan_records(records_dir: str | Path, split: str = "train") -> DataSummary:
    """Validate every record (streamed shard by shard, nothing kept) and summarise the split to train on.

    Runs on the driver before any worker starts, so a bad dataset stops the run at once with a RecordError-style
    message naming the record, the field and the file.
    """
    from sad_ray.records import RecordError, iter_records

    records_dir = Path(records_dir)
    if not records_dir.exists():
        raise TrainSetupError(f"records directory {records_dir} does not exist")
    if not shard_paths(records_dir):
        raise TrainSetupError(f"records directory {records_dir} holds no record shards (part-*.parquet)")
    feats: list[tuple[int, int, float]] = []
    ids: list[str] = []
    fingerprints: set[str] = set()
    other = 0
    try:
        for r in iter_records(records_dir):
            if r.split != split:
                other += 1
                continue
            feats.append((r.reasoning_length, r.action_length, r.teacher_entropy))
            ids.append(r.id)
            fingerprints.add(r.tokenizer_fingerprint)
    except RecordError as exc:
        raise TrainSetupError(f"invalid training data: {exc}") from None
    except (OSError, ValueError) as exc:  # an unreadable or foreign Parquet file
        raise TrainSetupError(f"records directory {records_dir} cannot be read: {exc}") from None
    if not feats:
        raise TrainSetupError(f"records directory {records_dir} holds no records of split {split!r} "
                              f"({other} records in other splits)")
    if len(fingerprints) != 1:
        raise TrainSetupError(f"records in {records_dir} were tokenized by {len(fingerprints)} different tokenizers; "
                              "train on one tokenizer's records")
    arr = np.asarray(feats, dtype=np.float64).T
    return DataSummary(records=len(feats), fingerprint=fingerprints.pop(),
                       bounds=(arr.min(axis=1).tolist(), arr.max(axis=1).tolist()),
                       ids_digest=hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest())


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


def lr_factor(step: int, settings: TrainerSettings) -> float:
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


def train_loop(config: dict[str, Any]) -> None:
    """The per-worker loop (Ray Train calls it on every worker)."""
    import ray.train
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sad_ray.method.curriculum import CurriculumSampler
    from sad_ray.train.local import SupervisedHead, collate, per_example_loss

    s: TrainerSettings = config["settings"]
    loss_cfg: LossConfig = config["loss"]
    cur_cfg: CurriculumConfig = config["curriculum"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed + rank)

    records, load_seconds = _load_shard(s.split)
    local_batch = s.batch_size * s.grad_accum
    if len(records) < local_batch:
        raise TrainSetupError(f"worker {rank} got {len(records)} records, fewer than batch_size x grad_accum "
                              f"({local_batch}); lower train.batch_size or train.num_workers")
    ids = [r.id for r in records]
    complexity = normalised_complexity([r.reasoning_length for r in records], [r.action_length for r in records],
                                       [r.teacher_entropy for r in records], config["bounds"], cur_cfg.weights)
    sampler = CurriculumSampler(complexity, replace(cur_cfg, seed=cur_cfg.seed * 1000 + rank), local_batch)

    tokenizer = AutoTokenizer.from_pretrained(config["student_dir"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lm = AutoModelForCausalLM.from_pretrained(config["student_dir"], dtype=torch.float32)
    lm.config.use_cache = False
    if s.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = SupervisedHead(lm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, s))
    engine = None
    if s.strategy == "deepspeed":
        import deepspeed

        ds_config = {
            "train_micro_batch_size_per_gpu": s.batch_size,
            "gradient_accumulation_steps": s.grad_accum,
            "gradient_clipping": s.grad_clip,
            "zero_optimization": {"stage": s.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
            "bf16": {"enabled": bool(s.use_gpu and s.bf16)},
            "steps_per_print": 10**9,
        }
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        module = engine.module  # the SupervisedHead
        train_model = engine
    else:
        train_model = ray.train.torch.prepare_model(model) if world > 1 or s.use_gpu else model
        module = model
    device = next(module.parameters()).device
    train_model.train()

    step = 0
    start_ckpt = ray.train.get_checkpoint()
    if start_ckpt is not None:
        with start_ckpt.as_directory() as d:
            step = _restore(Path(d), module, optimizer, scheduler, sampler, ids, engine, rank)
        log.info("worker %d resumed at step %d", rank, step)

    sink = _MetricsSink(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else _MetricsSink(None, None)
    if start_ckpt is not None and rank == 0:
        sink.log({"train/resumed_from_step": step}, step)
    use_bf16 = s.bf16 and (s.use_gpu or torch.backends.mkldnn.is_available())
    tokens = 0
    t0 = time.perf_counter()
    data_wait = load_seconds  # reading and validating this worker's shard is time spent waiting for data
    if rank == 0 and step == 0:
        sink.log({"train/data_load_seconds": load_seconds, "train/records_on_rank0": len(records)}, 0)
    while step < s.steps:
        t_data = time.perf_counter()
        idx = sampler.next_batch()
        micro = [idx[i : i + s.batch_size] for i in range(0, len(idx), s.batch_size)]
        batches = [collate([records[i] for i in m], pad_id) for m in micro]
        data_wait += time.perf_counter() - t_data
        totals = {"loss": 0.0, "loss_cot": 0.0, "loss_act": 0.0, "n_reason": 0, "n_act": 0}
        per_example = []
        for j, batch in enumerate(batches):
            on_device = {k: v.to(device) for k, v in batch.items()}
            if engine is not None:  # DeepSpeed accumulates (gradient_accumulation_steps) and scales itself
                out = _loss(engine, on_device, loss_cfg, config["vocab_size"], use_bf16, device)
                engine.backward(out.loss)
                engine.step()
            else:
                last = j == len(batches) - 1
                with (train_model.no_sync() if not last and hasattr(train_model, "no_sync") else nullcontext()):
                    out = _loss(train_model, on_device, loss_cfg, config["vocab_size"], use_bf16, device)
                    (out.loss / len(batches)).backward()
            per_example.append(per_example_loss(out, batch))
            for k in ("loss", "loss_cot", "loss_act"):
                totals[k] += float(getattr(out, k).detach()) / len(batches)
            totals["n_reason"] += out.n_reason
            totals["n_act"] += out.n_act
        if engine is not None:
            grad_norm = float(engine.get_global_grad_norm() or 0.0)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(module.parameters(), s.grad_clip))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        sampler.update(idx, np.concatenate(per_example))
        step += 1
        tokens += totals["n_reason"] + totals["n_act"]
        if rank == 0 and (step % s.log_every == 0 or step == s.steps):
            elapsed = time.perf_counter() - t0
            sink.log({"loss": totals["loss"], "loss_cot": totals["loss_cot"], "loss_act": totals["loss_act"],
                      "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens_per_second": tokens * world / elapsed if elapsed else 0.0,
                      "data_wait_fraction": data_wait / (elapsed + load_seconds),
                      "peak_memory_gb": _peak_rss_gb(),
                      **sampler.stats()}, step)
        if step % s.checkpoint_every == 0 or step == s.steps:
            final = step == s.steps
            metrics = {"step": step, "loss": totals["loss"], "loss_cot": totals["loss_cot"],
                       "loss_act": totals["loss_act"], "tokens": tokens,
                       "seconds": time.perf_counter() - t0 + load_seconds, "data_wait_seconds": data_wait,
                       "peak_memory_gb": _peak_rss_gb()}
            with _staging(ctx.get_experiment_name(), rank) as d:
                _save(d, step, module, optimizer, scheduler, sampler, ids, engine, rank, metrics)
                if final and rank == 0:
                    _save_hf(d / HF_SUBDIR, module, engine, tokenizer, metrics)
                elif final and engine is not None and s.zero_stage == 3:
                    _save_hf(None, module, engine, tokenizer, metrics)  # every rank joins the gather
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


def _peak_rss_gb() -> float:
    """This worker process's peak resident memory (activations dominate it: see gradient_checkpointing)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def _loss(model, batch, loss_cfg, vocab_size, use_bf16, device):
    from sad_ray.train.local import forward_loss

    return forward_loss(model, batch, loss_cfg, vocab_size, autocast_device=device.type, bf16=use_bf16)


def _rng_state() -> dict[str, Any]:
    import random

    import torch

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _save(d: Path, step, module, optimizer, scheduler, sampler, ids, engine, rank, metrics) -> None:
    import torch

    sampler_state = {"step": sampler.step, "ids": ids, "running_loss": sampler.running_loss.copy()}
    torch.save({"sampler": sampler_state, "rng": _rng_state()}, d / f"worker-{rank}.pt")
    if engine is not None:
        engine.save_checkpoint(str(d / "deepspeed"), tag="state")  # collective: every rank writes its part
    elif rank == 0:
        torch.save({"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict()}, d / "state.pt")
    if rank == 0:
        (d / "progress.json").write_text(json.dumps({"step": step, **metrics}))


def _restore(d: Path, module, optimizer, scheduler, sampler, ids, engine, rank) -> int:
    import random

    import torch

    step = json.loads((d / "progress.json").read_text())["step"]
    if engine is not None:
        engine.load_checkpoint(str(d / "deepspeed"), tag="state")
    else:
        state = torch.load(d / "state.pt", weights_only=False)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    # The running losses are kept by record id, so a restart whose shards came out differently (another
    # worker count, another block order) still finds each example's history.
    by_id: dict[str, float] = {}
    own = d / f"worker-{rank}.pt"
    for f in sorted(d.glob("worker-*.pt")):
        saved = torch.load(f, weights_only=False)
        for rid, loss in zip(saved["sampler"]["ids"], saved["sampler"]["running_loss"], strict=True):
            if not np.isnan(loss):
                by_id[rid] = float(loss)
        if f == own:
            torch.set_rng_state(saved["rng"]["torch"])
            np.random.set_state(saved["rng"]["numpy"])
            random.setstate(saved["rng"]["python"])
    sampler.load_state_dict({"step": step, "order": sampler.order,
                             "running_loss": np.array([by_id.get(i, np.nan) for i in ids])})
    return step


def _save_hf(target: Path | None, module, engine, tokenizer, metrics) -> None:
    """The trained student as a Hugging Face directory (fp32 weights)."""
    state = None
    if engine is not None and engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # gathers on every rank, returns on rank 0
    if target is None:
        return
    if state is not None:  # keys of the SupervisedHead wrapper: "lm.<name>"
        state = {k.removeprefix("lm."): v for k, v in state.items()}
    module.lm.save_pretrained(target, state_dict=state)
    tokenizer.save_pretrained(target)
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

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


# Settings that change how a run goes but not what it computes: toggling one resumes the same run (e.g. turning on
# gradient checkpointing after an out-of-memory kill).
NOT_IN_RESULT = ("max_failures", "keep_checkpoints", "log_every", "checkpoint_every", "threads",
                 "gradient_checkpointing")


def result_settings(settings: TrainerSettings) -> dict[str, Any]:
    return {k: v for k, v in asdict(settings).items() if k not in NOT_IN_RESULT}


def run_identity(summary: DataSummary, student_dir, settings: TrainerSettings, loss_cfg, curriculum_cfg) -> str:
    """What makes two trainings the same run: data, start model, and every setting that changes the result."""
    kept = result_settings(settings)
    key = {"data": summary.ids_digest, "student": str(Path(student_dir).resolve()), "settings": kept,
           "loss": asdict(loss_cfg), "curriculum": asdict(curriculum_cfg)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _check_resources(s: TrainerSettings) -> None:
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    # Ray Data's read tasks need a little CPU beside the workers (STACK.md: 2 workers x 1 CPU + a reader hang).
    need = s.num_workers * s.cpus_per_worker + 0.25
    if not s.use_gpu and need > cpus:
        raise TrainSetupError(
            f"train.num_workers ({s.num_workers}) x train.cpus_per_worker ({s.cpus_per_worker}) leaves no CPU for "
            f"reading records on this cluster ({cpus:g} CPUs); lower train.cpus_per_worker (fractions are fine)"
        )
    if s.use_gpu and ray.cluster_resources().get("GPU", 0) < s.num_workers:
        raise TrainSetupError(f"train.use_gpu with {s.num_workers} workers, but the cluster has "
                              f"{ray.cluster_resources().get('GPU', 0):g} GPUs")


def train_student(
    records_dir: str | Path,
    student_dir: str | Path,
    out_dir: str | Path,
    settings: TrainerSettings,
    loss_cfg: LossConfig,
    curriculum_cfg: CurriculumConfig,
    *,
    run_name: str = "train",
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
    trust_remote_code: bool = False,
) -> TrainResult:
    """Train the student at `student_dir` on the records; the trained model lands in `out_dir/student`.

    A run is identified by its data (record ids), start model and settings: rerunning it resumes from its last
    checkpoint, or returns at once when it finished; changed data or settings start a new run.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    out_dir = Path(out_dir).expanduser().resolve()
    final = out_dir / "student"
    done_marker = final / "sad_ray_train.json"
    summary = scan_records(records_dir, settings.split)
    vocab = check_model(student_dir, summary.fingerprint, trust_remote_code)
    run_id = run_identity(summary, student_dir, settings, loss_cfg, curriculum_cfg)
    if done_marker.exists():
        saved = json.loads(done_marker.read_text())
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
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=True)
    _check_resources(settings)
    ray.data.DataContext.get_current().enable_progress_bars = False

    # Each worker keeps the rows of `settings.split` from its own shard (see _load_shard).
    dataset = ray.data.read_parquet([str(p) for p in shard_paths(records_dir)], num_cpus=0.25)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "settings": settings, "loss": loss_cfg, "curriculum": curriculum_cfg, "bounds": summary.bounds,
            "student_dir": str(Path(student_dir).resolve()), "vocab_size": vocab,
            "tracking_uri": _absolute_tracking_uri(tracking_uri) if tracking_uri else None,
            "run_id": mlflow_run_id,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.num_workers, use_gpu=settings.use_gpu,
            resources_per_worker={"CPU": settings.cpus_per_worker} if not settings.use_gpu else None,
        ),
        run_config=ray.train.RunConfig(
            name=f"{run_name}-{run_id}", storage_path=str(out_dir / "ray_train"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
            worker_runtime_env={"env_vars": {k: os.environ[k] for k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR")
                                             if k in os.environ}},
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as d:
        progress = json.loads((Path(d) / "progress.json").read_text())
        hf = Path(d) / HF_SUBDIR
        if not hf.is_dir():
            raise RuntimeError(f"the final checkpoint {result.checkpoint.path} has no {HF_SUBDIR}/ model")
        tmp = out_dir / ".student.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(hf, tmp)
    res = TrainResult(student_dir=str(final), steps=int(progress["step"]), loss=float(progress["loss"]),
                      loss_cot=float(progress["loss_cot"]), loss_act=float(progress["loss_act"]),
                      tokens=int(progress["tokens"]), seconds=float(progress["seconds"]),
                      data_wait_seconds=float(progress["data_wait_seconds"]), checkpoint=str(result.checkpoint.path),
                      peak_memory_gb=float(progress.get("peak_memory_gb", 0.0)))
    (tmp / "sad_ray_train.json").write_text(json.dumps({"result": asdict(res), "run": run_id,
                                                        "settings": asdict(settings)}, indent=2))
    replace_dir(tmp, final)
    return res
