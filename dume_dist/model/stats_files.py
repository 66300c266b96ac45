"""Statistics kept as files and read one at a time: what lets a build or a solve hold one
contribution and the running sums, whatever the number of contributors.

``StatsFiles`` is a ``{name: stats}`` mapping whose values live in safetensors blobs
(the format of their router kind, ``dume_dist.model.kinds``) and are decoded (and validated) each time they are read;
``contributions(files, index)`` is the ``{name: (expert index, stats)}`` view the solvers take.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from dume_dist.model.kinds import load_stats, stats_to_bytes


class StatsFiles(Mapping):
    def __init__(self, root: str | Path | None = None):
        if root is None:  # a private directory, removed with this object
            self._tmp = tempfile.TemporaryDirectory(prefix="dume-stats-")
            root = self._tmp.name
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._paths: dict[str, Path] = {}

    def put(self, name: str, stats) -> Path:
        """Write ``stats`` as ``name``'s blob (replacing an earlier one)."""
        path = self.root / f"{len(self._paths):06d}.safetensors"
        path.write_bytes(stats_to_bytes(stats))
        self._paths[name] = path
        return path

    def add_file(self, name: str, path: str | Path) -> None:
        """Serve ``name`` from an existing blob file."""
        self._paths[name] = Path(path)

    def path(self, name: str) -> Path:
        return self._paths[name]

    def __getitem__(self, name: str):
        return load_stats(self._paths[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


class Indexed(Mapping):
    """``{name: (index[name], stats)}`` over a lazily read ``{name: stats}`` mapping."""

    def __init__(self, stats: Mapping, index: Mapping[str, int]):
        self.stats, self.index = stats, index

    def __getitem__(self, name: str):
        return self.index[name], self.stats[name]

    def expert_of(self, name: str) -> int:
        """``name``'s expert index without reading its statistics (``core.solve.experts_of``)."""
        if name not in self.stats:
            raise KeyError(name)
        return self.index[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.stats)

    def __len__(self) -> int:
        return len(self.stats)


def contributions(stats: Mapping, index: Mapping[str, int]) -> Indexed:
    return Indexed(stats, index)
