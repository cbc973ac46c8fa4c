"""Teacher engines: what the rollout stage asks of a teacher, behind one small interface.

This module holds the plain-transformers engine; the vLLM engine (the default on real runs) joins it here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from sad_ray.method.losses import teacher_topk

log = logging.getLogger(__name__)

TopK = tuple[np.ndarray, np.ndarray, np.ndarray]  # ids [N, K] int32, logprobs [N, K] float32, tail [N] float32


class TeacherEngine(Protocol):
    model_id: str

    def score(self, sequences: Sequence[np.ndarray], supervised: Sequence[np.ndarray], k: int) -> list[TopK]:
        """For each sequence, the teacher's top-k distribution at every supervised position (docs/design.md)."""
        ...


class HFTeacherEngine:
    """Scores sequences with a plain transformers forward pass (fp32 by default: exact on CPU)."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32", trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForCausalLM

        self.model_id = str(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        ).eval()

    @torch.inference_mode()
    def score(self, sequences: Sequence[np.ndarray], supervised: Sequence[np.ndarray], k: int) -> list[TopK]:
        out: list[TopK] = []
        for ids, sup in zip(sequences, supervised, strict=True):
            ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]  # [1, T]
            logits = self.model(input_ids=ids_t).logits[0, :-1].float()  # [T-1, V]: row t-1 predicts token t
            rows = torch.as_tensor(np.asarray(sup, dtype=bool)[1:])
            top_ids, top_lp, tail = teacher_topk(logits[rows], k)
            out.append((top_ids.to(torch.int32).numpy(), top_lp.float().numpy(), tail.float().numpy()))
        return out
