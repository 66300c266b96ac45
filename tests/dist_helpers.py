"""Shared pieces of the distributed tests: tiny random Llama experts on disk, their text, a
short Ray temp dir, and the one-call helpers that drive a coordinator and agents in-process.

Experts: hidden 32, 2 layers, a WordLevel tokenizer; each domain's text uses its own words.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import tempfile
from pathlib import Path

import torch
from tiny_world import SPECIALS, make_config, make_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from dume_dist.distributed import genesis
from dume_dist.distributed.agent import NodeAgent
from dume_dist.distributed.coordinator import Coordinator, routers_of
from dume_dist.store import CURRENT, ObjectStore, VersionStore

WORDS_PER_DOMAIN = 40
DOMAINS = ("alpha", "beta", "gamma", "delta", "omega")
SETTINGS = {"routing": "paper", "max_tokens_per_seq": 16, "lam": 1e-2}
JOIN = {
    "max_tokens": 240,
    "seq_len": 16,
    "batch_size": 4,
    "threads": 1,
}


def _tokenizer(num_words: int):
    return make_tokenizer([f"w{i}" for i in range(num_words)])


def tiny_config(num_words: int) -> LlamaConfig:
    return make_config(vocab_size=len(SPECIALS) + num_words)


def make_experts(root: Path, domains=DOMAINS, seed: int = 0, docs: int = 12) -> dict:
    """{domain: {"expert": dir, "data": train.txt, "valid": valid.txt}} plus "base" dir."""
    root = Path(root)
    num_words = WORDS_PER_DOMAIN * len(DOMAINS)
    config = tiny_config(num_words)
    tokenizer = _tokenizer(num_words)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    out = {"base": root / "base"}
    for i, domain in enumerate(domains):
        g = torch.Generator().manual_seed(seed * 100 + i + 1)
        model = LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(torch.randn(p.shape, generator=g) * (0.3 if ".mlp." in name else 0.01))
        model.save_pretrained(root / "experts" / domain)
        tokenizer.save_pretrained(root / "experts" / domain)
        k = DOMAINS.index(domain)
        words = [f"w{j}" for j in range(k * WORDS_PER_DOMAIN, (k + 1) * WORDS_PER_DOMAIN)]
        rng = random.Random(seed * 1000 + k)
        paths = {}
        for split, n in (("train", docs), ("valid", 4)):
            text = "\n\n".join(
                " ".join(rng.choice(words) for _ in range(rng.randint(10, 30))) for _ in range(n)
            )
            path = root / "data" / domain / f"{split}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n")
            paths[split] = path
        out[domain] = {
            "expert": root / "experts" / domain,
            "data": paths["train"],
            "valid": paths["valid"],
        }
    return out


@contextlib.contextmanager
def local_ray_cluster(head_cpus: int = 1, node_resources: list[dict] | None = None,
                      namespace: str = "dume-test"):  # fmt: skip
    """A Ray cluster on this machine (a head, plus one node of 2 CPUs per ``node_resources``
    entry), connected to as the driver, in its own short RAY_TMPDIR; stopped by its handle and
    the environment restored on exit. Yields ``(cluster, nodes)``."""
    import shutil

    import ray
    from ray.cluster_utils import Cluster

    saved = os.environ.get("RAY_TMPDIR")
    tmpdir = short_ray_tmpdir()
    os.environ["RAY_TMPDIR"] = tmpdir
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False})  # fmt: skip
    nodes = [c.add_node(num_cpus=2, resources=r) for r in node_resources or []]
    try:
        ray.init(address=c.address, namespace=namespace, log_to_driver=False)
        if nodes:
            c.wait_for_nodes()
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()
        shutil.rmtree(tmpdir, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved


def short_ray_tmpdir() -> str:
    """A short temp dir for Ray (socket paths are limited to 107 bytes); RAY_TMPDIR points at it
    so this cluster's address file does not land in the shared /tmp/ray."""
    d = tempfile.mkdtemp(prefix="rd-", dir="/tmp")
    os.makedirs(os.path.join(d, "ray"), exist_ok=True)
    return d


class Flow:
    """A store, an in-process coordinator and credentials for some nodes."""

    def __init__(
        self, url, experts, tmp, backbone=None, storage_options=None, hold=False, settings=None
    ):
        self.url, self.experts, self.tmp = url, experts, tmp
        self.options = storage_options or {}
        self.store = ObjectStore(url, self.options)
        self.coord = Coordinator(url, self.options, work_dir=str(tmp / "coord"))
        backbone = backbone or f"base:{experts['base']}"
        self.founded, self.op = genesis.found(
            self.coord, self.store, backbone=backbone, founding={},
            settings=settings or SETTINGS, hold=hold,
        )  # fmt: skip
        self.creds: dict[str, str] = {}

    def add(self, *names):
        for name in names:
            secret, hashed = genesis.issue_node_credential(name, name)
            self.coord.add_node(self.op, name, name, hashed)
            self.creds[name] = secret

    def agent(self, name):
        return NodeAgent(
            self.coord, name, name, self.creds[name], cache_dir=str(self.tmp / "cache")
        )

    def join(self, name, data=None, expert=None, **kw):
        agent = self.agent(name)
        expert = expert or self.experts[name]["expert"]
        data = data or [self.experts[name]["data"]]
        return agent.join(str(expert), [str(d) for d in data], **{**JOIN, **kw})

    def status(self):
        return self.coord.status()

    def versions(self):
        return VersionStore(self.store, CURRENT.versions)

    def routers(self, vid):
        dest = self.tmp / f"pull-{hashlib.sha1(self.url.encode()).hexdigest()[:6]}-{vid}"
        if not dest.exists():
            self.versions().pull(vid, str(dest))
        return routers_of(dest)


def assert_same_routers(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
