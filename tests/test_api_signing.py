"""Signed requests (no Ray, no HTTP): the signature covers method, path, body, node, domain,
timestamp and nonce; the coordinator refuses replays, stale and pre-restart requests, other
nodes' keys; rotation keeps the contribution; the throttle counts failures in a window."""

from __future__ import annotations

import hashlib

import pytest
import torch
from dist_helpers import make_experts

from dume_dist.distributed import genesis, signing
from dume_dist.distributed.agent import NodeAgent
from dume_dist.distributed.coordinator import Coordinator
from dume_dist.store import ObjectStore, new_secret

JOIN = {"max_tokens": 240, "seq_len": 16, "batch_size": 4, "threads": 1}


def _env(name, domain, secret, method="GET", path="/v1/node/info", body=b"", now=None,
         seen_body=None):  # fmt: skip
    headers = signing.sign_request(name, domain, secret, method, path, body, now=now)
    digest = hashlib.sha256(body if seen_body is None else seen_body).hexdigest()
    return signing.envelope(headers, method, path, digest)


def test_signature_binds_every_field():
    secret = new_secret()
    key = signing.public_key("alpha", "alpha", secret)
    guard = signing.ReplayGuard()
    good = _env("alpha", "alpha", secret, "POST", "/v1/node/leave", b"{}")
    signing.verify(good, key, guard, "alpha", "alpha")
    for field, value in [("method", "GET"), ("path", "/v1/node/stats"), ("nonce", "0" * 32),
                         ("timestamp_ms", good["timestamp_ms"] + 1),
                         ("body_sha256", hashlib.sha256(b"{ }").hexdigest())]:  # fmt: skip
        with pytest.raises(signing.AuthError, match="signature rejected"):
            signing.check_signature({**good, field: value}, key)
    other = signing.public_key("alpha", "alpha", new_secret())
    with pytest.raises(signing.AuthError, match="signature rejected"):
        signing.check_signature(good, other)
    with pytest.raises(signing.AuthError, match="no signing key"):
        signing.check_signature(good, None)


def test_replay_stale_and_pre_restart_requests_are_refused():
    secret = new_secret()
    key = signing.public_key("alpha", "alpha", secret)
    guard = signing.ReplayGuard(window_s=60)
    env = _env("alpha", "alpha", secret)
    signing.verify(env, key, guard, "alpha", "alpha")
    with pytest.raises(signing.AuthError, match="replayed"):
        signing.verify(env, key, guard, "alpha", "alpha")
    stale = _env("alpha", "alpha", secret, now=guard.started_ms / 1000 + 1 - 3600)
    with pytest.raises(signing.AuthError) as exc:
        signing.verify(stale, key, guard, "alpha", "alpha")
    assert exc.value.expired
    future = _env("alpha", "alpha", secret, now=guard.started_ms / 1000 + 3600)
    with pytest.raises(signing.AuthError, match="expired"):
        signing.verify(future, key, guard, "alpha", "alpha")
    before = _env("alpha", "alpha", secret, now=guard.started_ms / 1000 - 1)
    with pytest.raises(signing.AuthError, match="expired"):  # signed before this incarnation
        signing.verify(before, key, guard, "alpha", "alpha")
    with pytest.raises(signing.AuthError, match="another node"):
        signing.verify(_env("alpha", "alpha", secret), key, guard, "beta", "alpha")


def test_malformed_headers_are_refused():
    headers = signing.sign_request("alpha", "alpha", new_secret(), "GET", "/v1/node/info", b"")
    for name in signing.SIGNED_HEADERS:
        with pytest.raises(signing.AuthError, match="unsigned"):
            signing.envelope({k: v for k, v in headers.items() if k != name}, "GET", "/", "0" * 64)
    for name, value in [(signing.HEADER_TIMESTAMP, "12a"), (signing.HEADER_NONCE, "../x"),
                        (signing.HEADER_SIGNATURE, "A" * 200)]:  # fmt: skip
        with pytest.raises(signing.AuthError, match="malformed"):
            signing.envelope({**headers, name: value}, "GET", "/", "0" * 64)


