"""Output formats: back ends behind one interface (``base.OutputFormat``), registered by name.

``write_checkpoint(fmt, inp, out_dir, options)`` writes a build (``base.CheckpointInput``) in
format ``fmt``; ``unsupported(fmt, inp)`` says why a format cannot hold it (None when it can).
Adding a format is one module with an ``OutputFormat`` subclass and one line in ``FORMATS``.
"""

from __future__ import annotations

from pathlib import Path

from dume_dist.model.formats.base import (
    BuildStats,
    CheckpointInput,
    OutputFormat,
    Provenance,
    WriteOptions,
)
from dume_dist.model.formats.dume import DumeFormat
from dume_dist.model.formats.mixtral import MixtralFormat

FORMATS: dict[str, type[OutputFormat]] = {"dume": DumeFormat, "mixtral": MixtralFormat}

__all__ = [
    "FORMATS",
    "BuildStats",
    "CheckpointInput",
    "OutputFormat",
    "Provenance",
    "WriteOptions",
    "get_format",
    "unsupported",
    "write_checkpoint",
]


def get_format(name: str, **options) -> OutputFormat:
    if name not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {name!r}")
    return FORMATS[name](**options)


def unsupported(name: str, inp: CheckpointInput, **options) -> str | None:
    return get_format(name, **options).unsupported(inp)


def write_checkpoint(
    name: str, inp: CheckpointInput, out_dir: str | Path, options: WriteOptions | None = None,
    **format_options,
) -> dict:  # fmt: skip
    return get_format(name, **format_options).write(inp, out_dir, options or WriteOptions())
