"""A directory of contributors' statistics kept beside a model (``dume build --save-stats DIR``).

Statistics are data about the contributors' text, so a build never writes them into the model
directory; asked to, it keeps them here, and a later build with the same directory reuses every
contributor's statistics whose key still matches (the expert, the backbone, the data files'
contents and every collection setting, differential privacy included) and computes only the rest.

Layout: ``<name>/entry.json`` (the key, the held-out smoothings and each file's sha256),
``<name>/fit.safetensors``, ``<name>/holdout-<i>.safetensors`` (``core.stats`` blobs, checked
against their sha256 and validated when read).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from dume_dist.model.data import data_files
from dume_dist.model.kinds import load_stats, stats_to_bytes

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MAX_ENTRY_BYTES = 1 << 16


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stats_key(expert_fp: str, backbone_fp: str, data: list, settings: dict) -> str:
    """What a contributor's statistics depend on, hashed."""
    record = {
        "expert": expert_fp,
        "backbone": backbone_fp,
        # a directory counts as the files it is read as (data.data_files)
        "data": [file_sha256(f) for p in data for f in data_files(p)],
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def check_outside(stats_dir: str | Path, model_dir: str | Path) -> Path:
    """The statistics directory, refused when it lies inside the model directory."""
    s, m = Path(stats_dir).resolve(), Path(model_dir).resolve()
    if s == m or m in s.parents:
        raise ValueError(
            f"--save-stats {stats_dir} is inside the model directory {model_dir}: statistics "
            "must stay out of a model that may be published"
        )
    return Path(stats_dir)


class StatsDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _dir(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"expert name {name!r} cannot name a statistics directory")
        return self.root / name

    def load(self, name: str, key: str):
        """``(fit, {β: held-out})`` saved under ``key``, or None (absent, stale, or saved without
        checksums). A file changed since it was saved (its sha256 is not the one the entry
        recorded) is refused in one line, never trusted."""
        d = self._dir(name)
        entry_path = d / "entry.json"
        if not entry_path.is_file() or entry_path.stat().st_size > _MAX_ENTRY_BYTES:
            return None
        try:
            entry = json.loads(entry_path.read_text())
        except (ValueError, OSError) as exc:
            raise ValueError(f"saved statistics of {name} are unreadable: {exc}") from None
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        sums, betas = entry.get("sha256"), entry.get("holdout", [])
        if not isinstance(sums, dict) or not isinstance(betas, list):
            return None  # an older entry: computed again
        files = _files(len(betas))
        for file in files:
            if not (d / file).is_file() or file_sha256(d / file) != sums.get(file):
                raise ValueError(
                    f"saved statistics {d / file} do not match the checksum recorded when they "
                    f"were saved (changed since?): delete {d} to compute them again"
                )
        try:
            fit = load_stats(d / files[0])
            held = {float(beta): load_stats(d / file)
                    for beta, file in zip(betas, files[1:], strict=True)}  # fmt: skip
        except (ValueError, OSError, TypeError) as exc:
            raise ValueError(f"saved statistics of {name} are unreadable: {exc}") from None
        return fit, held

    def save(self, name: str, key: str, fit, held: dict) -> None:
        d = self._dir(name)
        d.mkdir(parents=True, exist_ok=True)
        (d / "entry.json").unlink(missing_ok=True)  # stale until rewritten last
        betas = sorted(held)
        files = _files(len(betas))
        for file, stats in zip(files, [fit, *(held[b] for b in betas)], strict=True):
            (d / file).write_bytes(stats_to_bytes(stats))
        sums = {file: file_sha256(d / file) for file in files}
        (d / "entry.json").write_text(json.dumps({"key": key, "holdout": betas, "sha256": sums}))


def _files(num_holdout: int) -> list[str]:
    return ["fit.safetensors", *(f"holdout-{i}.safetensors" for i in range(num_holdout))]
