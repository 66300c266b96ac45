"""The federated deployment on this machine, with real parts only:

* the operator's Ray cluster: a head with the dashboard, started by this module; its
  coordinator and HTTP API (Ray Serve, HTTPS with a throwaway CA) are started the way an
  operator does it, `dume coordinator start --api-port ...` submitted through Ray's Jobs API
  (`JobSubmissionClient`); the store is S3 (moto on 127.0.0.1) with its own credentials;
* each contributor: `dume node join --coordinator-url ...` in its own process, which starts its
  own Ray instance (its own GCS, its own token) and talks to the coordinator only over HTTPS.

The whole flow (found, join, improve, leave, unlearn) gives routers bit-identical to the same
flow in one trust domain. Every endpoint refuses unsigned, wrongly signed, replayed, modified,
stale, oversize and undecodable requests; nothing a contributor can reach returns a secret.
One operator cluster for the module (~20 s to start, ~30 s for the job); contributors' clusters
are started once per join.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import torch
from dist_helpers import make_experts, short_ray_tmpdir
from s3server import S3Server

from dume_dist.distributed import genesis, signing
from dume_dist.distributed.agent import NodeAgent
from dume_dist.distributed.client import HttpTransport
from dume_dist.distributed.coordinator import Coordinator, routers_of
from dume_dist.distributed.tls import self_signed
from dume_dist.store import CURRENT, ObjectStore, VersionStore, new_secret

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "dume-fed"
SETTINGS = {"routing": "paper", "max_tokens_per_seq": 16}
JOIN = {"max_tokens": 240, "seq_len": 16, "batch_size": 4}
NODES = ("alpha", "beta", "gamma", "delta")
TOKEN = f"cluster-token-{uuid.uuid4().hex}"  # in the operator cluster's environment
STORE_SECRET = f"store-secret-{uuid.uuid4().hex}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(client, entrypoint: str, timeout_s: float = 900.0) -> tuple[str, str]:
    # The job takes ~30 s on a quiet 2-core machine; the limit only catches a hang, since a
    # loaded machine (another Ray cluster beside it) has taken over 240 s.
    from ray.job_submission import JobStatus

    env = {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "TQDM_DISABLE": "1"}
    deadline = time.monotonic() + timeout_s
    while True:
        try:  # the head's job agent comes up a few seconds after the dashboard
            job = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": env})
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1)
    while (status := client.get_job_status(job)) not in JobStatus.__members__.values() or not status.is_terminal():  # fmt: skip
        assert time.monotonic() < deadline, f"job {job} still {status}"
        time.sleep(1)
    return status.value, client.get_job_logs(job)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ray.job_submission import JobSubmissionClient

    tmp = tmp_path_factory.mktemp("fed")
    experts = make_experts(tmp / "experts", domains=NODES)
    tls = self_signed(tmp / "tls")
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_AUTH_TOKEN")}
    ray_tmp = short_ray_tmpdir()
    os.environ.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_TOKEN=TOKEN)
    s3 = S3Server(bucket=f"dume-fed-{uuid.uuid4().hex[:8]}").start()
    options = {**s3.storage_options, "key": "AKIADUMEFEDTEST", "secret": STORE_SECRET}
    from ray.cluster_utils import Cluster

    dashboard = free_port()
    # Ports of our own: another Ray on this host may hold the default agent port (52365).
    head = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dashboard, "dashboard_agent_listen_port": free_port()})  # fmt: skip
    ray.init(address=head.address, namespace=NAMESPACE, log_to_driver=False)
    world = {"tmp": tmp, "experts": experts, "tls": tls, "store": s3.url("fed"),
             "options": options, "port": free_port(), "op_file": tmp / "operator.credential"}  # fmt: skip
    try:
        world["jobs"] = JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
        entry = " ".join([
            sys.executable, "-m", "dume_dist.cli.main", "coordinator", "start",
            "--store", world["store"], *[f"--storage-option={k}={v}" for k, v in options.items()],
            "--backbone", f"base:{experts['base']}", "--routing", "paper", "--max-tokens-per-seq", "16",
            "--operator-credential-file", str(world["op_file"]), "--namespace", NAMESPACE,
            "--work-dir", str(tmp / "coordinator"), "--api-port", str(world["port"]),
            "--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"]),
            "--api-upload-dir", str(tmp / "uploads"), "--max-auth-failures", "1000",
            "--max-auth-failures-per-node", "1000",
        ])  # fmt: skip
        world["job"] = _job(world["jobs"], entry)
        world["url"] = f"https://127.0.0.1:{world['port']}"
        if world["job"][0] == "SUCCEEDED":
            world["coord"] = ray.get_actor("dume-coordinator", namespace=NAMESPACE)
            world["op"] = world["op_file"].read_text().strip()
            world["creds"] = {}
            for name in NODES:
                secret = new_secret()
                hashed, key = genesis.node_credential_record(name, name, secret)
                ray.get(world["coord"].add_node.remote(world["op"], name, name, hashed, key))
                world["creds"][name] = secret
        world["responses"] = []  # (node, body) of every reply a contributor got (the leak test)
        yield world
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        head.shutdown()
        s3.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _call(world, method, path, name="alpha", secret=None, body=b"", headers=None, sign_as=None,
          sent_body=None, ctype=None, now=None):  # fmt: skip
    """One request as a contributor; returns the response (its body is kept for the leak test)."""
    secret = world["creds"][sign_as or name] if secret is None else secret
    hdrs = signing.sign_request(name, name, secret, method, path, body, now=now)
    if body or sent_body or method != "GET":
        hdrs["content-type"] = ctype or (
            "application/octet-stream" if method == "PUT" else "application/json"
        )
    hdrs.update(headers or {})
    resp = requests.request(method, world["url"] + path, headers=hdrs, verify=str(world["tls"]["ca"]),
                            data=body if sent_body is None else sent_body, timeout=60)  # fmt: skip
    world["responses"].append((name, resp.text))
    return resp


def _revision(world) -> int:
    return ray.get(world["coord"].status.remote())["revision"]


def _join_cli(world, name, data, extra_env=None):
    """`dume node join --coordinator-url` in its own process (and its own Ray instance)."""
    cred = world["tmp"] / f"{name}.credential"
    cred.write_text(world["creds"][name] + "\n")
    cred.chmod(0o600)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") or k == "RAY_USAGE_STATS_ENABLED"}  # fmt: skip
    env.update(PYTHONPATH=str(REPO), TQDM_DISABLE="1", **(extra_env or {}))
    cmd = [sys.executable, "-m", "dume_dist.cli.main", "node", "join", "--coordinator-url",
           world["url"], "--ca-cert", str(world["tls"]["ca"]), "--name", name, "--domain", name,
           "--expert", str(world["experts"][name]["expert"]), "--data", *map(str, data),
           "--credential-file", str(cred), "--cache-dir", str(world["tmp"] / f"cache-{name}"),
           "--max-tokens", "240", "--seq-len", "16", "--batch-size", "4", "--no-progress"]  # fmt: skip
    # The limit is a hang guard: a join takes ~30 s on a quiet machine.
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_coordinator_start_through_the_jobs_api_founds_and_serves(world):
    status, logs = world["job"]
    assert status == "SUCCEEDED", logs[-3000:]
    assert "founded store" in logs and f"coordinator API serving at {world['url']}" in logs
    health = requests.get(world["url"] + "/v1/health", verify=str(world["tls"]["ca"]), timeout=30)
    assert health.json() == {"ok": True}
    with pytest.raises(requests.exceptions.SSLError):  # HTTPS with the operator's certificate
        requests.get(world["url"] + "/v1/health", verify=True, timeout=30)
    reg = ray.get(world["coord"].status.remote())["registry"]
    assert reg["backbone"]["fingerprint"] and set(reg["nodes"]) == set(NODES)


def _reference(world, tmp):
    """The same flow in one trust domain: in-process coordinator and agents, a file store."""
    url = str(tmp / "reference")
    coord = Coordinator(url, work_dir=str(tmp / "ref-coord"))
    _, op = genesis.found(coord, ObjectStore(url), backbone=f"base:{world['experts']['base']}",
                          founding={}, settings=SETTINGS)  # fmt: skip
    creds = {}
    for name in ("alpha", "beta", "gamma"):
        secret, hashed = genesis.issue_node_credential(name, name)
        coord.add_node(op, name, name, hashed)
        creds[name] = secret

    def join(name, data):
        agent = NodeAgent(coord, name, name, creds[name], cache_dir=str(tmp / "ref-cache"))
        return agent.join(str(world["experts"][name]["expert"]), [str(d) for d in data], **JOIN)

    exp = world["experts"]
    join("alpha", [exp["alpha"]["data"]])
    join("beta", [exp["beta"]["data"]])
    join("gamma", [exp["gamma"]["data"]])
    join("alpha", [exp["alpha"]["data"], exp["alpha"]["valid"]])
    coord.leave(creds["beta"], "beta", "beta")
    coord.unlearn(op, "gamma", "asked to be forgotten")
    return VersionStore(ObjectStore(url), CURRENT.versions)


def _routers(versions: VersionStore, vid: str, dest: Path):
    versions.pull(vid, str(dest))
    return routers_of(dest)


def test_whole_flow_through_the_api_is_bit_identical_to_one_cluster(world, tmp_path):
    torch.set_num_threads(1)
    exp = world["experts"]
    out = _join_cli(world, "alpha", [exp["alpha"]["data"]])
    assert "statistics accepted" in out and "latest version v1" in out
    assert "sent to the coordinator: requests" in out and "expert 49" in out
    _join_cli(world, "beta", [exp["beta"]["data"]])
    _join_cli(world, "gamma", [exp["gamma"]["data"]])
    out = _join_cli(world, "alpha", [exp["alpha"]["data"], exp["alpha"]["valid"]])  # improve
    assert "latest version v4" in out and "expert 0 B" in out  # the expert is not sent again
    leave = subprocess.run(
        [sys.executable, "-m", "dume_dist.cli.main", "node", "leave", "--coordinator-url",
         world["url"], "--ca-cert", str(world["tls"]["ca"]), "--name", "beta", "--domain", "beta"],
        env={**os.environ, "PYTHONPATH": str(REPO), "DUME_CREDENTIAL": world["creds"]["beta"]},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert leave.returncode == 0 and "latest version v5" in leave.stdout, leave.stderr
    out = ray.get(world["coord"].unlearn.remote(world["op"], "gamma", "asked to be forgotten"))
    assert out["version"] == "v6"

    fed = VersionStore(ObjectStore(world["store"], world["options"]), CURRENT.versions)
    ref = _reference(world, tmp_path)
    assert fed.list_versions() == ref.list_versions() == [f"v{i}" for i in range(1, 7)]
    for vid in fed.list_versions():
        a = _routers(fed, vid, tmp_path / f"fed-{vid}")
        b = _routers(ref, vid, tmp_path / f"ref-{vid}")
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), vid
        names = [[c["name"] for c in v.get_manifest(vid)["contributors"]] for v in (fed, ref)]
        assert names[0] == names[1]


# -- refusals ---------------------------------------------------------------------------------------

ENDPOINTS = [
    ("GET", "/v1/node/info", b""),
    ("GET", "/v1/node/status", b""),
    ("GET", "/v1/node/backbone/config.json", b""),
    (
        "POST",
        "/v1/node/uploads",
        json.dumps({"kind": "stats", "size": 10, "sha256": "0" * 64}).encode(),
    ),  # fmt: skip
    ("GET", f"/v1/node/uploads/{'0' * 32}", b""),
    ("PUT", f"/v1/node/uploads/{'0' * 32}?offset=0", b"0123456789"),
    (
        "POST",
        "/v1/node/expert",
        json.dumps({"upload": "0" * 32, "fingerprint": "0" * 64}).encode(),
    ),  # fmt: skip
    (
        "POST",
        "/v1/node/stats",
        json.dumps({"upload": "0" * 32, "submission_id": "0" * 64, "num_tokens": 1}).encode(),
    ),  # fmt: skip
    ("POST", "/v1/node/settle", b"{}"),
    ("POST", "/v1/node/leave", b"{}"),
    ("POST", "/v1/node/credential", b"{}"),
]


@pytest.mark.parametrize("method,path,body", ENDPOINTS, ids=[f"{m} {p.split('?')[0]}" for m, p, _ in ENDPOINTS])  # fmt: skip
def test_every_endpoint_refuses_bad_authentication(world, method, path, body):
    before = _revision(world)
    url = world["url"] + path
    plain = requests.request(method, url, data=body, verify=str(world["tls"]["ca"]), timeout=30,
                             headers={"content-type": "application/json"})  # fmt: skip
    assert plain.status_code == 401 and "unsigned" in plain.json()["error"]
    cases = {
        "wrong credential": dict(secret=new_secret()),
        "another node's credential": dict(sign_as="delta"),
        "modified body": dict(sent_body=body + b" " if body else b"{}"),
        "stale timestamp": dict(now=time.time() - 3600),
        "future timestamp": dict(now=time.time() + 3600),
        "another route": None,
    }
    for label, kw in cases.items():
        if kw is None:  # a valid signature for another route, used on this one
            other = "/v1/node/status" if path == "/v1/node/info" else "/v1/node/info"
            hdrs = signing.sign_request(
                "alpha", "alpha", world["creds"]["alpha"], "GET", other, b""
            )
            if body:
                hdrs["content-type"] = "application/octet-stream" if method == "PUT" else "application/json"  # fmt: skip
            resp = requests.request(method, url, data=body, verify=str(world["tls"]["ca"]),
                                    headers=hdrs, timeout=30)  # fmt: skip
            world["responses"].append(("alpha", resp.text))
        else:
            resp = _call(world, method, path, body=body, **kw)
        assert resp.status_code == 401, (label, resp.status_code, resp.text)
        expired = label.endswith("timestamp")
        assert resp.json() == {"error": signing.EXPIRED if expired else "authentication failed", "retry": expired}  # fmt: skip
    assert _revision(world) == before


def test_replayed_request_is_refused(world):
    hdrs = signing.sign_request("alpha", "alpha", world["creds"]["alpha"], "GET", "/v1/node/info", b"")  # fmt: skip
    first = requests.get(world["url"] + "/v1/node/info", headers=hdrs, verify=str(world["tls"]["ca"]), timeout=30)  # fmt: skip
    again = requests.get(world["url"] + "/v1/node/info", headers=hdrs, verify=str(world["tls"]["ca"]), timeout=30)  # fmt: skip
    assert first.status_code == 200 and again.status_code == 401
    world["responses"] += [("alpha", first.text), ("alpha", again.text)]


def _raw(world, request: bytes, read_s: float = 20.0) -> bytes:
    ctx = ssl.create_default_context(cafile=str(world["tls"]["ca"]))
    with socket.create_connection(("127.0.0.1", world["port"]), timeout=read_s) as sock:
        with ctx.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            tls.sendall(request)
            reply = b""
            while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
                re.search(rb"content-length: (\d+)", reply, re.I).group(1)
                if re.search(rb"content-length: (\d+)", reply, re.I) else 0
            ):  # fmt: skip
                piece = tls.recv(65536)
                if not piece:
                    break
                reply += piece
            return reply


@pytest.mark.parametrize("method,path,limit", [("POST", "/v1/node/stats", "65536"),
                                               ("PUT", f"/v1/node/uploads/{'0' * 32}?offset=0", "8388608")])  # fmt: skip
def test_oversize_body_is_refused_before_it_is_read(world, method, path, limit):
    hdrs = signing.sign_request("alpha", "alpha", world["creds"]["alpha"], method, path, b"")
    hdrs.update({"content-length": str(10**12), "content-type": "application/json", "host": "127.0.0.1"})  # fmt: skip
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"  # fmt: skip
    t0 = time.monotonic()
    reply = _raw(world, head.encode())  # not one byte of the terabyte is sent
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert limit.encode() in reply and time.monotonic() - t0 < 20


def _upload(world, name, kind, data):
    """A finished upload through the API (as the client would make it); returns its id."""
    link = HttpTransport(world["url"], name, name, world["creds"][name], ca_cert=str(world["tls"]["ca"]))  # fmt: skip
    return link.upload(kind, data)


def test_pickle_and_undecodable_payloads_are_refused(world):
    before = _revision(world)
    evil = pickle.dumps({"__reduce__": "os.system"})
    resp = _call(world, "POST", "/v1/node/leave", name="delta", body=evil)
    assert resp.status_code == 400 and resp.json()["error"] == "body is not valid JSON"
    resp = _call(world, "POST", "/v1/node/leave", name="delta", body=evil, ctype="application/octet-stream")  # fmt: skip
    assert resp.status_code == 415
    resp = _call(world, "POST", "/v1/node/leave", name="delta", body=b"[1, 2]")
    assert resp.status_code == 400 and "JSON object" in resp.json()["error"]
    resp = _call(world, "POST", "/v1/node/leave", name="delta", body=b'{"x": NaN}')
    assert resp.status_code == 400
    # A pickle uploaded as statistics stays bytes: the coordinator refuses it as safetensors.
    upload = _upload(world, "delta", "stats", evil)
    body = json.dumps({"upload": upload, "submission_id": "1" * 64, "num_tokens": 5}).encode()
    resp = _call(world, "POST", "/v1/node/stats", name="delta", body=body)
    assert resp.status_code == 400, resp.text
    upload = _upload(world, "delta", "expert", evil)
    body = json.dumps({"upload": upload, "fingerprint": "2" * 64}).encode()
    resp = _call(world, "POST", "/v1/node/expert", name="delta", body=body)
    assert resp.status_code == 400, resp.text
    assert _revision(world) == before
    state = ray.get(world["coord"].status.remote())["registry"]["nodes"]["delta"]
    assert state["state"] == "registered" and state["expert"] is None and state["stats"] == []


@pytest.mark.parametrize("name", ["../alpha", "a/b", "..", "alpha\\x", ".hidden"])
def test_names_with_separators_are_refused(world, name):
    hdrs = signing.sign_request(name, name, world["creds"]["alpha"], "GET", "/v1/node/info", b"")
    resp = requests.get(world["url"] + "/v1/node/info", headers=hdrs, verify=str(world["tls"]["ca"]), timeout=30)  # fmt: skip
    assert resp.status_code == 400 and "invalid" in resp.json()["error"]
    world["responses"].append((name, resp.text))


@pytest.mark.parametrize("path", ["/v1/node/backbone/../registry/000000000001.json",
                                  "/v1/node/backbone/%2E%2E/%2E%2E/etc/passwd",
                                  "/v1/node/uploads/..%2F..%2Fetc"])  # fmt: skip
def test_paths_with_dot_dot_are_refused(world, path):
    """Sent byte for byte (an HTTP library would normalise the dots away), validly signed."""
    hdrs = signing.sign_request("alpha", "alpha", world["creds"]["alpha"], "GET", path, b"")
    head = f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n"
    reply = _raw(
        world, (head + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n").encode()
    )
    status = int(reply.split(b" ", 2)[1])
    assert status in (400, 404), reply[:300]
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])  # a one-line refusal, no file content
    assert len(body) == 1 and len(str(body)) < 200 and b"root:" not in reply


def test_interrupted_upload_resumes(world):
    data = os.urandom(50_000)
    first = HttpTransport(world["url"], "delta", "delta", world["creds"]["delta"],
                          ca_cert=str(world["tls"]["ca"]), chunk_bytes=20_000)  # fmt: skip
    meta = {"kind": "holdout", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    upload = first._json("POST", "/v1/node/uploads", meta)["upload"]
    first._send("PUT", f"/v1/node/uploads/{upload}?offset=0", data[:20_000], "holdout")
    # the process dies here; a new one uploads the same payload and sends only the rest
    second = HttpTransport(world["url"], "delta", "delta", world["creds"]["delta"],
                           ca_cert=str(world["tls"]["ca"]), chunk_bytes=20_000)  # fmt: skip
    assert second.upload("holdout", data) == upload
    assert second.sent["holdout"] == 30_000
    state = second._json("GET", f"/v1/node/uploads/{upload}")
    assert state == {"upload": upload, "received": 50_000, "size": 50_000}


class _KillingTransport(HttpTransport):
    """Kills the coordinator actor (Ray restarts it) once, after the first chunk of statistics."""

    def __init__(self, *a, coord=None, **kw):
        super().__init__(*a, **kw)
        self.coord, self.killed = coord, False

    def _send(self, method, path, body, kind, **kw):
        out = super()._send(method, path, body, kind, **kw)
        if kind == "stats" and not self.killed:
            self.killed = True
            ray.kill(self.coord, no_restart=False)
        return out


def test_coordinator_restarted_mid_upload_counts_once(world, tmp_path):
    torch.set_num_threads(1)
    link = _KillingTransport(world["url"], "delta", "delta", world["creds"]["delta"],
                             ca_cert=str(world["tls"]["ca"]), chunk_bytes=2048,
                             coord=world["coord"])  # fmt: skip
    agent = NodeAgent(link, "delta", "delta", None, cache_dir=str(tmp_path / "cache"))
    exp = world["experts"]["delta"]
    result = agent.join(str(exp["expert"]), [str(exp["data"])], threads=1, **JOIN)
    assert link.killed and result["status"] == "accepted"
    again = NodeAgent(link, "delta", "delta", None, cache_dir=str(tmp_path / "cache")).join(
        str(exp["expert"]), [str(exp["data"])], threads=1, **JOIN
    )
    assert again["status"] == "duplicate" and again["skipped_compute"]
    # the statistics submit replayed by hand (a retry after a lost response) counts once too
    upload = link.upload("stats", agent.compute(agent.job(
        agent.fetch_backbone(), str(exp["expert"]), result["expert_fingerprint"], [str(exp["data"])],
        {"max_tokens": 240, "seq_len": 16, "batch_size": 4}), threads=1)["stats"])  # fmt: skip
    body = {"upload": upload, "submission_id": result["submission_id"], "num_tokens": 1}
    assert link._json("POST", "/v1/node/stats", body)["status"] == "duplicate"
    node = ray.get(world["coord"].status.remote())["registry"]["nodes"]["delta"]
    assert len(node["stats"]) == 1 and node["state"] == "active"


def test_rotation_keeps_the_contribution(world, tmp_path):
    from dume_dist.cli.main import main

    before = ray.get(world["coord"].status.remote())["registry"]["nodes"]["alpha"]
    old = world["creds"]["alpha"]
    out = tmp_path / "alpha.new"
    os.environ["DUME_CREDENTIAL"] = old
    try:
        assert main(["node", "rotate-credential", "--coordinator-url", world["url"], "--ca-cert",
                     str(world["tls"]["ca"]), "--name", "alpha", "--domain", "alpha",
                     "--credential-out", str(out)]) == 0  # fmt: skip
    finally:
        del os.environ["DUME_CREDENTIAL"]
    new = out.read_text().strip()
    assert _call(world, "GET", "/v1/node/info", secret=old).status_code == 401
    assert _call(world, "GET", "/v1/node/info", secret=new).status_code == 200
    # the operator rotates it again (a leaked credential), from the operator's cluster
    op_out = tmp_path / "alpha.op"
    assert main(["admin", "rotate-credential", "--name", "alpha", "--credential-out", str(op_out),
                 "--operator-credential-file", str(world["op_file"]), "--namespace", NAMESPACE]) == 0  # fmt: skip
    world["creds"]["alpha"] = op_out.read_text().strip()
    assert _call(world, "GET", "/v1/node/info", secret=new).status_code == 401
    info = _call(world, "GET", "/v1/node/info").json()
    after = ray.get(world["coord"].status.remote())["registry"]["nodes"]["alpha"]
    assert after["stats"] == before["stats"] and after["expert"] == before["expert"]
    assert info["submissions"] == [s["submission_id"] for s in before["stats"]]


def test_contributor_cannot_obtain_secrets_or_other_nodes_data(world):
    for method, path, body in ENDPOINTS[:3]:
        _call(world, method, path, name="delta", body=body)
    status = _call(world, "GET", "/v1/node/status", name="delta").json()
    assert set(status) == {"state", "expert", "submissions", "latest", "hold", "versions"}
    info = _call(world, "GET", "/v1/node/info", name="delta").json()
    assert "prefix" not in info["backbone"] and "sources" not in info["backbone"]
    registry = ray.get(world["coord"].status.remote())["registry"]
    everyones = {  # nobody may see these
        "operator credential": world["op"],
        "store secret": STORE_SECRET,
        "store key": world["options"]["key"],
        "store url": world["store"],
        "cluster token": TOKEN,
        "coordinator work dir": str(world["tmp"] / "coordinator"),
    }
    assert len(world["responses"]) > 50  # successes and refusals of every endpoint
    for receiver, text in world["responses"]:
        forbidden = dict(everyones)
        for n in NODES:
            if n == receiver:
                continue
            rec = registry["nodes"][n]
            forbidden[f"{n}'s credential"] = world["creds"][n]
            forbidden.update({f"{n}'s statistics": s["sha256"] for s in rec["stats"]})
            if rec["expert"]:
                forbidden[f"{n}'s expert"] = rec["expert"]["fingerprint"]
        for label, value in forbidden.items():
            assert value not in text, f"{label} leaked to {receiver}: {text[:200]}"


def test_failed_authentications_are_throttled(world):
    """Last in the module: redeploys the API with small limits."""
    from dume_dist.distributed.api import ApiLimits, serve_api

    serve_api("dume-coordinator", NAMESPACE, port=world["port"], tls_cert=str(world["tls"]["cert"]),
              tls_key=str(world["tls"]["key"]), upload_dir=str(world["tmp"] / "uploads"),
              limits=ApiLimits(failures_per_node=3, failures_per_address=5))  # fmt: skip

    def info(name, secret=None):
        return _call(world, "GET", "/v1/node/info", name=name, secret=secret)

    for _ in range(3):
        assert info("alpha", new_secret()).status_code == 401
    refused = info("alpha")  # per node: now even the right credential waits
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    assert "retry later" in refused.json()["error"]
    assert info("delta").status_code == 200  # another node is not held up by alpha's
    assert info("gamma", new_secret()).status_code == 401
    assert info("gamma", new_secret()).status_code == 401
    # per address: five failures from 127.0.0.1 in the window, whatever nodes they named
    assert info("delta").status_code == 429


def test_api_refuses_to_claim_tls_serve_does_not_speak(world):
    """Last: a Serve instance keeps the HTTP options it started with; asking it for plain HTTP
    (or another port) is an error, never a silently different API (the app is removed)."""
    from dume_dist.distributed.api import serve_api

    with pytest.raises(ValueError, match="HTTPS on port"):
        serve_api("dume-coordinator", NAMESPACE, port=world["port"])
    with pytest.raises(ValueError, match="nothing on port"):
        serve_api("dume-coordinator", NAMESPACE, port=free_port())
