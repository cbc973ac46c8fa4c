"""The trajectory record: Parquet round trip, validation on read, resumable shard writing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sad_ray.records import (
    DROPPED_LEDGER,
    SCHEMA,
    SCHEMA_VERSION,
    RecordError,
    ShardWriter,
    TeacherMismatchError,
    TrajectoryRecord,
    check_teacher,
    dropped_episodes,
    episode_id,
    existing_ids,
    finished_episodes,
    read_records,
    shard_paths,
    validate_row,
    window_id,
    write_shard,
)


def topk_of(logits: np.ndarray, k: int):
    """Top-k ids, sorted logprobs and the log tail mass of each row of logits (float64 reference)."""
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    ids = np.argsort(-lp, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(lp, ids, axis=-1)
    rest = 1.0 - np.exp(top).sum(-1)
    tail = np.where(rest > 0, np.log(np.clip(rest, 1e-300, None)), -np.inf)
    return ids.astype(np.int32), top.astype(np.float32), tail.astype(np.float32)


def make_record(rid="r0", seed=0, length=24, vocab=50, k=5, split="train", teacher="starter") -> TrajectoryRecord:
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 3, size=length)  # 0 none, 1 reason, 2 act
    kind[0] = 0
    kind[1] = 1
    reason, act = kind == 1, kind == 2
    n = int((reason | act).sum())
    ids, lp, tail = topk_of(rng.normal(size=(n, vocab)) * 2, k)
    return TrajectoryRecord(
        id=rid, env="alfworld", task_type="pick_and_place_simple", split=split,
        turns=({"role": "user", "content": "task"}, {"role": "assistant", "content": "Thought: x\nAction: y"}),
        input_ids=rng.integers(0, vocab, size=length).astype(np.int32), reason_mask=reason, act_mask=act,
        topk_ids=ids, topk_logprobs=lp, tail_logprob=tail, success=True, reward=1.0, steps=3,
        teacher_entropy=1.5, teacher_model=teacher, tokenizer_fingerprint="abc",
    )


def test_round_trip_keeps_every_field(tmp_path):
    recs = [make_record(f"r{i}", seed=i) for i in range(5)]
    write_shard(recs, tmp_path / "part-00000.parquet")
    back = read_records(tmp_path)
    assert [r.id for r in back] == [r.id for r in recs]
    for a, b in zip(recs, back, strict=False):
        for name in ("input_ids", "reason_mask", "act_mask", "topk_ids", "topk_logprobs", "tail_logprob"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        assert a.turns == b.turns and a.top_k == b.top_k == 5
        assert (a.reasoning_length, a.action_length) == (b.reasoning_length, b.action_length)
        assert b.reasoning_length == int(b.reason_mask.sum())


@settings(max_examples=25, deadline=None)
@given(length=st.integers(3, 80), vocab=st.integers(8, 64), k=st.integers(1, 8), seed=st.integers(0, 1000))
def test_any_valid_record_survives_parquet(tmp_path_factory, length, vocab, k, seed):
    rec = make_record("x", seed=seed, length=length, vocab=vocab, k=min(k, vocab))
    path = write_shard([rec], tmp_path_factory.mktemp("s") / "part-00000.parquet")
    (back,) = read_records(path)
    np.testing.assert_array_equal(back.topk_logprobs, rec.topk_logprobs)
    assert back.topk_ids.shape == rec.topk_ids.shape


def test_full_vocabulary_topk_has_an_empty_tail(tmp_path):
    rec = make_record(k=50, vocab=50)
    assert np.isneginf(rec.tail_logprob).all() or (rec.tail_logprob < -10).all()
    write_shard([rec], tmp_path / "part-00000.parquet")
    assert read_records(tmp_path)[0].top_k == 50


def broken(mutate) -> dict:
    row = make_record("bad-1").to_row()
    mutate(row)
    return row


@pytest.mark.parametrize(
    "field, mutate",
    [
        ("act_mask", lambda r: r.__setitem__("act_mask", r["act_mask"][:-1])),
        ("act_mask", lambda r: r["act_mask"].__setitem__(1, True)),  # position 1 is reason too: overlap
        ("reason_mask", lambda r: (r["reason_mask"].__setitem__(0, True), r.__setitem__("reasoning_length", r["reasoning_length"] + 1))),
        ("topk_logprobs", lambda r: r["topk_logprobs"].__setitem__(0, np.nan)),
        ("topk_logprobs", lambda r: r.__setitem__("topk_logprobs", r["topk_logprobs"].reshape(-1, 5)[:, ::-1].reshape(-1).copy())),
        ("topk_ids", lambda r: r.__setitem__("topk_ids", r["topk_ids"][:-5])),
        ("topk_ids", lambda r: r["topk_ids"].__setitem__(1, r["topk_ids"][0])),
        ("tail_logprob", lambda r: r.__setitem__("tail_logprob", r["tail_logprob"] + 0.5)),
        ("tail_logprob", lambda r: r.__setitem__("tail_logprob", r["tail_logprob"][:-1])),
        ("reasoning_length", lambda r: r.__setitem__("reasoning_length", 0)),
        ("split", lambda r: r.__setitem__("split", "training")),
        ("schema_version", lambda r: r.__setitem__("schema_version", 99)),
        ("teacher_entropy", lambda r: r.__setitem__("teacher_entropy", float("inf"))),
        ("id", lambda r: r.__setitem__("id", "")),
        ("turns", lambda r: r.__setitem__("turns", [{"role": "user"}])),
        ("tokenizer_fingerprint", lambda r: r.pop("tokenizer_fingerprint")),
        ("policy", lambda r: r.__setitem__("policy", "expert")),
        ("round", lambda r: r.__setitem__("round", 2)),  # the teacher's own play has no round
        ("round", lambda r: (r.__setitem__("policy", "student"), r.__setitem__("round", -1))),
        ("teacher_turns", lambda r: (r.__setitem__("policy", "student"), r.__setitem__("teacher_turns", [0]))),
        ("teacher_turns", lambda r: r.__setitem__("teacher_turns", [1])),  # only a student's episode has them
    ],
)
def test_validation_names_the_record_and_the_field(field, mutate):
    with pytest.raises(RecordError) as err:
        validate_row(broken(mutate), "shard.parquet")
    assert err.value.field == field
    assert "shard.parquet" in str(err.value)
    if field != "id":
        assert err.value.record_id == "bad-1" and "'bad-1'" in str(err.value)


def test_a_bad_record_in_a_file_is_reported_not_used(tmp_path):
    good = [make_record(f"g{i}", seed=i).to_row() for i in range(3)]
    bad = broken(lambda r: r["topk_logprobs"].__setitem__(3, np.inf))
    pq.write_table(pa.Table.from_pylist(good[:2] + [bad] + good[2:], schema=SCHEMA), tmp_path / "part-00000.parquet")
    with pytest.raises(RecordError, match="'bad-1'.*topk_logprobs"):
        read_records(tmp_path)
    from sad_ray.records import iter_records

    problems: list[RecordError] = []
    kept = list(iter_records(tmp_path, on_error="skip", problems=problems))
    assert [r.id for r in kept] == ["g0", "g1", "g2"]
    assert [p.record_id for p in problems] == ["bad-1"]


def test_foreign_and_old_files_are_refused_with_the_file_named(tmp_path):
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "part-00000.parquet")
    with pytest.raises(RecordError, match="part-00000.parquet.*schema version"):
        read_records(tmp_path)
    old = SCHEMA.with_metadata({b"sad_ray.schema_version": b"0"})
    pq.write_table(pa.Table.from_pylist([make_record().to_row()], schema=old), tmp_path / "part-00000.parquet")
    with pytest.raises(RecordError, match="version 0"):
        read_records(tmp_path)
    (tmp_path / "part-00000.parquet").write_text("not parquet")
    with pytest.raises(RecordError, match="not a readable Parquet"):
        read_records(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_records(tmp_path / "nowhere")


# Schema v1 as it was written: v2's columns plus `complexity` (always 0.0) before teacher_model.
V1_SCHEMA = pa.schema(
    [*(f for f in SCHEMA if f.name not in ("teacher_model", "tokenizer_fingerprint")),
     pa.field("complexity", pa.float32()), SCHEMA.field("teacher_model"), SCHEMA.field("tokenizer_fingerprint")],
    metadata={b"sad_ray.schema_version": b"1"},
)


# Schema v2 as it was written: v3 without policy, round and teacher_turns.
V2_SCHEMA = pa.schema([f for f in SCHEMA if f.name not in ("policy", "round", "teacher_turns")],
                      metadata={b"sad_ray.schema_version": b"2"})


def student_record(rid="s0", seed=0, round=1, teacher_turns=(1,)) -> TrajectoryRecord:
    return dataclasses.replace(make_record(rid, seed=seed), policy="student", round=round, teacher_turns=teacher_turns)


def test_v3_says_who_played_and_v1_and_v2_shards_still_read(tmp_path):
    recs = [make_record(f"r{i}", seed=i) for i in range(3)]
    # v3: no complexity, the player's columns, the version in the file's metadata and in every row.
    assert SCHEMA_VERSION == 3 and "complexity" not in SCHEMA.names
    assert {"policy", "round", "teacher_turns"} <= set(SCHEMA.names)
    assert not hasattr(recs[0], "complexity") and "complexity" not in recs[0].to_row()
    write_shard([*recs, student_record()], tmp_path / "v3" / "part-00000.parquet")
    schema = pq.read_schema(tmp_path / "v3" / "part-00000.parquet")
    assert schema.metadata[b"sad_ray.schema_version"] == b"3" and "complexity" not in schema.names
    back = read_records(tmp_path / "v3")
    assert [(r.policy, r.round, r.teacher_turns) for r in back] == [("teacher", 0, ())] * 3 + [("student", 1, (1,))]
    # v1 (complexity 0.0, version 1) and v2 (no player columns), written with their old schemas: read back whole,
    # v1's complexity ignored, both as the teacher's own play of round 0.
    old = {"v1": ([{**r.to_row(), "schema_version": 1, "complexity": 0.0} for r in recs], V1_SCHEMA),
           "v2": ([{**r.to_row(), "schema_version": 2} for r in recs], V2_SCHEMA)}
    for version, (rows, schema) in old.items():
        (tmp_path / version).mkdir()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / version / "part-00000.parquet")
        back = read_records(tmp_path / version)
        assert [r.id for r in back] == [r.id for r in recs]
        for a, b in zip(recs, back, strict=True):
            np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
            assert (a.teacher_entropy, a.teacher_model, a.reasoning_length) == (b.teacher_entropy, b.teacher_model,
                                                                               b.reasoning_length)
            assert (b.policy, b.round, b.teacher_turns) == ("teacher", 0, ())
            assert b.schema_version == 3  # in memory an old record is a v3 record
        assert existing_ids(tmp_path / version) == {r.id for r in recs}
        # A rerun adds v3 shards beside old ones; all read.
        with ShardWriter(tmp_path / version, records_per_shard=2) as w:
            w.add(student_record("r9", seed=9))
        assert sorted(r.id for r in read_records(tmp_path / version)) == ["r0", "r1", "r2", "r9"]


def test_records_of_another_teacher_are_refused_naming_the_file(tmp_path):
    write_shard([make_record("a0", teacher="mine@0123456789abcdef")], tmp_path / "part-00000.parquet")
    write_shard([make_record("b0", teacher="other@fedcba9876543210")], tmp_path / "part-00001.parquet")
    check_teacher(tmp_path / "nowhere", "mine@0123456789abcdef")  # no records yet: nothing to refuse
    with pytest.raises(TeacherMismatchError, match=r"records in \S*part-00001.parquet were made by teacher "
                                                    r"other@fedcba9876543210; this run's teacher is mine@0123"):
        check_teacher(tmp_path, "mine@0123456789abcdef")
    (tmp_path / "part-00001.parquet").unlink()
    check_teacher(tmp_path, "mine@0123456789abcdef")


def test_writer_refuses_invalid_records_and_keeps_what_was_written(tmp_path):
    with pytest.raises(RecordError):
        with ShardWriter(tmp_path, records_per_shard=2) as w:
            for i in range(3):
                w.add(make_record(f"r{i}", seed=i))
            w.add(dataclasses.replace(make_record("r3"), teacher_entropy=float("nan")))
    # The two full shards and the buffered, already validated record are on disk.
    assert [p.name for p in shard_paths(tmp_path)] == ["part-00000.parquet", "part-00001.parquet"]
    assert existing_ids(tmp_path) == {"r0", "r1", "r2"}


def test_rerun_continues_shard_numbers_and_knows_what_is_done(tmp_path):
    with ShardWriter(tmp_path, records_per_shard=2) as w:
        for i in range(3):
            w.add(make_record(f"r{i}", seed=i))
    done = existing_ids(tmp_path)
    with ShardWriter(tmp_path, records_per_shard=2) as w:
        for i in range(5):
            if f"r{i}" not in done:
                w.add(make_record(f"r{i}", seed=i))
    assert [p.name for p in shard_paths(tmp_path)] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert sorted(r.id for r in read_records(tmp_path)) == [f"r{i}" for i in range(5)]
    assert not list(tmp_path.glob(".*tmp*"))


def test_shards_hold_whole_episodes_and_the_ledger_skips_dropped_ones(tmp_path):
    # Three episodes of three windows each, shards of two records: a shard is cut only between episodes, so a
    # crash can never leave an episode half-written for a rerun that skips by episode.
    with ShardWriter(tmp_path, records_per_shard=2) as w:
        for e in range(3):
            for n in range(3):
                w.add(make_record(window_id(f"ep{e}", n), seed=3 * e + n))
        w.drop("ep3", "failed_episode", env="alfworld")
        w.drop("ep4", "too_long")
    for shard in shard_paths(tmp_path):
        episodes = {episode_id(i) for i in existing_ids(shard)}
        assert len(existing_ids(shard)) == 3 * len(episodes)
    assert dropped_episodes(tmp_path) == {"ep3": "failed_episode", "ep4": "too_long"}
    assert finished_episodes(tmp_path) == {"ep0", "ep1", "ep2", "ep3", "ep4"}
    assert finished_episodes(tmp_path, redo=["failed_episode"]) == {"ep0", "ep1", "ep2", "ep4"}
    # A run killed while appending leaves a torn last line: it is ignored, and the episode will be replayed.
    ledger = tmp_path / DROPPED_LEDGER
    ledger.write_text(ledger.read_text() + '{"episode": "ep5", "rea')
    assert set(dropped_episodes(tmp_path)) == {"ep3", "ep4"}
    # Anything else unreadable names the file and the line.
    ledger.write_text('{"episode": "ep3", "reason": "x"}\nnot json\n{"episode": "ep4", "reason": "y"}\n')
    with pytest.raises(ValueError, match=rf"{DROPPED_LEDGER}:2: expected a JSON object"):
        dropped_episodes(tmp_path)


def test_a_full_disk_mid_write_leaves_the_shards_already_written_intact(tmp_path):
    """A file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk) hit while the third
    shard is written: the run fails with the OS error, the two shards before it read back whole, and no partial
    shard or temp file is left for a reader or a rerun to trip on."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import resource, signal, sys
from pathlib import Path
from sad_ray.records import ShardWriter
from tests.test_records import make_record
folder = Path(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
with ShardWriter(folder, 2) as writer:
    for i in range(4):
        writer.add(make_record(f"e{i}", seed=i))
    writer.flush()
    limit = max(p.stat().st_size for p in folder.glob("part-*.parquet")) // 2
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    for i in range(4, 8):
        writer.add(make_record(f"e{i}", seed=i))
"""
    folder = tmp_path / "records"
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode != 0 and "File too large" in done.stderr, done.stderr[-2000:]
    assert sorted(p.name for p in folder.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert [r.id for r in read_records(folder)] == [f"e{i}" for i in range(4)]
    # A rerun continues after them.
    with ShardWriter(folder, 2) as writer:
        for i in range(4, 6):
            writer.add(make_record(f"e{i}", seed=i))
    assert len(read_records(folder)) == 6 and (folder / "part-00002.parquet").is_file()
