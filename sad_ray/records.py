"""The trajectory record: the one schema every stage writes and reads, Parquet shards, validation on read.

A record is one distillation example: the chat, its tokens, the [REASON]/[ACT] masks, the teacher's top-k
distribution at every supervised position (see docs/design.md for the alignment) and the episode's outcome.
Shards are written whole-or-not-at-all (temp file + rename) so a crash never leaves half a shard behind.

Schema v2 dropped v1's `complexity` column (always 0.0: complexity is normalised over a dataset, so the trainer
computes it over its own data from reasoning_length, action_length and teacher_entropy); v1 shards still read,
their complexity column ignored. `teacher_model` is the teacher's id (`sad_ray.models.identity.teacher_id`:
`<folder name>@<fingerprint>`), so records of one teacher are never mistaken for another's (`check_teacher`).

Schema v3 adds who played the chat: `policy` ("teacher": the teacher's own trajectory, off-policy; "student": the
student's, on-policy, scored by the teacher), `round` (the on-policy round that played it, 0 for off-policy records)
and `teacher_turns` (indices into `turns` of the assistant turns the teacher wrote inside a student's episode:
`on_policy.intervene_after`). v1 and v2 shards still read, as the teacher's off-policy records of round 0.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sad_ray import storage

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
# Versions this sad_ray reads: v1 has an extra `complexity` column, which is not read; v1 and v2 lack v3's
# columns, read as their defaults (V3_DEFAULTS).
READABLE_VERSIONS = (1, 2, 3)
POLICIES = ("teacher", "student")
SPLITS = ("train", "val", "test")
# float32 logprobs summed over k + 1 buckets: a looser bound would hide a wrong tail, a tighter one rounding.
MASS_TOLERANCE = 2e-3

SCHEMA = pa.schema(
    [
        ("schema_version", pa.int32()),
        ("id", pa.string()),
        ("env", pa.string()),
        ("task_type", pa.string()),
        ("split", pa.string()),
        ("turns", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("input_ids", pa.list_(pa.int32())),
        ("reason_mask", pa.list_(pa.bool_())),
        ("act_mask", pa.list_(pa.bool_())),
        ("top_k", pa.int32()),
        # [N * top_k] row-major over the N supervised positions; a flat list stores and compresses better.
        ("topk_ids", pa.list_(pa.int32())),
        ("topk_logprobs", pa.list_(pa.float32())),
        ("tail_logprob", pa.list_(pa.float32())),
        ("success", pa.bool_()),
        ("reward", pa.float32()),
        ("steps", pa.int32()),
        ("reasoning_length", pa.int32()),
        ("action_length", pa.int32()),
        ("teacher_entropy", pa.float32()),
        ("teacher_model", pa.string()),
        ("tokenizer_fingerprint", pa.string()),
        ("policy", pa.string()),
        ("round", pa.int32()),
        ("teacher_turns", pa.list_(pa.int32())),
    ],
    metadata={b"sad_ray.schema_version": str(SCHEMA_VERSION).encode()},
)


# The columns v3 added and what a v1 or v2 record reads as: the teacher's own trajectory, off-policy.
V3_DEFAULTS: dict[str, Any] = {"policy": "teacher", "round": 0, "teacher_turns": []}
# The columns every readable version has: what a reader of mixed-version folders asks for.
COMMON_COLUMNS = [name for name in SCHEMA.names if name not in V3_DEFAULTS]


class RecordError(ValueError):
    """A record that breaks the schema's rules; names the record, the field and the file."""

    def __init__(self, record_id: str, field_name: str, message: str, source: str | None = None) -> None:
        self.record_id, self.field, self.source = record_id, field_name, source
        where = f" in {source}" if source else ""
        super().__init__(f"record {record_id!r}{where}: field {field_name!r}: {message}")


