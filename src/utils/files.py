"""Writing files so that a reader never sees a half-written one."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it onto ``path`` on success, delete it on failure."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(new: Path, final: Path) -> None:
    """Rename the finished directory ``new`` to ``final``. A ``final`` already there is moved aside first,
    put back if the rename fails, and deleted only once the new one is in place: ``final`` is always
    one complete directory or the other."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old"
        if old.exists():  # left by an earlier replacement that was killed
            shutil.rmtree(old)
        os.replace(final, old)
    try:
        os.replace(new, final)
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old)
