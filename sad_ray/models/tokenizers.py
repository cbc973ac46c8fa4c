"""Tokenizer fingerprints and the teacher/student compatibility check that token-level distillation needs.

The teacher's top-k token ids index the student's logits directly, so both must map every token to the same
id; embedding matrices padded past the tokenizer (Qwen2.5 style) are fine and are cut to the tokenizer length.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_SHOWN_DIFFERENCES = 5


class TokenizerMismatchError(ValueError):
    """Teacher and student tokenizers (or a model and its own tokenizer) disagree on the vocabulary."""


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 over the vocabulary (token -> id, added tokens included) and the special tokens.

    Merges and normalisation are left out on purpose: the fingerprint says whether two tokenizers' ids mean
    the same tokens, which is what aligning logits needs.
    """
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special_tokens": _special_tokens(tokenizer),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def check_compatible(teacher_dir: Path, student_dir: Path, trust_remote_code: bool = False) -> int:
    """Return the vocabulary size to use for logits (the tokenizer length), or raise TokenizerMismatchError."""
    teacher_dir, student_dir = Path(teacher_dir), Path(student_dir)
    teacher_tok = AutoTokenizer.from_pretrained(teacher_dir, trust_remote_code=trust_remote_code)
    student_tok = AutoTokenizer.from_pretrained(student_dir, trust_remote_code=trust_remote_code)
    teacher_vocab, student_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if teacher_vocab != student_vocab:
        raise TokenizerMismatchError(
            f"tokenizers differ between teacher {teacher_dir} ({len(teacher_vocab)} tokens) and student "
            f"{student_dir} ({len(student_vocab)} tokens); first differences by id: "
            f"{_describe_differences(teacher_vocab, student_vocab)}")
    if _special_tokens(teacher_tok) != _special_tokens(student_tok):
        # Same ids, so logits still line up; only generation (where to stop) could differ.
        log.warning("teacher %s and student %s share a vocabulary but not their special tokens: %s vs %s",
                    teacher_dir, student_dir, _special_tokens(teacher_tok), _special_tokens(student_tok))
    n_vocab = len(teacher_tok)
    for model_dir in (teacher_dir, student_dir):
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        rows = _embedding_rows(config)
        if rows < n_vocab:
            raise TokenizerMismatchError(
                f"{model_dir}: config.vocab_size is {rows} but its tokenizer has {n_vocab} tokens; "
                f"ids {rows}..{n_vocab - 1} would have no embedding row")
        if rows > n_vocab:
            log.info("%s pads its vocabulary to %d rows; logits are cut to the %d tokenizer ids",
                     model_dir, rows, n_vocab)
    return n_vocab


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, object]:
    return {"map": tokenizer.special_tokens_map,
            "all": sorted(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids, strict=True))}


def _embedding_rows(config: PretrainedConfig) -> int:
    # Multimodal configs keep the language model's vocabulary in a text sub-config.
    return int(config.get_text_config().vocab_size)


def _describe_differences(teacher_vocab: dict[str, int], student_vocab: dict[str, int]) -> str:
    teacher_by_id = {i: t for t, i in teacher_vocab.items()}
    student_by_id = {i: t for t, i in student_vocab.items()}
    differing = sorted(i for i in teacher_by_id.keys() | student_by_id.keys()
                       if teacher_by_id.get(i) != student_by_id.get(i))
    shown = [f"id {i}: teacher {teacher_by_id.get(i)!r}, student {student_by_id.get(i)!r}"
             for i in differing[:_SHOWN_DIFFERENCES]]
    more = f" (and {len(differing) - len(shown)} more)" if len(differing) > len(shown) else ""
    return "; ".join(shown) + more
