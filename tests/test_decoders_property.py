"""Property-based tests (hypothesis) of every decoder a contributor's bytes reach — statistics
and n-gram counts, expert uploads, request fields and metadata — and of the name rules: whatever
the input, the answer is a result or a one-line refusal (ValueError / PermissionError), never
another exception, and a refusal never changes the store."""

from __future__ import annotations

import json
import re

import pytest
import torch
from dist_helpers import Flow, make_experts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dume_dist.core.header import parse_header
from dume_dist.model.kinds import stats_from_bytes
from dume_dist.store import CURRENT, BlobStore
from dume_dist.store.names import check_name, is_name
from dume_dist.store.objectstore import check_key

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
REFUSALS = (ValueError, PermissionError)


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("prop")
    experts = make_experts(tmp / "experts", domains=("alpha", "beta"))
    flow = Flow(str(tmp / "store"), experts, tmp)
    flow.add("alpha", "beta")
    flow.join("alpha")
    state = flow.status()["registry"]["nodes"]["alpha"]
    blobs = BlobStore(flow.store, CURRENT.blobs)
    flow.stats = blobs.get_blob(state["stats"][0]["blob"])
    flow.mlp = blobs.get_blob(state["expert"]["blob"])
    flow.fingerprint = state["expert"]["fingerprint"]
    flow.before = (flow.status(), flow.store.list())
    return flow


def refused_or_done(flow, fn, *args) -> None:
    try:
        fn(*args)
    except REFUSALS as exc:
        assert "\n" not in str(exc), str(exc)
        assert (flow.status(), flow.store.list()) == flow.before  # a refusal changed nothing
    else:  # accepted: only a well-formed submission can be; put the store back is not needed
        raise AssertionError(f"{fn.__name__} accepted a mutated input")


def _flip(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1, max_size=8)


# -- statistics ---------------------------------------------------------------------------------


@SETTINGS
@given(data=st.binary(max_size=4096))
def test_arbitrary_bytes_as_statistics(flow, data):
    refused_or_done(flow, flow.coord.submit_stats, flow.creds["alpha"], "alpha", "alpha", data,
                    "sub-p", 240)  # fmt: skip


@SETTINGS
@given(changes=edits)
def test_mutated_statistics(flow, changes):
    """Bytes of the length prefix and header changed (a changed tensor value may be valid
    statistics: the numeric checks have their own tests)."""
    head = 8 + int.from_bytes(flow.stats[:8], "little")
    data = _flip(flow.stats, [(pos % head, value) for pos, value in changes])
    if data == flow.stats:
        return
    tokens = 240
    refused_or_done(flow, flow.coord.submit_stats, flow.creds["alpha"], "alpha", "alpha", data,
                    "sub-p", tokens)  # fmt: skip


def _header(data: bytes) -> dict:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size])


def _with_header(data: bytes, header: dict) -> bytes:
    old = int.from_bytes(data[:8], "little")
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + old :]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),  # fmt: skip
    max_leaves=12,
)


@SETTINGS
@given(field=st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "extra", "name"]),
       value=json_values)  # fmt: skip
def test_statistics_with_a_mutated_header(flow, field, value):
    header = _header(flow.stats)
    if field == "__metadata__":
        header["__metadata__"] = value
    elif field == "extra":
        header["__metadata__"]["extra"] = value if isinstance(value, str) else json.dumps(value)
        if header["__metadata__"]["extra"] == "{}":
            return
    elif field == "name":
        header[str(value)[:30] or "x"] = header.pop("gram_packed")
        if "gram_packed" in header:
            return
    else:
        header["gram_packed"][field] = value
    data = _with_header(flow.stats, header)
    refused_or_done(flow, flow.coord.submit_stats, flow.creds["alpha"], "alpha", "alpha", data,
                    "sub-p", 240)  # fmt: skip


@SETTINGS
@given(data=st.binary(max_size=2048))
def test_decoders_refuse_in_one_line(data):
    for decode in (parse_header, stats_from_bytes):
        try:
            decode(data)
        except ValueError as exc:
            assert "\n" not in str(exc)


# -- request fields and metadata ------------------------------------------------------------------


anything = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=300),
                     st.binary(max_size=64), st.lists(st.integers(), max_size=3),
                     st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))  # fmt: skip


@SETTINGS
@given(sub_id=anything, tokens=anything, holdout=anything)
def test_submission_fields(flow, sub_id, tokens, holdout):
    if isinstance(sub_id, str) and sub_id.isprintable() and 0 < len(sub_id) <= 256:
        return  # a valid id: the duplicate of alpha's accepted submission (tested elsewhere)
    refused_or_done(flow, flow.coord.submit_stats, flow.creds["alpha"], "alpha", "alpha",
                    flow.stats, sub_id, tokens, holdout)  # fmt: skip


@SETTINGS
@given(secret=anything, name=anything, domain=anything)
def test_credentials_and_identity_fields(flow, secret, name, domain):
    refused_or_done(flow, flow.coord.node_info, secret, name, domain)
    refused_or_done(flow, flow.coord.leave, secret, name, domain)


