"""The one rule for names that become parts of store keys (node names, domains, blob kinds and
owners): letters, digits, '.', '_' or '-', starting with a letter or digit. Matched against the
whole string (``re.fullmatch``): ``$`` would also accept a trailing newline."""

import re

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def is_name(value, max_len: int = 64) -> bool:
    return (
        isinstance(value, str) and 0 < len(value) <= max_len and _NAME.fullmatch(value) is not None
    )


def check_name(what: str, value, max_len: int = 64) -> str:
    """``value`` if it is a valid name, else a one-line ValueError naming ``what``."""
    if not is_name(value, max_len):
        shown = repr(value) if isinstance(value, str) and len(value) <= 80 else type(value).__name__
        raise ValueError(
            f"{what} {shown} is invalid: use letters, digits, '.', '_' or '-' (max {max_len})"
        )
    return value