@dataclass(frozen=True, eq=False)
class TrajectoryRecord:
    id: str
    env: str
    task_type: str
    split: str
    turns: tuple[dict[str, str], ...]
    input_ids: np.ndarray  # [T] int32
    reason_mask: np.ndarray  # [T] bool
    act_mask: np.ndarray  # [T] bool
    topk_ids: np.ndarray  # [N, K] int32, N = (reason_mask | act_mask).sum()
    topk_logprobs: np.ndarray  # [N, K] float32, sorted descending
    tail_logprob: np.ndarray  # [N] float32, log of the mass outside the top-k
    success: bool
    reward: float
    steps: int
    teacher_entropy: float
    teacher_model: str  # the teacher's id (sad_ray.models.identity.teacher_id), or "expert-demonstrations"
    tokenizer_fingerprint: str
    policy: str = "teacher"  # who played the chat: "teacher" (off-policy) or "student" (on-policy)
    round: int = 0  # the on-policy round that played it; 0 for off-policy records
    teacher_turns: tuple[int, ...] = ()  # indices into `turns` of assistant turns the teacher wrote (interventions)
    schema_version: int = SCHEMA_VERSION
    reasoning_length: int = field(init=False)
    action_length: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reasoning_length", int(np.count_nonzero(self.reason_mask)))
        object.__setattr__(self, "action_length", int(np.count_nonzero(self.act_mask)))

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[1]) if self.topk_ids.ndim == 2 else 0

    @property
    def supervised(self) -> np.ndarray:
        return self.reason_mask | self.act_mask

    def to_row(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "id": self.id,
            "env": self.env,
            "task_type": self.task_type,
            "split": self.split,
            "turns": [{"role": t["role"], "content": t["content"]} for t in self.turns],
            "input_ids": np.asarray(self.input_ids, dtype=np.int32),
            "reason_mask": np.asarray(self.reason_mask, dtype=np.bool_),
            "act_mask": np.asarray(self.act_mask, dtype=np.bool_),
            "top_k": self.top_k,
            "topk_ids": np.asarray(self.topk_ids, dtype=np.int32).reshape(-1),
            "topk_logprobs": np.asarray(self.topk_logprobs, dtype=np.float32).reshape(-1),
            "tail_logprob": np.asarray(self.tail_logprob, dtype=np.float32),
            "success": bool(self.success),
            "reward": float(self.reward),
            "steps": int(self.steps),
            "reasoning_length": self.reasoning_length,
            "action_length": self.action_length,
            "teacher_entropy": float(self.teacher_entropy),
            "teacher_model": self.teacher_model,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "policy": self.policy,
            "round": int(self.round),
            "teacher_turns": [int(i) for i in self.teacher_turns],
        }


def record_from_row(row: dict[str, Any], source: str | None = None) -> TrajectoryRecord:
    """Validate a row (as read from Parquet or handed over by Ray Data) and build its record."""
    validate_row(row, source)
    row = {**V3_DEFAULTS, **{k: v for k, v in row.items() if v is not None or k not in V3_DEFAULTS}}
    k = int(row["top_k"])
    return TrajectoryRecord(
        id=row["id"],
        env=row["env"],
        task_type=row["task_type"],
        split=row["split"],
        turns=tuple({"role": t["role"], "content": t["content"]} for t in row["turns"]),
        input_ids=np.asarray(row["input_ids"], dtype=np.int32),
        reason_mask=np.asarray(row["reason_mask"], dtype=np.bool_),
        act_mask=np.asarray(row["act_mask"], dtype=np.bool_),
        topk_ids=np.asarray(row["topk_ids"], dtype=np.int32).reshape(-1, k),
        topk_logprobs=np.asarray(row["topk_logprobs"], dtype=np.float32).reshape(-1, k),
        tail_logprob=np.asarray(row["tail_logprob"], dtype=np.float32),
        success=bool(row["success"]),
        reward=float(row["reward"]),
        steps=int(row["steps"]),
        teacher_entropy=float(row["teacher_entropy"]),
        teacher_model=row["teacher_model"],
        tokenizer_fingerprint=row["tokenizer_fingerprint"],
        policy=row["policy"],
        round=int(row["round"]),
        teacher_turns=tuple(int(i) for i in row["teacher_turns"]),
        # A v1 or v2 row holds every field but v3's, read as their defaults: in memory it is a v3 record.
        schema_version=SCHEMA_VERSION,
    )


