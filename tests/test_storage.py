"""Storage by URI (sad_ray.storage) against a real S3-compatible server on loopback: shards, the ledger and a rerun's
numbering through the URI, a failed write that publishes nothing, and node-local staging of a model folder."""

from __future__ import annotations

import time
import uuid

import pytest

from sad_ray import storage
from sad_ray.records import (
    ShardWriter,
    existing_ids,
    finished_episodes,
    read_records,
    shard_paths,
    shard_teachers,
    write_shard,
)
from tests.test_records import make_record


@pytest.fixture
def root(s3_server) -> str:
    return f"{s3_server}/{uuid.uuid4().hex[:8]}"


def test_shards_and_the_ledger_live_under_a_uri_and_a_rerun_continues_after_them(root):
    folder = f"{root}/records"
    with ShardWriter(folder, 2) as writer:
        for i in range(4):
            writer.add(make_record(f"e{i}", seed=i))
        writer.drop("lost-1", "failed_episode", env="alfworld")
    assert [storage.name(p) for p in shard_paths(folder)] == ["part-00000.parquet", "part-00001.parquet"]
    assert all(isinstance(p, str) and p.startswith("s3://") for p in shard_paths(folder))
    with ShardWriter(folder, 2) as writer:  # a rerun adds after the shards there, and to the ledger
        writer.add(make_record("e4", seed=4))
        writer.drop("lost-2", "too_long")
    assert storage.name(shard_paths(folder)[-1]) == "part-00002.parquet"
    assert [r.id for r in read_records(folder)] == [f"e{i}" for i in range(5)]
    assert existing_ids(folder) == {f"e{i}" for i in range(5)}
    assert finished_episodes(folder) == {f"e{i}" for i in range(5)} | {"lost-1", "lost-2"}
    assert finished_episodes(folder, redo=["too_long"]) == {f"e{i}" for i in range(5)} | {"lost-1"}
    assert set(shard_teachers(folder)) == set(shard_paths(folder))
    assert not storage.exists(f"{root}/elsewhere") and shard_teachers(f"{root}/elsewhere") == {}
    with pytest.raises(FileNotFoundError, match="no trajectory records at s3://"):
        shard_paths(f"{root}/elsewhere")


def test_a_failed_write_publishes_nothing(root):
    path = f"{root}/records/part-00000.parquet"
    with pytest.raises(RuntimeError, match="mid-write"), storage.writing(path) as tmp:
        tmp.write_bytes(b"half a shard")
        raise RuntimeError("mid-write")
    assert not storage.exists(path)
    write_shard([make_record("a")], path)
    assert [r.id for r in read_records(path)] == ["a"]


def test_a_folder_is_staged_once_per_node_and_again_when_it_changes(root, tmp_path, monkeypatch):
    monkeypatch.setenv("SAD_RAY_STAGING_DIR", str(tmp_path / "staged"))
    src = tmp_path / "teacher-x"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "w.bin").write_bytes(b"\0" * 1000)
    uri = f"{root}/models/teacher-x"
    storage.upload_dir(src, uri)
    staged = storage.stage(uri)
    assert staged.name == "teacher-x" and staged.is_relative_to(tmp_path / "staged")  # keeps its folder name
    assert (staged / "config.json").read_text() == '{"a": 1}' and (staged / "sub" / "w.bin").stat().st_size == 1000
    first = (staged / "config.json").stat().st_mtime_ns
    time.sleep(0.01)
    assert storage.stage(uri) == staged and (staged / "config.json").stat().st_mtime_ns == first  # not copied again
    storage.write_bytes(f"{uri}/config.json", b'{"a": 22}')  # object stores keep mtimes to the second: size differs
    assert (storage.stage(uri) / "config.json").read_text() == '{"a": 22}'
    assert storage.stage(src) == src  # a local folder is used where it is
    with pytest.raises(FileNotFoundError, match="no files to stage"):
        storage.stage(f"{root}/models/missing")


def test_plain_paths_and_file_uris_are_local(tmp_path):
    assert storage.local_path(f"file://{tmp_path}") == tmp_path
    assert storage.local_path(tmp_path) == tmp_path and not storage.is_remote(tmp_path)
    assert storage.join(f"file://{tmp_path}", "a", "b") == tmp_path / "a" / "b"
    assert storage.join("s3://bucket/run/", "records") == "s3://bucket/run/records"
    with ShardWriter(f"file://{tmp_path}/records", 1) as writer:
        writer.add(make_record("a"))
    assert shard_paths(tmp_path / "records") == [tmp_path / "records" / "part-00000.parquet"]


def test_a_model_given_by_uri_resolves_to_this_nodes_copy(root, tmp_path, monkeypatch):
    from sad_ray.models.starter import resolve_model

    monkeypatch.setenv("SAD_RAY_STAGING_DIR", str(tmp_path / "staged"))
    src = tmp_path / "student-a"
    src.mkdir()
    (src / "config.json").write_text("{}")
    storage.upload_dir(src, f"{root}/students/student-a")
    path = resolve_model(f"{root}/students/student-a", tmp_path / "cache")
    assert path.name == "student-a" and (path / "config.json").is_file()
    with pytest.raises(FileNotFoundError, match="no files to stage"):
        resolve_model(f"{root}/students/nobody", tmp_path / "cache")


def test_a_working_copy_of_a_remote_folder_is_uploaded_back_only_when_the_block_succeeds(root, tmp_path, monkeypatch):
    monkeypatch.setenv("SAD_RAY_STAGING_DIR", str(tmp_path / "staged"))
    folder = f"{root}/eval"
    with storage.working_copy(folder) as local:  # nothing there yet: an empty local folder
        assert local.is_dir() and not any(local.iterdir())
        (local / "agents" / "teacher").mkdir(parents=True)
        (local / "agents" / "teacher" / "key").write_text("k1")
        (local / "table.md").write_text("| a |")
    assert storage.read_bytes(f"{folder}/agents/teacher/key") == b"k1"
    assert [storage.name(p) for p in storage.list_dirs(folder)] == ["agents"]
    with pytest.raises(RuntimeError, match="mid-evaluation"), storage.working_copy(folder) as local:
        assert (local / "table.md").read_text() == "| a |"  # what is there is copied down first
        (local / "table.md").write_text("| torn |")
        raise RuntimeError("mid-evaluation")
    assert storage.read_bytes(f"{folder}/table.md") == b"| a |"  # an error uploads nothing
    assert storage.list_dirs(f"{root}/missing") == []
    with storage.working_copy(tmp_path / "local-eval") as local:  # a local folder is worked on in place
        assert local == tmp_path / "local-eval" and local.is_dir()
    assert storage.list_dirs(tmp_path) == [tmp_path / "local-eval", tmp_path / "staged"]
