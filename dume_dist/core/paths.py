"""Checks on where a command will write, made before any work (torch-free: the CLI imports it)."""

from __future__ import annotations

import os
from pathlib import Path


def check_creatable(path: str | Path, flag: str) -> None:
    """The nearest existing parent of ``path`` is a directory this process can write in;
    otherwise a one-line ValueError naming ``flag``."""
    parent = Path(path).absolute().parent
    while not (parent.exists() or parent.is_symlink()):
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write in {parent}")
