"""distributed: DUME over Ray — the coordinator, node agents and statistics workers (DESIGN §4).

* `state`       the registry document and its pure rules (canonical order, content digest)
* `coordinator` `Coordinator`: registry, validation, solve, publish, unlearn (a plain class)
* `agent`       `NodeAgent`: one contributor's join, pinned to its node (a plain class)
* `workers`     `StatsWorker`: one per GPU (NCCL) or one CPU worker (gloo), all_reduce of the Gram
* `artifacts`   the backbone and expert-MLP payloads, adapted from `dume_dist.model`
* `genesis`     founding a store (client side): backbone build and upload, operator credential
* `cluster`     Ray glue: launching the actors, `get`, `LocalCluster` for the demo and the bench
* `demo`, `tables`   `dume demo` and the rich tables

See docs/distributed.md for the flows, the security model and the failure model.
"""
