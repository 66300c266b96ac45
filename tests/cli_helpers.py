"""What the CLI tests of new users' input share: a tiny two-expert `dume build` command line and
the check that a refusal is one line on stderr with exit code 2."""

from __future__ import annotations

NAMES = ("alpha", "beta")


def build_args(world, out, *extra, data=None, experts=None) -> list[str]:
    """`dume build` of ``world``'s (tiny_world.make_world) alpha and beta experts into ``out``,
    with ``data`` / ``experts`` replacing some of theirs, then ``extra``."""
    data = {n: world["data"][n][0] for n in NAMES} | (data or {})
    experts = {n: world["experts"][n] for n in NAMES} | (experts or {})
    args = ["build", "--out", str(out), "--seq-len", "16", "--max-tokens-per-seq", "12"]
    for n in NAMES:
        args += ["--expert", f"{n}={experts[n]}", "--data", f"{n}={data[n]}"]
    return args + [str(x) for x in extra]


def one_line_error(capsys, code, needle) -> None:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert needle in err, err
