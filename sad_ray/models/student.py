"""Build a smaller student from any Hugging Face causal LM by keeping an evenly spaced subset of its layers.

The student starts from the teacher's own weights (embeddings, kept decoder layers, final norm, head), which
distils far faster than a random initialisation.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from sad_ray.atomic import replace_dir

log = logging.getLogger(__name__)

STUDENT_INFO_NAME = "sad_ray_student.json"

# Where the decoder layers live in the common architectures; anything else is found by a generic search.
_KNOWN_LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers",
                      "transformer.layers", "model.language_model.layers")


@dataclass(frozen=True)
class StudentInfo:
    path: Path
    kept_layers: tuple[int, ...]
    teacher_params: int
    student_params: int


def select_layers(n_total: int, n_keep: int) -> list[int]:
    """Indices of `n_keep` evenly spaced layers out of `n_total`, sorted and unique.

    With `n_keep >= 2` the first and last layers are always kept (the first reads the embeddings, the last
    feeds the head). With `n_keep == 1` the result is `[0]`: the one layer that still sees inputs shaped like
    the teacher's.
    """
    if n_total < 1:
        raise ValueError(f"n_total must be >= 1, got {n_total}")
    if not 1 <= n_keep <= n_total:
        raise ValueError(f"n_keep must be between 1 and n_total={n_total}, got {n_keep}")
    if n_keep == 1:
        return [0]
    span, steps = n_total - 1, n_keep - 1
    # round(i * span / steps) in integers (half up), so no float can make two indices collide.
    return [(i * span + steps // 2) // steps for i in range(n_keep)]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters; `parameters()` yields a tied embedding/head matrix once."""
    return sum(p.numel() for p in model.parameters())


def find_decoder_layers(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """The dotted path and the `nn.ModuleList` holding the model's decoder layers."""
    n_layers = model.config.get_text_config().num_hidden_layers
    for path in _KNOWN_LAYER_PATHS:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return path, module
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if len(found) == 1:
        return found[0]
    names = ", ".join(name for name, _ in found) or "none"
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: expected one nn.ModuleList "
                     f"of {n_layers} layers, found {names}")


def build_student(teacher_dir: Path, out_dir: Path, num_layers: int,
                  trust_remote_code: bool = False) -> StudentInfo:
    """Save a `num_layers`-layer copy of the teacher (weights, tokenizer, generation config) to `out_dir`.

    Its STUDENT_INFO_NAME file records the teacher's id (`identity.teacher_id`: name and weights fingerprint) and
    the recipe (`student_recipe`), so a caller can tell whether the student is still the one it would build.
    """
    from sad_ray.models.identity import teacher_id

    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    if out_dir.resolve() == teacher_dir.resolve():
        raise ValueError(f"out_dir {out_dir} is the teacher directory")
    _check_replaceable(out_dir)  # before the expensive part
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype="auto", trust_remote_code=trust_remote_code)
    teacher_params = count_parameters(model)
    n_total = model.config.get_text_config().num_hidden_layers
    kept = select_layers(n_total, num_layers)
    _keep_layers(model, kept)
    student_params = count_parameters(model)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir, trust_remote_code=trust_remote_code)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        staged = tmp / "student"  # mkdtemp's own dir is 0700; this one gets the usual permissions
        model.save_pretrained(staged)  # also writes the teacher's generation_config.json
        tokenizer.save_pretrained(staged)
        info = {"teacher": str(teacher_dir.resolve()), "teacher_id": teacher_id(teacher_dir),
                "recipe": student_recipe(num_layers), "teacher_num_layers": n_total, "kept_layers": kept,
                "teacher_params": teacher_params, "student_params": student_params}
        (staged / STUDENT_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        for path in staged.glob("*.safetensors"):
            path.chmod(0o644)  # safetensors writes 0600; Ray workers of other users may read the student
        _replace_dir(staged, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("student with layers %s of %d (%.1fM of %.1fM parameters) saved to %s",
             kept, n_total, student_params / 1e6, teacher_params / 1e6, out_dir)
    return StudentInfo(out_dir, tuple(kept), teacher_params, student_params)


def student_recipe(num_layers: int) -> dict[str, int]:
    """What build_student makes a student from, besides the teacher: stored in, and compared with, its info file."""
    return {"student_layers": int(num_layers)}


def read_student_info(student_dir: Path) -> dict | None:
    """The STUDENT_INFO_NAME file of a student build_student made, or None when there is none (or it is torn)."""
    try:
        return json.loads((Path(student_dir) / STUDENT_INFO_NAME).read_text())
    except (OSError, ValueError):
        return None


def _keep_layers(model: PreTrainedModel, kept: list[int]) -> None:
    """Cut the model down to the `kept` decoder layers in place and make its config agree."""
    path, layers = find_decoder_layers(model)
    n_total = len(layers)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, nn.ModuleList([layers[i] for i in kept]))
    # The KV cache is indexed by layer_idx and sized from the config: stale indices run out of range.
    for new_idx, layer in enumerate(getattr(parent, attr)):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    config = model.config.get_text_config()  # the model's own config unless it is multimodal
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    for key, value in config.to_diff_dict().items():
        if key != "layer_types" and isinstance(value, list) and len(value) == n_total:
            log.warning("config.%s has one entry per teacher layer and was not subset; check it", key)


def _check_replaceable(target: Path) -> None:
    """Only an empty directory or an earlier student may be replaced: never a user's files."""
    if target.exists() and not (target.is_dir() and (target / STUDENT_INFO_NAME).is_file()):
        if not target.is_dir() or any(target.iterdir()):
            raise FileExistsError(f"{target} exists and is not a sad-ray student; refusing to replace it")


def _replace_dir(new: Path, target: Path) -> None:
    _check_replaceable(target)
    replace_dir(new, target)
