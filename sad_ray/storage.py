"""Where a run's files live: a local folder, or a URI on any filesystem pyarrow reaches (`s3://`, `gs://`, `hdfs://`,
and fsspec's through pyarrow).

A location is a plain path, a `file://` URI (a local path: on a cluster, a shared folder mounted at the same path on
every node) or a remote URI. Shards and the ledger are read and written through the filesystem; a file appears
whole or not at all (local: written beside it and renamed; object stores: one upload, which they publish whole).
Whatever needs a local directory (a model for an engine or a train worker) is *staged*: copied once per node into
`$SAD_RAY_STAGING_DIR` (default `~/.cache/sad-ray/staged`), and copied again only when the source changed.

Credentials and endpoints come from the filesystem's own settings, e.g. `AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`
for an S3-compatible server; on a cluster every node needs them (docs/scaling.md).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from sad_ray.atomic import replace_dir, replacing_file

Location = str | os.PathLike
MANIFEST = ".sad_ray_staged.json"


def local_path(where: Location) -> Path | None:
    """The local path of a plain path or `file://` URI; None for a remote URI."""
    text = os.fspath(where)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if "://" in text:
        return None
    return Path(text).expanduser()


def is_remote(where: Location) -> bool:
    return local_path(where) is None


def resolve(where: Location) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it)."""
    local = local_path(where)
    if local is not None:
        return pafs.LocalFileSystem(), str(local.resolve())
    try:
        return pafs.FileSystem.from_uri(os.fspath(where))
    except (pafs.ArrowInvalid, OSError, ValueError) as exc:  # type: ignore[attr-defined]
        raise ValueError(f"{where}: not a path or a URI pyarrow can open: {exc}") from None


def join(where: Location, *parts: str) -> Path | str:
    """`where / part / ...`: a Path for a local location, a URI string for a remote one."""
    local = local_path(where)
    if local is not None:
        return local.joinpath(*parts)
    return "/".join([os.fspath(where).rstrip("/"), *parts])


def absolute(where: Location) -> Path | str:
    """A local location as an absolute Path, a remote one as its URI (without a trailing slash)."""
    local = local_path(where)
    return local.resolve() if local is not None else os.fspath(where).rstrip("/")


def name(where: Location) -> str:
    return os.fspath(where).rstrip("/").rsplit("/", 1)[-1]


def _info(where: Location) -> pafs.FileInfo:
    fs, path = resolve(where)
    return fs.get_file_info(path)


def exists(where: Location) -> bool:
    """A file or folder is there (on an object store, a prefix with objects under it counts as a folder)."""
    return _info(where).type != pafs.FileType.NotFound or (is_remote(where) and is_dir(where))


def is_file(where: Location) -> bool:
    return _info(where).type == pafs.FileType.File


def is_dir(where: Location) -> bool:
    """A folder (on an object store: a prefix with objects under it)."""
    local = local_path(where)
    if local is not None:
        return local.is_dir()
    fs, path = resolve(where)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        return True
    return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False)))


def list_files(where: Location, prefix: str = "", suffix: str = "") -> list[Path] | list[str]:
    """The files directly in a folder whose names start with `prefix` and end with `suffix`, sorted by name;
    Paths for a local folder, URIs for a remote one."""
    local = local_path(where)
    if local is not None:
        return sorted(p for p in local.glob(f"{prefix}*{suffix}") if p.is_file())
    fs, path = resolve(where)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    names = sorted(i.base_name for i in infos
                   if i.type == pafs.FileType.File and i.base_name.startswith(prefix) and i.base_name.endswith(suffix))
    return [join(where, n) for n in names]  # type: ignore[misc]


def read_bytes(where: Location) -> bytes:
    local = local_path(where)
    if local is not None:
        return local.read_bytes()
    fs, path = resolve(where)
    with fs.open_input_stream(path) as f:
        return f.read()


