"""Models: the offline starter teacher, students cut from a teacher's layers, tokenizer compatibility."""

from sad_ray.models.starter import (
    STARTER_NAME,
    ChecksumMismatchError,
    provision_starter,
    resolve_model,
)
from sad_ray.models.student import StudentInfo, build_student, select_layers
from sad_ray.models.tokenizers import TokenizerMismatchError, check_compatible, tokenizer_fingerprint

__all__ = [
    "STARTER_NAME",
    "ChecksumMismatchError",
    "StudentInfo",
    "TokenizerMismatchError",
    "build_student",
    "check_compatible",
    "provision_starter",
    "resolve_model",
    "select_layers",
    "tokenizer_fingerprint",
]
