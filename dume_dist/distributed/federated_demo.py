"""`dume demo --federated`: the demo's story with contributors who share no Ray cluster.

1. the operator's Ray cluster (a head; token auth with its own fresh token), the coordinator on
   a ``file://`` store, and its HTTP API (Ray Serve, HTTPS with a throwaway CA) on 127.0.0.1;
2. the operator registers five nodes; each founding contributor runs `dume node join
   --coordinator-url` in its own process, which starts its **own** Ray instance (its own GCS,
   its own token: the operator's is not in its environment) and reaches the coordinator only
   over HTTPS; publication is held until the four founders are in → **v1**;
3. a fifth contributor joins the same way → **v2**; one founder is unlearned → **v3**;
4. the API's URL and what each node sent (bytes by kind) are printed, the clusters are shut
   down, and the same tables as `dume demo` follow.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dume_dist.distributed import cluster, demo, genesis, tables
from dume_dist.distributed.calls import call
from dume_dist.store import ObjectStore, new_secret

NAMESPACE = "dume-federated"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_federated_demo(store: str | None = None, max_tokens: int = 20000, eval_tokens: int = 8192,
                       unlearn: str | None = None, json_out: str | None = None,
                       inputs: dict | None = None, settings: dict | None = None,
                       seq_len: int = 256) -> dict:  # fmt: skip
    """Run the story; returns ``{"versions", "ppl", "comparison", "api_url", "sent"}``."""
    inputs = inputs or demo.demo_inputs()
    settings = {**demo.SETTINGS, **(settings or {})}
    unlearn = unlearn or inputs["founding"][1]
    if unlearn not in inputs["founding"]:
        raise ValueError(f"--unlearn must be a founding domain ({', '.join(inputs['founding'])}), got {unlearn!r}")  # fmt: skip
    console = tables.console()
    work = Path(tempfile.mkdtemp(prefix="dume-fed-"))
    url = store or f"file://{work / 'store'}"
    t0 = time.perf_counter()
    try:
        opts = {"max_tokens": max_tokens, "seq_len": min(seq_len, settings["max_tokens_per_seq"])}
        api_url, sent = _story(console, url, work, inputs, settings, unlearn, opts)
        console.print(tables.sent_table(sent))
        console.print(f"[dim]federated part took {time.perf_counter() - t0:.0f} s; evaluating…[/dim]")  # fmt: skip
        result = demo._report_single_threaded(console, url, work, inputs, eval_tokens, seq_len)
        result.update(api_url=api_url, sent=sent)
        if json_out:
            Path(json_out).write_text(json.dumps(result, indent=2, default=str))
            console.print(f"wrote {json_out}")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _story(console, url, work, inputs, settings, unlearn, opts) -> tuple[str, dict]:
    from ray import serve

    from dume_dist.distributed.api import serve_api
    from dume_dist.distributed.tls import self_signed

    founding, joining = inputs["founding"], inputs["joining"]
    step = demo._step
    step(console, "the operator's Ray cluster: a head with the coordinator and its HTTP API")
    with cluster.LocalCluster(0, namespace=NAMESPACE):
        coord = cluster.start_coordinator(url, name="dume-coordinator", namespace=NAMESPACE,
                                          work_dir=str(work / "coordinator"),
                                          resources={"dume_coordinator": 0.01})  # fmt: skip
        _, op = genesis.found(coord, ObjectStore(url), backbone="average",
                              founding={d: inputs["experts"][d] for d in founding},
                              settings=settings, hold=True)  # fmt: skip
        tls = self_signed(work / "tls")
        api_url = serve_api("dume-coordinator", NAMESPACE, port=_free_port(),
                            tls_cert=str(tls["cert"]), tls_key=str(tls["key"]),
                            upload_dir=str(work / "uploads"))  # fmt: skip
        console.print(f"  coordinator API: [bold]{api_url}[/bold] (HTTPS; contributors pin its CA)")
        creds = _register(coord, op, [*founding, joining], work)
        console.print(f"  operator registered {len(creds)} nodes; each got a credential file, no cluster token")  # fmt: skip
        try:
            sent = {}
            step(
                console, "the founders join at once, each from a Ray cluster of its own, over HTTPS"
            )
            sent.update(_joins(console, api_url, tls["ca"], founding, creds, inputs, opts, work))
            v1 = call(coord, "publish", op)["version"]
            call(coord, "set_hold", op, False)
            step(console, f"operator published [bold]{v1}[/bold] and released the hold")
            step(console, f"contributor {joining!r} joins from a cluster of its own")
            sent.update(_joins(console, api_url, tls["ca"], [joining], creds, inputs, opts, work))
            step(console, f"the operator unlearns {unlearn!r}")
            out = call(coord, "unlearn", op, unlearn, "demo: contributor withdrew consent")
            console.print(f"  → [bold]{out['version']}[/bold]; marked: {', '.join(out['affected_versions'])}")  # fmt: skip
        finally:
            serve.shutdown()
            cluster.stop_coordinator("dume-coordinator", NAMESPACE)
        step(console, "shutting down the operator's cluster")
    return api_url, sent


def _register(coord, op: str, names: list[str], work: Path) -> dict[str, Path]:
    files = {}
    for name in names:
        secret = new_secret()
        call(coord, "add_node", op, name, name, *genesis.node_credential_record(name, name, secret))  # fmt: skip
        path = work / "credentials" / name
        path.parent.mkdir(exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        files[name] = path
    return files


def contributor_env() -> dict[str, str]:
    """The environment of a contributor's process: nothing of the operator's Ray cluster."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _joins(console, api_url, ca, names, creds, inputs, opts, work) -> dict[str, dict]:
    """`dume node join` of each of ``names`` in a process of its own, all at once (contributors
    are independent machines); returns what each sent, once every one has finished."""
    t0 = time.perf_counter()
    procs = {}
    try:
        for name in names:
            cmd = [sys.executable, "-m", "dume_dist.cli.main", "node", "join",
                   "--coordinator-url", api_url, "--ca-cert", str(ca), "--name", name,
                   "--domain", name, "--expert", inputs["experts"][name],
                   "--data", inputs["train"][name], "--credential-file", str(creds[name]),
                   "--cache-dir", str(work / f"cache-{name}"),
                   "--max-tokens", str(opts["max_tokens"]), "--seq-len", str(opts["seq_len"]),
                   "--no-progress", "--json", str(work / f"join-{name}.json")]  # fmt: skip
            with open(work / f"join-{name}.log", "w") as log:  # the child keeps its own copy
                procs[name] = subprocess.Popen(cmd, env=contributor_env(), stdout=log, stderr=log)
        codes, seconds = {}, {}
        while len(codes) < len(procs):  # each contributor's own time, not the slowest one's
            for name, proc in procs.items():
                if name not in codes and proc.poll() is not None:
                    codes[name], seconds[name] = proc.returncode, time.perf_counter() - t0
            time.sleep(0.1)
    except BaseException:  # interrupted: no contributor process outlives the demo
        for proc in procs.values():
            proc.kill()
            proc.wait()
        raise
    sent = {}
    for name in names:  # every process has ended before a failure is reported
        if codes[name] != 0:
            lines = (work / f"join-{name}.log").read_text().strip().splitlines()
            raise RuntimeError(f"contributor {name}'s join failed: {lines[-1:]}")
        result = json.loads((work / f"join-{name}.json").read_text())
        console.print(
            f"  {name:<10} own Ray cluster, {result['status']} "
            f"in {seconds[name]:.0f} s → {result.get('version') or '(held)'}"
        )
        sent[name] = {**result["sent_bytes"], "backbone received": result.get("received_bytes", 0)}
    return sent
