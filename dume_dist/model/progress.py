"""Progress bars for long work (tqdm); silenced with ``TQDM_DISABLE=1`` (tests do)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs):
    kwargs.setdefault("disable", bool(os.environ.get("TQDM_DISABLE")) or not sys.stderr.isatty())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
