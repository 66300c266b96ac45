"""`--config FILE`: YAML keys fill in a subcommand's flags.

Every flag of every subcommand has a config key: its long option name without the
dashes (``--max-tokens-per-seq`` → ``max_tokens_per_seq`` or ``max-tokens-per-seq``).
A key that names no flag, or a value the flag's type or choices reject, is an error
naming the key. Flags given on the command line win over the file (a repeatable flag given on
the command line replaces the file's list).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml


def _subparsers_action(node: argparse.ArgumentParser):
    return next((a for a in node._actions if isinstance(a, argparse._SubParsersAction)), None)


def _target(parser: argparse.ArgumentParser, argv: list[str]):
    """The (sub)parser the command line selects, and its command words."""
    node, words = parser, []
    for token in argv:
        action = _subparsers_action(node)
        if action is None:
            break
        if token in action.choices:
            node = action.choices[token]
            words.append(token)
    return node, words


def _convert(action: argparse.Action, key: str, value):
    if value is None:  # `key: null` keeps the flag's own default (None)
        return action.default

    def one(v):
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(v, bool):
                raise ValueError(f"config key {key!r} must be true or false, got {v!r}")
            return v
        if action.type in (None, str):  # a text flag: a YAML number is its text
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise ValueError(f"config key {key!r} takes text, got {v!r}")
            v = str(v)
        try:
            out = action.type(v) if action.type and isinstance(v, str) else v
            if action.type and not isinstance(v, str):
                out = action.type(str(v)) if action.type is not str else str(v)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ValueError(f"config key {key!r}: bad value {v!r} ({exc})") from None
        if action.choices is not None and out not in action.choices:
            raise ValueError(f"config key {key!r} must be one of {list(action.choices)}, got {v!r}")
        return out

    many = action.nargs in ("*", "+") or isinstance(action, argparse._AppendAction)
    if many:
        values = value if isinstance(value, list) else [value]
        return [one(v) for v in values]
    if isinstance(value, (list, dict)):
        raise ValueError(f"config key {key!r} takes a single value, got {value!r}")
    return one(value)


def load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(
            f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values")
    return data


def apply_config_defaults(parser: argparse.ArgumentParser, argv: list[str], path: str) -> None:
    """Turn the file's keys into defaults of the selected subcommand (before parsing)."""
    data = load_yaml(path)
    sub, words = _target(parser, argv)
    by_key = {a.dest: a for a in sub._actions if a.option_strings and a.dest != "help"}
    defaults = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in by_key:
            raise ValueError(f"config key {raw_key!r} is not a flag of 'dume {' '.join(words)}'")
        defaults[key] = _convert(by_key[key], str(raw_key), value)
    for key, value in defaults.items():
        action = by_key[key]
        if isinstance(action, argparse._AppendAction) and isinstance(value, list):
            # argparse appends a flag's values to its default: the file's list would be kept
            # beside the command line's, which is to replace it
            value = _FromFile(value)
            action.__class__ = _AppendOverFile
        defaults[key] = value
    sub.set_defaults(**defaults)
    for key in defaults:  # required flags satisfied by the file
        by_key[key].required = False


class _FromFile(list):
    """A repeatable flag's values from the config file (replaced by the command line's)."""


class _AppendOverFile(argparse._AppendAction):
    """``append`` whose first value on the command line replaces the config file's values."""

    def __call__(self, parser, namespace, values, option_string=None):
        if isinstance(getattr(namespace, self.dest, None), _FromFile):
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)
