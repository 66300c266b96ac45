"""`StatsJob`: what a node agent asks its statistics workers to compute (one typed record
instead of a dict read by key in the agent and the workers)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StatsJob:
    name: str  # the node (and its expert's name)
    domain: str
    backbone_dir: str  # the node's cached backbone directory
    expert_dir: str
    data: list[str]  # the node's local data files
    backbone_fingerprint: str
    expert_fingerprint: str
    submission_id: str  # names the contribution by what determines it (`agent.submission_id`)
    batch_size: int
    seq_len: int
    max_tokens_per_seq: int
    max_tokens: int | None
    holdout_fraction: float = 0.0  # share of documents held out (0: no held-out statistics)
    holdout_smoothings: list[float] = field(default_factory=list)  # one held-out part per key
    dp_clip: float | None = None  # differential privacy: each token's feature norm bound (Grams)
    dp_count_cap: int | None = None  # differential privacy: most a sequence adds to one count
    private: bool = False  # differential privacy: collect what the node's mechanism needs
    routing: dict = field(default_factory=dict)  # the coordinator's RoutingSpec (JSON)
    # What the statistics of the routing's kind depend on (`RouterKind.statistics_settings`,
    # e.g. features, ngram_buckets); readable as attributes.
    statistics: dict = field(default_factory=dict)

    def __getattr__(self, name):
        statistics = self.__dict__.get("statistics") or {}
        if name in statistics:
            return statistics[name]
        raise AttributeError(name)