def validate_row(row: dict[str, Any], source: str | None = None) -> None:
    """Raise RecordError naming the record and the first field that breaks the schema's rules."""
    rid = str(row.get("id") or "<no id>")

    def fail(name: str, message: str) -> None:
        raise RecordError(rid, name, message, source)

    missing = [name for name in SCHEMA.names if name not in row and name not in V3_DEFAULTS]
    if missing:
        fail(missing[0], "is missing")
    if row["schema_version"] not in READABLE_VERSIONS:
        fail("schema_version", f"is {row['schema_version']}, this sad_ray reads versions {READABLE_VERSIONS}")
    for name in ("id", "env", "task_type", "teacher_model", "tokenizer_fingerprint"):
        if not isinstance(row[name], str) or not row[name]:
            fail(name, "must be a non-empty string")
    if row["split"] not in SPLITS:
        fail("split", f"must be one of {', '.join(SPLITS)}, got {row['split']!r}")
    turns = row["turns"]
    if turns is None or len(turns) == 0:
        fail("turns", "must hold at least one chat turn")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            fail("turns", f"turn {i} must have string 'role' and 'content'")

    ids = np.asarray(row["input_ids"])
    reason = np.asarray(row["reason_mask"])
    act = np.asarray(row["act_mask"])
    if ids.ndim != 1 or ids.size == 0:
        fail("input_ids", "must be a non-empty list of token ids")
    if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0:
        fail("input_ids", "must hold non-negative integers")
    for name, mask in (("reason_mask", reason), ("act_mask", act)):
        if mask.shape != ids.shape:
            fail(name, f"has length {mask.size}, input_ids has {ids.size}")
        if mask.dtype != np.bool_:
            fail(name, f"must be booleans, got {mask.dtype}")
    if np.any(reason & act):
        fail("act_mask", f"overlaps reason_mask at position {int(np.flatnonzero(reason & act)[0])}")
    supervised = reason | act
    if supervised[0]:
        fail("reason_mask" if reason[0] else "act_mask", "position 0 cannot be supervised (nothing predicts it)")
    n = int(supervised.sum())
    if n == 0:
        fail("reason_mask", "no token is supervised (both masks are empty)")
    if row["reasoning_length"] != int(reason.sum()):
        fail("reasoning_length", f"is {row['reasoning_length']}, reason_mask holds {int(reason.sum())}")
    if row["action_length"] != int(act.sum()):
        fail("action_length", f"is {row['action_length']}, act_mask holds {int(act.sum())}")

    k = row["top_k"]
    if not isinstance(k, (int, np.integer)) or k < 1:
        fail("top_k", f"must be a positive integer, got {k!r}")
    topk_ids = np.asarray(row["topk_ids"])
    topk_lp = np.asarray(row["topk_logprobs"], dtype=np.float64)
    tail = np.asarray(row["tail_logprob"], dtype=np.float64)
    if topk_ids.size != n * k:
        fail("topk_ids", f"has {topk_ids.size} values, expected {n} supervised positions x top_k {k}")
    if topk_lp.size != n * k:
        fail("topk_logprobs", f"has {topk_lp.size} values, expected {n} supervised positions x top_k {k}")
    if tail.shape != (n,):
        fail("tail_logprob", f"has {tail.size} values, expected one per supervised position ({n})")
    topk_ids = topk_ids.reshape(n, k)
    topk_lp = topk_lp.reshape(n, k)
    if topk_ids.min() < 0:
        fail("topk_ids", "must hold non-negative token ids")
    if k > 1 and np.any(np.diff(np.sort(topk_ids, axis=1), axis=1) == 0):
        fail("topk_ids", f"repeats a token id at position {int(np.flatnonzero(np.any(np.diff(np.sort(topk_ids, axis=1), axis=1) == 0, axis=1))[0])}")
    if not np.isfinite(topk_lp).all():
        fail("topk_logprobs", "must be finite")
    if topk_lp.max() > MASS_TOLERANCE:
        fail("topk_logprobs", f"must be log-probabilities (<= 0), max is {topk_lp.max():.4g}")
    if k > 1 and np.any(np.diff(topk_lp, axis=1) > 1e-6):
        bad = int(np.flatnonzero(np.any(np.diff(topk_lp, axis=1) > 1e-6, axis=1))[0])
        fail("topk_logprobs", f"must be sorted in descending order (position {bad} is not)")
    if np.isnan(tail).any() or np.isposinf(tail).any() or tail.max() > MASS_TOLERANCE:
        fail("tail_logprob", "must be a log-probability (<= 0) or -inf")
    # The k + 1 buckets must hold all the mass: the tail is what the top-k leaves.
    mass = np.exp(topk_lp).sum(axis=1) + np.exp(tail)
    worst = int(np.argmax(np.abs(mass - 1.0)))
    if abs(mass[worst] - 1.0) > MASS_TOLERANCE:
        fail("tail_logprob", f"top-k plus tail hold {mass[worst]:.5f} of the mass at supervised position {worst}, not 1")

    for name in ("reward", "teacher_entropy"):
        if not isinstance(row[name], (int, float, np.floating)) or not math.isfinite(row[name]):
            fail(name, f"must be a finite number, got {row[name]!r}")
    if row["teacher_entropy"] < 0:
        fail("teacher_entropy", f"must be >= 0, got {row['teacher_entropy']}")
    if not isinstance(row["steps"], (int, np.integer)) or row["steps"] < 0:
        fail("steps", f"must be a non-negative integer, got {row['steps']!r}")
    if not isinstance(row["success"], (bool, np.bool_)):
        fail("success", f"must be true or false, got {row['success']!r}")
    # v3's columns: absent (or null) in v1 and v2 rows, which read as the teacher's round-0 records.
    policy, rnd = row.get("policy"), row.get("round")
    if policy is not None and policy not in POLICIES:
        fail("policy", f"must be one of {', '.join(POLICIES)}, got {policy!r}")
    if rnd is not None and (not isinstance(rnd, (int, np.integer)) or rnd < 0):
        fail("round", f"must be a non-negative integer, got {rnd!r}")
    if (policy or "teacher") == "teacher" and rnd:
        fail("round", f"is {rnd} on a record the teacher played; rounds number the student's on-policy play")
    written = row.get("teacher_turns")
    if written is not None and len(written):
        roles = [t["role"] for t in turns]
        for i in written:
            if not isinstance(i, (int, np.integer)) or not 0 <= i < len(roles) or roles[i] != "assistant":
                fail("teacher_turns", f"must index assistant turns of the {len(roles)} turns, got {i!r}")
        if (policy or "teacher") != "student":
            fail("teacher_turns", "marks teacher-written turns of a student's episode; this record's policy is "
                                  f"{policy or 'teacher'!r}")


