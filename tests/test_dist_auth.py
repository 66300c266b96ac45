"""A cluster started by `ray start` with token authentication (what `ray start` does by
default): `dume` reaches it when $RAY_AUTH_MODE=token and the token are set, and without them
says in its one-line error what to set (Ray's own error only says it could not connect)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_helpers import short_ray_tmpdir

pytestmark = pytest.mark.ray

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def token_head():
    """A Ray head on 127.0.0.1 with token authentication, stopped by its process group."""
    tmp = short_ray_tmpdir()
    token, port = secrets.token_hex(32), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_TMPDIR": tmp}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--port", str(port), "--node-ip-address",
         "127.0.0.1", "--num-cpus", "1", "--include-dashboard=false", "--disable-usage-stats",
         "--temp-dir", tmp, "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not _listening(port):
            assert head.poll() is None, "ray start exited"
            assert time.monotonic() < deadline, "the Ray head did not listen within 90 s"
            time.sleep(0.5)
        time.sleep(2)  # the GCS listens before the head's raylet has registered
        yield {"address": f"127.0.0.1:{port}", "token": token, "tmp": tmp}
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def _dume(args, env_update, tmp_path, tmp):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    # no ~/.ray/auth_token of this machine's user: only what the test sets
    env.update(HOME=str(tmp_path), RAY_TMPDIR=tmp, **env_update)
    return subprocess.run(
        [str(BIN / "dume"), *args], env=env, capture_output=True, text=True, timeout=240,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_without_the_token_the_error_says_what_to_set(token_head, tmp_path):
    run = _dume(["coordinator", "stop", "--address", token_head["address"]], {}, tmp_path,
                token_head["tmp"])  # fmt: skip
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("dume coordinator: error: cannot reach a Ray cluster at")
    assert "RAY_AUTH_MODE=token" in last and "RAY_AUTH_TOKEN" in last
    assert "no coordinator running" not in run.stdout


def test_with_the_token_the_same_command_reaches_the_cluster(token_head, tmp_path):
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token_head["token"]}
    run = _dume(["coordinator", "stop", "--address", token_head["address"]], auth, tmp_path,
                token_head["tmp"])  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "no coordinator running"
