"""distributed: DUME over Ray — the coordinator, node agents and statistics workers (DESIGN §4).

* `state`       the registry as typed records (`Registry`, `NodeRecord`, `NodeState`, ...) and its
                pure rules (canonical order, content digest)
* `transitions` every registry change, one function per transition, along `ALLOWED`
* `identity`    operator and node credentials: materials, checks (one refusal message)
* `validation`  settings at genesis, every field of a submission, statistics checks
* `publishing`  solve, write and upload a version; marks of versions with unlearned nodes
* `workspace`   the coordinator's local cache of the backbone and expert MLPs
* `coordinator` `Coordinator`: authenticate, validate, transition, save, publish (a plain class)
* `calls`       `call`: one way to call an actor handle or a plain object
* `agent`       `NodeAgent`: one contributor's join, pinned to its node (a plain class)
* `workers`     `StatsWorker`: one per GPU (NCCL) or one CPU worker (gloo), all_reduce of the Gram
* `artifacts`   the backbone and expert-MLP payloads, adapted from `dume_dist.model`
* `genesis`     founding a store (client side): backbone build and upload, operator credential
* `cluster`     Ray glue: launching the actors, `get`, `LocalCluster` for the demo and the bench
* `demo`, `tables`   `dume demo` and the rich tables

Federated deployment (contributors on their own Ray clusters):

* `api`         the coordinator's HTTP API: a Ray Serve application (FastAPI) in front of the actor
* `signing`     Ed25519 request signatures, the replay guard, the failed-authentication throttle
* `client`      `HttpTransport`: the node agent's side of the API (resumable uploads, retries)
* `tls`         a throwaway CA and server certificate (demo, tests)
* `federated_demo`   `dume demo --federated`

See docs/distributed.md for the flows, the security model and the failure model.
"""
