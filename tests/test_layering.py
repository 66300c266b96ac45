"""The package's layers import only downwards (DESIGN §4): core ← model ← store ← distributed ←
bench ← cli. Every internal import counts, function-level and relative ones included; ``core``
and ``model`` import neither Ray nor fsspec."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dume_dist"
# Rank of each layer: a module may import its own layer and those of lower rank. `demo` holds
# assets (and the recipe that made them); it sits beside core, importing nothing of the package.
RANK = {"core": 0, "demo": 0, "model": 1, "store": 2, "distributed": 3, "bench": 4, "cli": 5}
FORBIDDEN_THIRD_PARTY = {"core": ("ray", "fsspec", "s3fs"), "model": ("ray", "fsspec", "s3fs")}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) > 1:
            yield path, parts


def _imports(path: Path, parts: tuple[str, ...]):
    """(line, absolute module name) of every import in the file, at any depth."""
    package = ["dume_dist", *parts[:-1]]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield node.lineno, name
            for alias in node.names:  # `from dume_dist import model` names a layer too
                if name == "dume_dist":
                    yield node.lineno, f"dume_dist.{alias.name}"


def test_every_package_layer_is_ranked():
    layers = {parts[0] for _, parts in _modules()}
    assert layers <= set(RANK), f"unranked layers: {sorted(layers - set(RANK))}"


@pytest.mark.parametrize("path,parts", list(_modules()), ids=lambda v: str(v))
def test_imports_go_down(path, parts):
    layer = parts[0]
    bad = []
    for line, name in _imports(path, parts):
        top = name.split(".")
        if top[0] == "dume_dist" and len(top) > 1 and top[1] in RANK:
            if RANK[top[1]] > RANK[layer] and top[1] != layer:
                bad.append(f"{path.name}:{line} imports {name}")
        if top[0] in FORBIDDEN_THIRD_PARTY.get(layer, ()):
            bad.append(f"{path.name}:{line} imports {name}")
    assert not bad, f"{layer} imports upwards: {bad}"


def test_checker_sees_function_level_and_relative_imports(tmp_path):
    src = "def f():\n    from dume_dist.cli import main\n    from ..store import x\n"
    path = tmp_path / "m.py"
    path.write_text(src)
    names = [n for _, n in _imports(path, ("model", "m.py"))]
    assert names == ["dume_dist.cli", "dume_dist.store"]