def test_throttle_counts_failures_in_a_window():
    throttle = signing.Throttle(limit=3, window_s=10)
    for t in (0, 1, 2):
        assert throttle.retry_after("node:alpha", now=t) == 0
        throttle.fail("node:alpha", now=t)
    assert throttle.retry_after("node:alpha", now=3) == pytest.approx(7)
    assert throttle.retry_after("node:beta", now=3) == 0
    assert throttle.retry_after("node:alpha", now=10.5) == 0  # the first failure left the window


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    return make_experts(tmp_path_factory.mktemp("experts"), domains=("alpha", "beta"))


def test_coordinator_checks_signed_requests_and_rotation_keeps_the_contribution(experts, tmp_path):
    torch.set_num_threads(1)
    url = str(tmp_path / "store")
    coord = Coordinator(url, work_dir=str(tmp_path / "coord"))
    _, op = genesis.found(coord, ObjectStore(url), backbone=f"base:{experts['base']}",
                          founding={}, settings={"routing": "paper", "max_tokens_per_seq": 16})  # fmt: skip
    secrets = {n: new_secret() for n in ("alpha", "beta")}
    for name, secret in secrets.items():
        coord.add_node(op, name, name, *genesis.node_credential_record(name, name, secret))
    NodeAgent(coord, "alpha", "alpha", secrets["alpha"], str(tmp_path / "cache")).join(
        str(experts["alpha"]["expert"]), [str(experts["alpha"]["data"])], **JOIN
    )
    info = coord.node_info(_env("alpha", "alpha", secrets["alpha"]), "alpha", "alpha")
    assert info["state"] == "active"
    replay = _env("alpha", "alpha", secrets["alpha"])
    coord.node_info(replay, "alpha", "alpha")
    with pytest.raises(PermissionError, match="replayed"):
        coord.node_info(replay, "alpha", "alpha")
    with pytest.raises(PermissionError):  # beta's key does not sign for alpha
        coord.node_info(_env("alpha", "alpha", secrets["beta"]), "alpha", "alpha")
    with pytest.raises(PermissionError):  # a body that is not the signed one
        coord.leave(_env("alpha", "alpha", secrets["alpha"], "POST", "/v1/node/leave", b"{}",
                         seen_body=b'{"x": 1}'), "alpha", "alpha")  # fmt: skip
    revision = coord.status()["revision"]

    new = new_secret()
    with pytest.raises(PermissionError):
        coord.rotate_credential("not the operator", "alpha",
                                *genesis.node_credential_record("alpha", "alpha", new))  # fmt: skip
    assert coord.status()["revision"] == revision
    out = coord.rotate_credential(
        op, "alpha", *genesis.node_credential_record("alpha", "alpha", new)
    )
    assert out["rotated"]
    with pytest.raises(PermissionError):
        coord.node_info(_env("alpha", "alpha", secrets["alpha"]), "alpha", "alpha")
    with pytest.raises(PermissionError):
        coord.node_info(secrets["alpha"], "alpha", "alpha")
    after = coord.node_info(_env("alpha", "alpha", new), "alpha", "alpha")
    assert after["state"] == "active" and after["submissions"] == info["submissions"]
    assert after["expert"] == info["expert"]
    # The node rotates its own credential with the current one.
    newer = new_secret()
    coord.rotate_own_credential(_env("alpha", "alpha", new, "POST", "/v1/node/credential", b"{}"),
                                "alpha", "alpha",
                                *genesis.node_credential_record("alpha", "alpha", newer))  # fmt: skip
    assert coord.node_info(newer, "alpha", "alpha")["submissions"] == info["submissions"]
    view = coord.status()["registry"]["nodes"]["alpha"]
    assert "public_key" not in view and "credential_hash" not in view
