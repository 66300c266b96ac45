"""Where every benchmark's results go: the JSON as measured, and a Markdown table beside it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write_results(results: dict, json_path: str | Path, table: Callable[[dict], str]) -> Path:
    """Write ``results`` to ``json_path`` and ``table(results)`` to the same name with ``.md``;
    returns the Markdown path."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md = json_path.with_suffix(".md")
    md.write_text(table(results).rstrip("\n") + "\n")
    return md
