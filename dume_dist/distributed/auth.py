"""Ray token authentication for clusters that `dume` itself starts (`dume demo`, the bench).

Clusters started elsewhere (KubeRay, `ray up`: see deploy/) get ``RAY_AUTH_MODE=token`` and the
token path from their environment. A local multi-node cluster started by ``dume demo`` gets a
fresh random token for its lifetime. Ray reads the mode when it is first imported, so this module
does not import Ray and `token_auth_for_a_new_cluster` must run before anything else does.
"""

from __future__ import annotations

import os
import secrets
import sys


def token_auth_for_a_new_cluster() -> bool:
    """Turn token authentication on, with a fresh token, unless $RAY_AUTH_MODE already decides
    (tests set "disabled") or Ray is already loaded. Returns whether token auth is on."""
    if "RAY_AUTH_MODE" in os.environ:
        return os.environ["RAY_AUTH_MODE"] == "token"
    if "ray" in sys.modules:
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    return True
