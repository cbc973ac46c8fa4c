"""Shared fixtures: the real starter model, provisioned once per machine into the sad-ray cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def cache_dir() -> Path:
    return Path(os.environ.get("SAD_RAY_CACHE", "~/.cache/sad-ray")).expanduser()


@pytest.fixture(scope="session")
def starter_dir() -> Path:
    from sad_ray.models.starter import provision_starter

    return provision_starter(cache_dir())


@pytest.fixture(scope="session")
def starter_tokenizer(starter_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(starter_dir)
