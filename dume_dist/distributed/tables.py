"""Rich tables for `dume status`, `dume versions list` and the demo."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def console() -> Console:
    """A console at least 110 columns wide (tables stay readable in logs and pipes)."""
    return Console(width=max(Console().width, 110))


def versions_table(manifests: list[dict], title: str = "versions") -> Table:
    table = Table(title=title)
    for col in ("version", "parent", "trigger", "experts (index order)", "tokens", "marks"):
        table.add_column(col, overflow="fold")
    for m in manifests:
        if m.get("purged"):
            table.add_row(m["version"], "", "", "[dim](purged)[/dim]", "", "")
            continue
        if "unreadable" in m:
            table.add_row(m["version"], "", "", "[red](unreadable manifest: skipped)[/red]", "", "")
            continue
        contributors = m.get("contributors", [])
        if _contributor_records(contributors):
            experts = ", ".join(
                _text(c["name"])
                if c["name"] == c["domain"]
                else _text(f"{c['name']} ({c['domain']})")
                for c in contributors
            )
            tokens = f"{sum(c.get('num_tokens', 0) for c in contributors):,}"
        else:  # a manifest edited by hand: shown as such, never a crash of the whole listing
            experts, tokens = "[red](malformed contributors)[/red]", ""
        marks = m.get("marks") if isinstance(m.get("marks"), dict) else {}
        marks = "; ".join(
            _text(f"{k.replace('_', ' ')}: {', '.join(map(str, v)) if isinstance(v, list) else v}")
            for k, v in marks.items()
        )
        table.add_row(
            _text(m["version"]), _text(m.get("parent") or ""), _text(m.get("trigger", "")),
            experts, tokens, marks,
        )  # fmt: skip
    return table


def _text(value) -> str:
    """A manifest's value as table text: a string, its markup escaped (manifests are files)."""
    from rich.markup import escape

    return escape(str(value))


def _contributor_records(contributors) -> bool:
    """Whether a manifest's ``contributors`` is what the coordinator writes: a list of objects
    with string ``name`` and ``domain`` and, where present, an integer ``num_tokens``."""
    return isinstance(contributors, list) and all(
        isinstance(c, dict)
        and isinstance(c.get("name"), str)
        and isinstance(c.get("domain"), str)
        and isinstance(c.get("num_tokens", 0), int)
        for c in contributors
    )


def print_versions(manifests: list[dict]) -> None:
    console().print(versions_table(manifests))


def nodes_table(registry: dict) -> Table:
    table = Table(title="contributors")
    for col in ("node", "domain", "state", "expert", "submissions", "tokens", "privacy"):
        table.add_column(col)
    active = sorted(n for n, r in registry.get("nodes", {}).items() if r["state"] == "active")
    for name, rec in sorted(registry.get("nodes", {}).items()):
        expert = rec["expert"]["fingerprint"][:12] if rec.get("expert") else ""
        index = f" (expert {active.index(name)})" if name in active else ""
        tokens = sum(s["num_tokens"] for s in rec["stats"])
        table.add_row(
            name, rec["domain"], rec["state"] + index, expert, str(len(rec["stats"])),
            f"{tokens:,}", _privacy_cell([s.get("dp") for s in rec["stats"]]),
        )  # fmt: skip
    return table


def _privacy_cell(guarantees: list) -> str:
    """The contributor's composed (ε, δ) over its submissions, or '-' when none was private."""
    if not any(guarantees):
        return "-"
    from dume_dist.core.private import privacy_record

    rec = privacy_record(guarantees)
    if rec["epsilon"] is None:
        return f"partly ({rec['private_submissions']}/{rec['submissions']} private)"
    return f"ε={rec['epsilon']:.3g}, δ={rec['delta']:g}"


def _routing_label(settings: dict) -> str:
    routing = settings.get("routing")
    if routing is None:  # a registry founded before routing options: the paper's
        return "token/ridge"
    label = f"{routing['features']}/{routing['solver']}"
    return f"{routing['preset']} ({label})" if routing.get("preset") else label