# -- expert uploads -------------------------------------------------------------------------------


@SETTINGS
@given(changes=edits, fingerprint=st.text(min_size=1, max_size=64))
def test_mutated_expert_uploads(flow, changes, fingerprint):
    mlp = _flip(flow.mlp, changes)
    refused_or_done(flow, flow.coord.register_expert, flow.creds["beta"], "beta", "beta", mlp,
                    fingerprint if fingerprint != flow.fingerprint else "f" * 64)  # fmt: skip


@SETTINGS
@given(data=st.binary(max_size=2048))
def test_arbitrary_expert_uploads(flow, data):
    refused_or_done(flow, flow.coord.register_expert, flow.creds["beta"], "beta", "beta", data,
                    "a" * 64)  # fmt: skip


# -- name rules -----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(name=st.text(max_size=80) | st.from_regex(r"[A-Za-z0-9._-]{1,70}\n?", fullmatch=True))
def test_name_rule(name):
    ok = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) is not None
    assert is_name(name) == ok
    if ok:
        assert check_name("node name", name) == name
        check_key(f"private/blobs/stats/{name}/x.bin")  # always a valid store key
    else:
        with pytest.raises(ValueError) as err:
            check_name("node name", name)
        assert "\n" not in str(err.value)


@SETTINGS
@given(name=st.text(max_size=70), domain=st.text(max_size=70))
def test_add_node_with_any_name(flow, name, domain):
    from dume_dist.distributed import genesis

    if is_name(name) and is_name(domain):
        return  # a valid registration (tested elsewhere)
    _, hashed = genesis.issue_node_credential("n", "n")
    refused_or_done(flow, flow.coord.add_node, flow.op, name, domain, hashed)


# -- n-gram counts --------------------------------------------------------------------------------


def _ngram_blob(pairs: bool) -> bytes:
    from dume_dist.core.ngram import NgramStats, ngram_to_bytes

    uni = torch.tensor([3.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    ctx = torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    big = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    pairs_K3 = torch.tensor([[0, 1, 1], [1, 3, 1]], dtype=torch.int64) if pairs else None
    return ngram_to_bytes(NgramStats(uni, ctx, big, pairs_K3=pairs_K3))


@SETTINGS
@given(changes=edits, pairs=st.booleans(), header_only=st.booleans())
def test_mutated_ngram_counts_decode_or_refuse_in_one_line(changes, pairs, header_only):
    """The n-gram decoder and every check a coordinator runs on counts: a mutated blob decodes
    to counts that pass them, or is refused in one line."""
    from dume_dist.core.ngram import BIGRAM_FORMS, NgramStats, check_count_values, ngram_layout
    from dume_dist.core.stats import MAX_TOKENS

    blob = _ngram_blob(pairs)
    head = 8 + int.from_bytes(blob[:8], "little")
    data = _flip(blob, [((p % head) if header_only else p, v) for p, v in changes])
    try:
        _, entries = parse_header(data)
        from dume_dist.core.header import check_layout

        optional = ("pairs", *BIGRAM_FORMS)
        check_layout("statistics blob", entries, ngram_layout(4, 8, True), optional=optional)
        stats = stats_from_bytes(data)
        assert isinstance(stats, NgramStats)
        stats.validate(vocab_size=4, buckets=8)
        check_count_values(stats, MAX_TOKENS)
    except ValueError as exc:
        assert "\n" not in str(exc)


def _gram_blob() -> bytes:
    from dume_dist.core.stats import RouterStats
    from dume_dist.model.kinds import stats_to_bytes

    x_NP = torch.cat([torch.randn(50, 5, generator=torch.Generator().manual_seed(0),
                                  dtype=torch.float64), torch.ones(50, 1, dtype=torch.float64)], 1)  # fmt: skip
    gram_LPP = (x_NP.T @ x_NP)[None].repeat(2, 1, 1)
    return stats_to_bytes(RouterStats(gram_LPP, "token", "b" * 64, "e" * 64))


@settings(max_examples=300, deadline=None)
@given(changes=edits, header_only=st.booleans())
def test_mutated_gram_blob_decodes_or_refuses_in_one_line(changes, header_only):
    """The Gram decoder and every check a coordinator runs on it, at core level (many examples
    cheaply; `test_mutated_statistics` runs the same through a coordinator)."""
    from dume_dist.core.header import check_layout
    from dume_dist.core.stats import check_gram_values, gram_layout

    blob = _gram_blob()
    head = 8 + int.from_bytes(blob[:8], "little")
    data = _flip(blob, [((p % head) if header_only else p, v) for p, v in changes])
    try:
        _, entries = parse_header(data)
        check_layout("statistics blob", entries, gram_layout(2, 5))
        stats = stats_from_bytes(data)
        stats.validate(num_layers=2, feature_dim=5)
        check_gram_values(stats.gram_LPP, torch.full((2,), 100.0, dtype=torch.float64))
    except ValueError as exc:
        assert "\n" not in str(exc)
