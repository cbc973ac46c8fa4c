"""Files and directories that readers never see half done (written beside the target, renamed into place)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing_file(path: Path) -> Iterator[Path]:
    """Yields a hidden temp path beside `path` to write; on success it replaces `path` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