def _solver_parameter(settings: dict) -> str:
    """The routing's solver parameter by its option name (``mu=auto`` for n-gram routing,
    ``ridge_lambda=0.01`` for the paper's); a registry founded before routing options has only
    ``lam`` (the ridge λ)."""
    from dume_dist.model.kinds import kind_of_config

    routing = settings.get("routing")
    key = kind_of_config(routing).selected_option(routing) if routing else None
    if key is None or routing.get(key) is None:
        return f"λ={settings['lam']}"
    return f"{key}={routing[key]}"


def print_status(status: dict) -> None:
    out = console()
    registry = status["registry"]
    if not registry:
        out.print(f"store {status['store']}: not founded yet")
        return
    bb = registry["backbone"]
    settings = registry["settings"]
    out.print(
        f"store {status['store']}  registry revision {status['revision']}  "
        f"backbone {bb['kind']} {bb['fingerprint'][:12]}  "
        f"routing {_routing_label(settings)} {_solver_parameter(settings)} "
        f"T={settings['temperature']} "
        f"k={settings['top_k']}  "
        f"publication {'HELD' if registry['hold'] else 'automatic'}"
    )
    out.print(nodes_table(registry))
    for warning in status.get("warnings") or []:
        out.print(f"[yellow]warning:[/yellow] {warning}")
    shares = status.get("shares")
    if shares:
        active = sorted(n for n, r in registry.get("nodes", {}).items() if r["state"] == "active")
        out.print(shares_table(shares, active))
    table = Table(title="versions (registry)")
    for col in ("version", "parent", "trigger", "contributors", "unlearned since", "purged"):
        table.add_column(col)
    for v in registry["versions"]:
        table.add_row(v["version"], v["parent"] or "", v["trigger"], ", ".join(v["contributors"]),
                      ", ".join(v["marked"]), "yes" if v["purged"] else "")  # fmt: skip
    out.print(table)


def shares_table(shares: dict, names: list[str]) -> Table:
    """Estimated top-1 routing shares of the latest version (rows: whose tokens; columns: which
    expert wins them), outliers and classes their own expert rarely wins flagged."""
    table = Table(title=f"routing shares (estimated on {shares.get('statistics', '?')} statistics)")
    table.add_column("tokens of")
    for j, name in enumerate(names):
        flag = " (outlier)" if j in shares.get("outliers", []) else ""
        table.add_column(name + flag, justify="right")
    unrouted = shares.get("unrouted", [])
    for j, (name, row) in enumerate(zip(names, shares["by_class"])):
        table.add_row(name + (" (unrouted)" if j in unrouted else ""), *(f"{v:.1%}" for v in row))
    table.add_row("all", *(f"{v:.1%}" for v in shares["overall"]))
    return table


def ppl_table(
    ppl: dict[str, dict[str, float]], domains: list[str], title: str = "held-out perplexity"
) -> Table:
    """``ppl[row][domain]``; the best value of each column in bold."""
    table = Table(title=title)
    table.add_column("model")
    for d in domains:
        table.add_column(d, justify="right")
    best = {d: min(row[d] for row in ppl.values() if d in row) for d in domains}
    for name, row in ppl.items():
        cells = []
        for d in domains:
            v = row.get(d)
            cells.append(
                "" if v is None else (f"[bold]{v:.2f}[/bold]" if v == best[d] else f"{v:.2f}")
            )
        table.add_row(name, *cells)
    return table


def sent_table(sent: dict[str, dict[str, int]]) -> Table:
    """Bytes each contributor's node put on the wire to the coordinator, by kind."""
    kinds = sorted({k for row in sent.values() for k in row})
    table = Table(title="what each node sent to the coordinator (bytes of request bodies)")
    table.add_column("node")
    for kind in kinds:
        table.add_column(kind, justify="right")
    for node, row in sent.items():
        table.add_row(node, *(f"{row.get(k, 0):,}" for k in kinds))
    return table
