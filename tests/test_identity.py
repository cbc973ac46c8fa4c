"""Model identity by content: the fingerprint over config, tokenizer and weights, its cache, and the teacher id."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sad_ray.models.identity import SIDECAR, model_fingerprint, teacher_id


def tiny_model(path: Path, seed: int = 0) -> Path:
    """A folder shaped like a Hugging Face model: config, tokenizer files, weights in two shards."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
    (path / "tokenizer_config.json").write_text("{}")
    rng = np.random.default_rng(seed)
    save_file({"embed": rng.normal(size=(8, 4)).astype(np.float32)}, str(path / "model-00001-of-00002.safetensors"))
    save_file({"head": rng.normal(size=(4, 8)).astype(np.float32)}, str(path / "model-00002-of-00002.safetensors"))
    (path / "README.md").write_text("not part of the model")
    # Files modified in the last seconds are hashed but not cached (racy); these are settled.
    past = time.time_ns() - 60 * 10**9
    for p in path.iterdir():
        os.utime(p, ns=(past, past))
    return path


def flip_a_weight_byte(path: Path) -> None:
    """Change one byte inside a tensor's data (the file's last byte), keeping the file's size."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_fingerprint_follows_the_content_not_the_path(tmp_path):
    a = tiny_model(tmp_path / "a")
    fp = model_fingerprint(a)
    assert len(fp) == 64 and model_fingerprint(a) == fp
    # The same files elsewhere: the same model.
    shutil.copytree(a, tmp_path / "elsewhere", ignore=shutil.ignore_patterns(SIDECAR))
    assert model_fingerprint(tmp_path / "elsewhere") == fp
    # Files that are not config, tokenizer or weights do not count.
    (a / "README.md").write_text("edited")
    (a / "sad_ray_student.json").write_text("{}")
    assert model_fingerprint(a) == fp
    # One weight byte, the config, or the tokenizer: another model.
    flip_a_weight_byte(a / "model-00002-of-00002.safetensors")
    changed = model_fingerprint(a)
    assert changed != fp
    (a / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 3}))
    assert model_fingerprint(a) not in (fp, changed)
    b = tiny_model(tmp_path / "b")
    (b / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    assert model_fingerprint(b) != fp
    # Another shard of weights is another model too.
    c = tiny_model(tmp_path / "c")
    save_file({"extra": np.zeros(2, np.float32)}, str(c / "extra.safetensors"))
    assert model_fingerprint(c) != fp


def test_the_fingerprint_is_cached_by_name_size_and_mtime(tmp_path):
    a = tiny_model(tmp_path / "a")
    fp = model_fingerprint(a)
    cache = json.loads((a / SIDECAR).read_text())
    assert set(cache["files"]) == {"config.json", "tokenizer.json", "tokenizer_config.json",
                                   "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    # Proof that a second call reads the cache and not the files: change a weight byte behind its back, keeping
    # the size and restoring the mtime. The cached fingerprint is returned.
    weights = a / "model-00001-of-00002.safetensors"
    st = weights.stat()
    flip_a_weight_byte(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_fingerprint(a) == fp
    # A file whose mtime moved is hashed again (a normal edit moves it).
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert model_fingerprint(a) != fp
    # A file modified just now is hashed but not cached: its mtime may not yet tell the next change apart.
    flip_a_weight_byte(weights)
    assert model_fingerprint(a) == fp
    assert "model-00001-of-00002.safetensors" not in json.loads((a / SIDECAR).read_text())["files"]
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000))
    # A torn sidecar is ignored and rewritten.
    (a / SIDECAR).write_text("{not json")
    assert model_fingerprint(a) == fp  # the byte is flipped back: the first content again
    assert len(json.loads((a / SIDECAR).read_text())["files"]) == 5


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_model_folder_is_fingerprinted_without_a_cache(tmp_path):
    a = tiny_model(tmp_path / "a")
    fp = model_fingerprint(tmp_path / "a")
    (a / SIDECAR).unlink()
    a.chmod(0o555)
    try:
        assert model_fingerprint(a) == fp and not (a / SIDECAR).exists()
    finally:
        a.chmod(0o755)


def test_teacher_id_is_the_folder_name_and_the_fingerprint(tmp_path):
    a = tiny_model(tmp_path / "react-teacher")
    assert teacher_id(a) == f"react-teacher@{model_fingerprint(a)[:16]}"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model_fingerprint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        model_fingerprint(tmp_path)