@contextmanager
def writing(where: Location) -> Iterator[Path]:
    """Yields a local temp path to write the file at `where` to; on success the file appears there whole (a local
    rename, or one upload), and on failure nothing appears."""
    local = local_path(where)
    if local is not None:
        with replacing_file(local) as tmp:
            yield tmp
        return
    fd, tmp_name = tempfile.mkstemp(prefix=".sad-ray-upload-")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        fs, path = resolve(where)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with open(tmp, "rb") as src, fs.open_output_stream(path) as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(where: Location, data: bytes) -> None:
    with writing(where) as tmp:
        tmp.write_bytes(data)


def make_dirs(where: Location) -> None:
    local = local_path(where)
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
    else:
        fs, path = resolve(where)
        fs.create_dir(path, recursive=True)


def remove_dir(where: Location) -> None:
    """A folder and everything in it (on an object store, every object under the prefix); nothing if absent."""
    local = local_path(where)
    if local is not None:
        shutil.rmtree(local, ignore_errors=True)
        return
    fs, path = resolve(where)
    if fs.get_file_info(path).type != pafs.FileType.NotFound or is_dir(where):
        fs.delete_dir(path)


def upload_dir(local: Path, where: Location) -> None:
    """Copy a local folder's files to `where` (a folder; a local one is replaced whole in one rename)."""
    dest = local_path(where)
    if dest is not None:
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(local, tmp)
        replace_dir(tmp, dest)
        return
    fs, path = resolve(where)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def staging_root() -> Path:
    return Path(os.environ.get("SAD_RAY_STAGING_DIR", "~/.cache/sad-ray/staged")).expanduser()


def _listing(fs: pafs.FileSystem, path: str) -> dict[str, list]:
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    return {i.path[len(path):].lstrip("/"): [i.size, i.mtime_ns]
            for i in infos if i.type == pafs.FileType.File}


def stage(where: Location) -> Path:
    """A local directory with the folder's files: the folder itself when it is local, else this node's copy
    (`<staging root>/<hash of the URI>/<folder name>`, so the folder keeps its name), refreshed when the source's
    listing (names, sizes, modification times; object stores keep the times to the second) changed. Stagers of one
    URI on one node take turns (a file lock), so none replaces a copy another is loading from."""
    local = local_path(where)
    if local is not None:
        return local
    fs, path = resolve(where)
    listing = _listing(fs, path)
    if not listing:
        raise FileNotFoundError(f"{where}: no files to stage (is the URI right, and are credentials set?)")
    home = staging_root() / hashlib.sha256(os.fspath(where).encode()).hexdigest()[:16]
    target = home / name(where)
    manifest = target / MANIFEST
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        if manifest.is_file() and json.loads(manifest.read_text()) == listing:
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name(where)}.tmp-", dir=home))
        try:
            pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            (tmp / MANIFEST).write_text(json.dumps(listing))
            replace_dir(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextmanager
def working_copy(where: Location) -> Iterator[Path]:
    """A local folder to read and write the folder at `where` through: the folder itself when it is local; for a
    remote one, this node's copy of what is there now (empty when nothing is), uploaded back file by file when
    the block ends without an error (files written in it replace theirs; nothing is deleted remotely). An error
    leaves the remote folder as it was. For folders a job writes small files into (an evaluation's tables and
    stored results), not for models, which are staged (`stage`) and uploaded whole (`upload_dir`)."""
    local = local_path(where)
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
        yield local
        return
    home = staging_root() / "work" / hashlib.sha256(os.fspath(where).encode()).hexdigest()[:16]
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        target = home / name(where)
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        fs, path = resolve(where)
        if _listing(fs, path):
            pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield target
        upload_dir(target, where)


def list_dirs(where: Location) -> list[Path] | list[str]:
    """The folders directly in a folder (none when it does not exist), sorted by name; Paths for a local folder,
    URIs for a remote one (on an object store, the prefixes with objects under them)."""
    local = local_path(where)
    if local is not None:
        return sorted(p for p in local.glob("*") if p.is_dir()) if local.is_dir() else []
    fs, path = resolve(where)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return [join(where, n) for n in sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)]  # type: ignore[misc]
