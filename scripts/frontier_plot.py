"""Every routing setting measured for issue 12, on one picture per expert set.

Reads the prototype and build results under docs/results/ (each file's own header says how it
was measured: tokens, windows, tables; they differ between files, so a point is comparable with
its neighbours to within those conditions, not to the last digit) and plots, per set, the worst
single-domain keep against the keep on later segments of mixed text, coloured by the share of
single-domain tokens on which a second expert runs (the compute a hedge costs; grey where the
file did not record it). The target region (every domain within 1% of oracle, later segments
>= 0.95) is shaded. Writes frontier.png and frontier.md next to the results.

    python scripts/frontier_plot.py [--results docs/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SETS = {"founders": "founders", "set2": "set 2", "set 2": "set 2", "five": "five shipped"}
SECOND = ("two_experts", "two_experts_single", "second_expert", "two")
TARGET_WORST, TARGET_LATER = 0.99, 0.95


def _set_of(path: list[str], file: str) -> str | None:
    if file == "third-set.json":
        return "five shipped" if any("f5-" in p for p in path) else "set 3"
    for part in path:
        low = part.lower()
        for key, name in SETS.items():
            if low.startswith(key):
                return name
    return None


def _second(entry: dict) -> float | None:
    for key in SECOND:
        value = entry.get(key)
        if isinstance(value, dict):
            value = value.get("single")
        if isinstance(value, int | float):
            return float(value)
    return None


def points(results: Path) -> list[dict]:
    """One point per measured setting: set, file, config, worst, later, all, second."""
    out = []
    files = sorted(results.glob("*proto*.json")) + [results / "third-set.json"]
    for file in files:
        if not file.exists():
            continue

        def walk(node, path, file=file):
            if isinstance(node, dict):
                mixed = node.get("mixed") or node.get("mixed_keep")
                if "worst" in node and isinstance(mixed, dict) and "later_segments" in mixed:
                    name = _set_of(path, file.name)
                    if name is not None:
                        out.append({
                            "set": name, "file": file.name,
                            "config": str(node.get("config", path[-1])),
                            "worst": float(node["worst"]),
                            "later": float(mixed["later_segments"]), "all": float(mixed["all"]),
                            "second": _second(node),
                        })  # fmt: skip
                    return
                for key, value in node.items():
                    walk(value, [*path, str(key)], file)
            elif isinstance(node, list):
                for i, value in enumerate(node):
                    walk(value, [*path, str(i)], file)

        walk(json.loads(file.read_text()), [])
    return out


def summary(pts: list[dict]) -> str:
    rows = [
        "| set | settings measured | in the target region | best later segments with every "
        "domain within 1% (second expert) | best worst domain with later segments >= 0.95 "
        "(second expert) |",
        "|---|---|---|---|---|",
    ]

    def fmt(p, key):
        if p is None:
            return "none"
        share = "n/a" if p["second"] is None else f"{100 * p['second']:.1f}%"
        value = f"{p[key]:.3f}" if key == "later" else f"{100 * p[key]:.2f}%"
        return f"{value} ({share}; `{p['config']}`, {p['file']})"

    for name in ("founders", "set 2", "five shipped", "set 3"):
        mine = [p for p in pts if p["set"] == name]
        if not mine:
            continue
        ok_single = [p for p in mine if p["worst"] >= TARGET_WORST]
        ok_mixed = [p for p in mine if p["later"] >= TARGET_LATER]
        both = [p for p in ok_single if p["later"] >= TARGET_LATER]
        best_later = max(ok_single, key=lambda p: p["later"], default=None)
        best_worst = max(ok_mixed, key=lambda p: p["worst"], default=None)
        rows.append(
            f"| {name} | {len(mine)} | {len(both)} | {fmt(best_later, 'later')} | "
            f"{fmt(best_worst, 'worst')} |"
        )
    return "\n".join(rows) + "\n"


def plot(pts: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("founders", "set 2", "five shipped", "set 3") if any(p["set"] == n for p in pts)]  # fmt: skip
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.6), squeeze=False)
    scatter = None
    for ax, name in zip(axes[0], names, strict=True):
        mine = [p for p in pts if p["set"] == name and p["worst"] > 0.9 and p["later"] > 0.4]
        known = [p for p in mine if p["second"] is not None]
        unknown = [p for p in mine if p["second"] is None]
        ax.axvspan(TARGET_WORST, 1.005, ymin=0, ymax=1, alpha=0.0)
        ax.fill_between([TARGET_WORST, 1.005], TARGET_LATER, 1.0, color="tab:green", alpha=0.15,
                        label="target region")  # fmt: skip
        if unknown:
            ax.scatter([p["worst"] for p in unknown], [p["later"] for p in unknown], s=14,
                       c="lightgrey", edgecolors="grey", linewidths=0.3, label="share not recorded")  # fmt: skip
        if known:
            scatter = ax.scatter([p["worst"] for p in known], [p["later"] for p in known], s=16,
                                 c=[100 * p["second"] for p in known], cmap="viridis", vmin=0,
                                 vmax=25, edgecolors="black", linewidths=0.2)  # fmt: skip
        ax.axvline(TARGET_WORST, color="tab:green", lw=0.8)
        ax.axhline(TARGET_LATER, color="tab:green", lw=0.8)
        ax.set_xlim(0.97, 1.0)
        ax.set_ylim(0.85, 1.0)
        ax.set_title(f"{name} ({len(mine)} settings)")
        ax.set_xlabel("worst single-domain keep")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mixed text: keep on later segments")
    axes[0][0].legend(loc="lower left", fontsize=8)
    if scatter is not None:
        bar = fig.colorbar(scatter, ax=axes[0].tolist(), fraction=0.02)
        bar.set_label("% of single-domain tokens with a second expert")
    fig.suptitle(
        "Issue 12: every routing setting measured (docs/results/*proto*.json, third-set.json)"
    )
    fig.savefig(png, dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="docs/results", type=Path)
    args = parser.parse_args()
    pts = points(args.results)
    plot(pts, args.results / "frontier.png")
    table = summary(pts)
    (args.results / "frontier.md").write_text(
        "# Every routing setting measured for issue 12\n\n"
        "`python scripts/frontier_plot.py` over docs/results/*proto*.json and third-set.json "
        "(measurement conditions differ by file; each file's header says which). "
        "Picture: [frontier.png](frontier.png).\n\n" + table
    )
    print(table)


if __name__ == "__main__":
    main()
