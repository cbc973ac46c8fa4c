"""Directory replacement that readers never see half done (a temp dir renamed into place)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(new: Path, target: Path) -> None:
    """Put the finished directory `new` at `target`, replacing what is there."""
    # rename() cannot replace a non-empty directory: move the old one aside first, delete it afterwards.
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.tmp-old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
