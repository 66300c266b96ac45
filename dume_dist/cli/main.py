"""The `dume` command: one entry point, subcommands registered by sibling modules.

Each module under ``dume_dist.cli`` that defines ``register(subparsers)`` adds its
subcommands; a subcommand's handler is ``args.func(args) -> int``. User errors
(``ValueError``, ``OSError``, store errors) print one line to stderr and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# One module per command group; the distributed groups share `dume_dist.cli.shared`.
COMMAND_MODULES = (
    "build",
    "bench",
    "coordinator",
    "node",
    "admin",
    "unlearn",
    "versions",
    "status",
    "demo",
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dume",
        description="Training-free DUME: merge domain-expert LMs into one MoE, on one machine or a Ray cluster.",
    )
    parser.add_argument("--config", help="YAML file whose keys fill in flags (see configs/)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"dume_dist.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"dume_dist.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    # OSError: a path that is a directory, a file where a directory is needed, a full disk...
    types: list[type[BaseException]] = [ValueError, OSError]
    try:
        from dume_dist.store.errors import StoreError

        types.append(StoreError)
    except ImportError:
        pass
    return tuple(types)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    config_path = pre.parse_known_args(argv)[0].config
    command = "config"
    try:
        if config_path:
            from dume_dist.cli.config import apply_config_defaults

            apply_config_defaults(parser, argv, config_path)
        args = parser.parse_args(argv)
        command = args.command
        return int(args.func(args) or 0)
    except _user_error_types() as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"dume {command}: error: {msg}", file=sys.stderr)
        if os.environ.get("DUME_TRACEBACK"):
            raise
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
