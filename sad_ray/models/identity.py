"""What a model is, by content: a fingerprint over its config, tokenizer and weights, and the teacher id built on it.

Paths say where a model is, not what it is: a teacher re-made by `jobs/bootstrap_teacher.py` keeps its folder, and
a copy keeps its weights. Records, student-inits and training runs are keyed by these ids instead. No Ray, no vLLM.

Hashing 260 MB of weights takes about a second, so each file's sha256 is cached in a sidecar file in the model
folder (`.sad_ray_fingerprint.json`), keyed by the file's name, size and mtime_ns; a later call only stats the
files. A folder that cannot be written to is hashed every time. File times are coarse (a few ms), so a file
changed within one tick of the hash could keep its mtime: like git's "racy" entries, a file modified in the last
few seconds is hashed but not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

SIDECAR = ".sad_ray_fingerprint.json"
_FORMAT = 1
_CHUNK = 1 << 20
RACY_SECONDS = 2.0  # files modified more recently than this are not cached

CONFIG_FILES = frozenset({"config.json"})
# Everything that changes how text becomes token ids (and the chat template, which changes the records).
TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja", "chat_template.json",
})
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def fingerprinted_files(model_dir: str | Path) -> list[Path]:
    """The files a fingerprint covers, sorted by name: config.json, tokenizer files, weights (top level)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and (
        p.name in CONFIG_FILES or p.name in TOKENIZER_FILES or p.name.endswith(WEIGHT_SUFFIXES)))
    if not any(p.name in CONFIG_FILES for p in files):
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory: it has no config.json")
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in files):
        raise FileNotFoundError(f"{model_dir} holds no weights (*.safetensors or *.bin)")
    return files


def model_fingerprint(model_dir: str | Path) -> str:
    """sha256 (hex) over the model's config.json, tokenizer files and weight files, by relative name and content.

    The same files in another folder give the same fingerprint; one changed byte gives another.
    """
    model_dir = Path(model_dir)
    files = fingerprinted_files(model_dir)
    cached = _read_sidecar(model_dir)
    fresh: dict[str, list] = {}
    settled_before = time.time_ns() - int(RACY_SECONDS * 1e9)
    digest = hashlib.sha256()
    for path in files:
        st = path.stat()
        entry = cached.get(path.name)
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == [st.st_size, st.st_mtime_ns]:
            sha = entry[2]
        else:
            sha = sha256_file(path)
        if st.st_mtime_ns < settled_before:
            fresh[path.name] = [st.st_size, st.st_mtime_ns, sha]
        digest.update(f"{path.name}\0{sha}\n".encode())
    if fresh and fresh != cached:
        _write_sidecar(model_dir, fresh)
    return digest.hexdigest()


def teacher_id(model_dir: str | Path) -> str:
    """`<folder name>@<first 16 hex of the fingerprint>`: readable, and different whenever the weights are."""
    model_dir = Path(model_dir).expanduser().resolve()
    return f"{model_dir.name}@{model_fingerprint(model_dir)[:16]}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_sidecar(model_dir: Path) -> dict[str, list]:
    try:
        data = json.loads((model_dir / SIDECAR).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _write_sidecar(model_dir: Path, files: dict[str, list]) -> None:
    """Replace the sidecar atomically (several processes may fingerprint one folder); skip if read-only."""
    try:
        fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=f"{SIDECAR}.tmp-")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"format": _FORMAT, "files": files}, f, indent=1, sort_keys=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, model_dir / SIDECAR)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def parameter_count(model_dir: str | Path) -> int:
    """Parameters stored in the model's *.safetensors files, read from their headers (no weights loaded).
    Tied weights are stored once, so they count once."""
    import json
    import struct

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total