# ----------------------------------------------------------------------------------------------------------- io


def write_shard(records: Sequence[TrajectoryRecord], path: str | Path) -> Path | str:
    """Validate and write one Parquet shard atomically (a local path or a URI, sad_ray.storage)."""
    path = storage.local_path(path) or str(path)
    rows = [r.to_row() for r in records]
    for row in rows:
        validate_row(row, str(path))
    return _write_rows(rows, path)


def _write_rows(rows: list[dict[str, Any]], path: Path | str) -> Path | str:
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    with storage.writing(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


class ShardWriter:
    """Buffers records and writes `part-NNNNN.parquet` shards as they fill, whole episodes to a shard.

    A shard is cut only where an episode ends (the windows of one episode, `<episode>#w<n>`, arrive one after
    another), so a crash loses whole episodes and a rerun that skips by episode never leaves one half-written;
    a shard may hold up to one episode's windows more than `records_per_shard`. Shard numbers continue after the
    shards already in the folder, so a rerun adds to earlier output instead of overwriting it.

    Episodes that finish without any record (a failed episode that is not kept, every window too long) are
    appended to the folder's ledger (`drop`), so a rerun skips them too: `finished_episodes(folder)`.

    The folder is a local path or a URI (sad_ray.storage): each shard appears whole or not at all either way.
    """

    def __init__(self, folder: str | Path, records_per_shard: int = 256) -> None:
        if records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
        self.folder = storage.local_path(folder) or str(folder)
        storage.make_dirs(self.folder)
        self.records_per_shard = records_per_shard
        self._buffer: list[dict[str, Any]] = []  # rows, validated as they were added
        self._episode: str | None = None  # the episode of the last buffered record
        self._next = 1 + max((int(storage.name(p)[len("part-"):-len(".parquet")]) for p in shard_paths(self.folder)),
                             default=-1)
        self.written: list[Path | str] = []

    def add(self, record: TrajectoryRecord) -> None:
        row = record.to_row()
        validate_row(row)  # fail at the producer, not in a reader days later
        episode = episode_id(record.id)
        if len(self._buffer) >= self.records_per_shard and episode != self._episode:
            self.flush()
        self._buffer.append(row)
        self._episode = episode

    def drop(self, episode: str, reason: str, **info: Any) -> None:
        """Note an episode that finished without records (appended and flushed at once: nothing to lose)."""
        line = json.dumps({"episode": episode, "reason": reason, **info}, default=str)
        ledger = storage.join(self.folder, DROPPED_LEDGER)
        if isinstance(ledger, Path):
            with open(ledger, "a") as f:
                f.write(line + "\n")
        else:  # an object store appends by rewriting the (small) object whole
            old = storage.read_bytes(ledger) if storage.is_file(ledger) else b""
            storage.write_bytes(ledger, old + (line + "\n").encode())

    def flush(self) -> None:
        if not self._buffer:
            return
        path = storage.join(self.folder, f"part-{self._next:05d}.parquet")
        _write_rows(self._buffer, path)
        self.written.append(path)
        self._next += 1
        self._buffer = []

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        # On an exception keep what is buffered too: every buffered record was already validated, and the
        # buffer ends with whole episodes unless the exception came between two windows of one.
        self.close()


# ------------------------------------------------------------------------------- episodes, windows and the ledger

# Episodes that finished without a record, one JSON object a line ({"episode", "reason", ...}), beside the shards.
DROPPED_LEDGER = "dropped-episodes.jsonl"


def window_id(episode: str, n: int) -> str:
    """The record id of an episode's n-th context window."""
    return f"{episode}#w{n}"


def episode_id(record_id: str) -> str:
    """The episode a record came from (a window's record id carries a `#w<n>` suffix)."""
    return record_id.split("#w", 1)[0]


def dropped_episodes(folder: str | Path) -> dict[str, str]:
    """The folder's ledger: episode id -> why it wrote no record. A torn last line (a crash mid-write) is
    ignored; any other unreadable line is an error naming the file and line."""
    path = storage.join(folder, DROPPED_LEDGER)
    if not storage.is_file(path):
        return {}
    text = storage.read_bytes(path).decode()
    lines = text.splitlines()
    out: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            out[str(entry["episode"])] = str(entry["reason"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            if n == len(lines) and not text.endswith("\n"):
                log.warning("%s:%d: ignoring a torn last line (a run stopped while writing it)", path, n)
                break
            raise ValueError(f"{path}:{n}: expected a JSON object with 'episode' and 'reason': {exc}") from exc
    return out


def finished_episodes(folder: str | Path, redo: Iterable[str] = ()) -> set[str]:
    """Episodes a rerun can skip: those with records in `folder` and those in its ledger, except ledger entries
    whose reason is in `redo` (a reason the current settings no longer drop for)."""
    redo = set(redo)
    done = {episode_id(i) for i in existing_ids(folder)}
    done.update(e for e, reason in dropped_episodes(folder).items() if reason not in redo)
    return done


def shard_paths(path: str | Path) -> list[Path] | list[str]:
    """The shard files of a folder (sorted), or the single file given; URIs for a remote folder."""
    if storage.is_remote(path):
        if storage.is_file(path):
            return [str(path)]
        if not storage.is_dir(path):
            raise FileNotFoundError(f"no trajectory records at {path}")
        return storage.list_files(path, "part-", ".parquet")
    path = storage.local_path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no trajectory records at {path}")
    return sorted(p for p in path.glob("part-*.parquet") if p.is_file())


def read_shard_table(path: str | Path) -> pa.Table:
    """A shard's table after checking its schema version and columns (not yet its records)."""
    fs, where = storage.resolve(path)
    try:
        schema = pq.read_schema(where, filesystem=fs)
    except (OSError, pa.ArrowInvalid) as exc:
        raise RecordError("<file>", "<parquet>", f"is not a readable Parquet file: {exc}", str(path)) from exc
    version = (schema.metadata or {}).get(b"sad_ray.schema_version")
    if version is None:
        raise RecordError("<file>", "schema_version", "the file carries no sad_ray schema version", str(path))
    if int(version) not in READABLE_VERSIONS:
        raise RecordError(
            "<file>", "schema_version", f"file is version {int(version)}, this sad_ray reads {READABLE_VERSIONS}",
            str(path))
    missing = [name for name in SCHEMA.names if name not in schema.names
               and (name not in V3_DEFAULTS or int(version) >= 3)]
    if missing:
        raise RecordError("<file>", missing[0], "column is missing", str(path))
    # a v1 file's complexity column is left out; a v1/v2 file's rows lack v3's columns (record_from_row fills them)
    return _read_columns(path, [name for name in SCHEMA.names if name in schema.names])


def _read_columns(shard: str | Path, columns: list[str]) -> pa.Table:
    fs, where = storage.resolve(shard)
    return pq.read_table(where, columns=columns, filesystem=fs)


def iter_records(
    path: str | Path, on_error: Literal["raise", "skip"] = "raise", problems: list[RecordError] | None = None
) -> Iterator[TrajectoryRecord]:
    """Every record under `path`, validated. With on_error="skip", bad records are left out and collected."""
    for shard in shard_paths(path):
        for row in read_shard_table(shard).to_pylist():
            try:
                yield record_from_row(row, str(shard))
            except RecordError as exc:
                if on_error == "raise":
                    raise
                log.warning("skipping bad record: %s", exc)
                if problems is not None:
                    problems.append(exc)


def read_records(path: str | Path, on_error: Literal["raise", "skip"] = "raise") -> list[TrajectoryRecord]:
    return list(iter_records(path, on_error))


def existing_ids(path: str | Path) -> set[str]:
    """Ids already written under `path` (reads only the id column)."""
    if not storage.exists(path):
        return set()
    return {i for shard in shard_paths(path) for i in _read_columns(shard, ["id"])["id"].to_pylist()}


class TeacherMismatchError(ValueError):
    """Records made by another teacher than the one this run distils from; names the file."""


def teacher_mismatch(shard: str | Path, found: str, expected: str) -> str:
    """The message for a shard whose records another teacher made."""
    return (f"records in {shard} were made by teacher {found}; this run's teacher is {expected}. Records of "
            "different teachers do not mix: the distill job keeps each teacher's records in its own folder "
            "(output_dir/teacher-<name>-<fingerprint>/records); move this file out or point the run at its teacher")


def shard_teachers(path: str | Path) -> dict[Path, set[str]]:
    """The teacher ids in each shard under `path` (reads only the teacher_model column); {} if there is none."""
    if not storage.exists(path):
        return {}
    return {shard: set(_read_columns(shard, ["teacher_model"])["teacher_model"].to_pylist())
            for shard in shard_paths(path)}


def check_teacher(path: str | Path, teacher: str) -> None:
    """Raise TeacherMismatchError naming the first shard under `path` that holds records of another teacher."""
    for shard, found in shard_teachers(path).items():
        other = sorted(found - {teacher})
        if other:
            raise TeacherMismatchError(teacher_mismatch(shard, other[0], teacher))


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> None:
    """A human-readable sample of records (for MLflow artifacts)."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)) + "\n")
