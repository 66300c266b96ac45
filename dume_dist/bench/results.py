"""Where every benchmark's results go: the JSON as measured, and a Markdown table beside it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from dume_dist.core.paths import check_creatable


def markdown_path(json_path: str | Path) -> Path:
    """The Markdown table's path: ``json_path`` with the suffix ``.md``."""
    return Path(json_path).with_suffix(".md")


def check_results_path(json_path: str | Path, flag: str = "--json") -> None:
    """Before any work: the JSON and its Markdown table can be written where asked (a one-line
    ValueError otherwise): neither is a directory, the two are different files, and the
    nearest existing parent is a directory this process can write in."""
    path = Path(json_path)
    if str(json_path).endswith(("/", os.sep)) or path.is_dir():
        raise ValueError(f"{flag} {json_path} is a directory")
    md = markdown_path(path)
    if md == path:
        raise ValueError(f"{flag} {json_path}: its Markdown table {md.name} would overwrite it")
    if md.is_dir():
        raise ValueError(f"{flag} {json_path}: {md} (its Markdown table) is a directory")
    check_creatable(path, flag)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(results: dict, json_path: str | Path, table: Callable[[dict], str]) -> Path:
    """Write ``results`` to ``json_path`` and ``table(results)`` to the same name with ``.md``
    (each file appears whole or not at all); returns the Markdown path."""
    check_results_path(json_path)
    json_path = Path(json_path)
    md = markdown_path(json_path)
    text, table_text = json.dumps(results, indent=2) + "\n", table(results).rstrip("\n") + "\n"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(json_path, text)
    _write_atomic(md, table_text)
    return md
