"""Domain text: loading documents, batching tokens for statistics, windows for perplexity.

Documents come from ``.txt`` files (documents separated by blank lines), ``.jsonl`` files (one
JSON object with a ``text`` field per line), or a directory of such files (its ``.txt`` and
``.jsonl`` files, sorted by name, not recursing). Everything here is deterministic: the same texts and
settings give the same batches, and ``shard`` splits work between workers without overlap.

Shape legend: B batch, T sequence length.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

_BLANK_LINES = re.compile(r"\n[ \t]*\n")
_TOKENIZE_CHUNK = 256  # documents per tokenizer call (the fast tokenizer batches in Rust)


DATA_SUFFIXES = (".txt", ".jsonl")


def data_files(path: str | Path) -> list[Path]:
    """The files ``read_documents(path)`` reads: ``path`` itself, or a directory's ``.txt`` and
    ``.jsonl`` files sorted by name. ValueError (one line) when there is none."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise ValueError(f"data directory {path} has no .txt or .jsonl file")
        return files
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    if path.suffix not in DATA_SUFFIXES:
        raise ValueError(f"data file {path} must be .txt or .jsonl (or a directory of them)")
    return [path]


def read_documents(path: str | Path) -> list[str]:
    """Non-empty documents of one ``.txt`` or ``.jsonl`` file, or of a directory's such files."""
    files = data_files(path)
    if len(files) > 1 or files[0] != Path(path):
        return [doc for file in files for doc in read_documents(file)]
    path = files[0]
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the text
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"data file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start})"
        ) from None
    if path.suffix == ".txt":
        docs = _BLANK_LINES.split(text.replace("\r\n", "\n"))
    else:
        docs = [
            _jsonl_text(path, i, line)
            for i, line in enumerate(text.splitlines(), 1)
            if line.strip()
        ]
    return [d.strip() for d in docs if d.strip()]


def _jsonl_text(path: Path, lineno: int, line: str) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        raise ValueError(f"{path}:{lineno} is not valid JSON") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{path}:{lineno} has no string 'text' field")
    return record["text"]


def load_texts(paths: str | Path | Sequence[str | Path], domain: str = "data") -> list[str]:
    """All documents of a domain's files, in file order; an empty domain is an error naming it."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    docs = [doc for path in paths for doc in read_documents(path)]
    if not docs:
        files = ", ".join(map(str, paths)) or "none"
        raise ValueError(f"domain {domain} has no text (files: {files})")
    return docs


def load_domain_texts(domain: str, paths: str | Path | Sequence[str | Path]) -> list[str]:
    return load_texts(paths, domain=domain)


def keep_mask(mask_BT: torch.Tensor, max_tokens_per_seq: int) -> torch.Tensor:
    """Real tokens among the first ``max_tokens_per_seq`` real tokens of each sequence (so left
    padding is handled too): the tokens statistics count."""
    real_BT = mask_BT.bool()
    rank_BT = real_BT.long().cumsum(dim=1)  # 1-based position among the real tokens
    return real_BT & (rank_BT <= max_tokens_per_seq)


def shard(items: Sequence, rank: int, world: int) -> list:
    """Round-robin share of ``rank`` among ``world`` workers (disjoint, covering, deterministic)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank} world={world}")
    return list(items[rank::world])


def _token_ids(tokenizer, texts: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of each document, with the tokenizer's own special tokens (BOS for Llama)."""
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == _TOKENIZE_CHUNK:
            yield from tokenizer(chunk)["input_ids"]
            chunk = []
    if chunk:
        yield from tokenizer(chunk)["input_ids"]


def pad_id_of(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    return 0


def _sequences(tokenizer, texts, seq_len, max_tokens_per_seq, max_tokens) -> Iterator[list[int]]:
    """Each document cut into windows of ``seq_len``; each window keeps its leading
    ``max_tokens_per_seq`` tokens (later ones cannot influence them: the model is causal)."""
    keep = min(seq_len, max_tokens_per_seq)
    budget = max_tokens
    for ids in _token_ids(tokenizer, texts):
        for start in range(0, len(ids), seq_len):
            seq = ids[start : start + keep]
            if budget is not None:
                seq = seq[:budget]
                budget -= len(seq)
            if seq:
                yield seq
            if budget is not None and budget <= 0:
                return


def token_batches(
    tokenizer,
    texts: Iterable[str],
    batch_size: int,
    seq_len: int,
    max_tokens_per_seq: int,
    max_tokens: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids_BT, attention_mask_BT)`` batches, right-padded with the pad token masked out.

    Batches are padded to their longest sequence; ``max_tokens`` caps the total of real tokens.
    """
    for key, value in (
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("max_tokens_per_seq", max_tokens_per_seq),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    pad = pad_id_of(tokenizer)
    batch: list[list[int]] = []
    for seq in _sequences(tokenizer, texts, seq_len, max_tokens_per_seq, max_tokens):
        batch.append(seq)
        if len(batch) == batch_size:
            yield _pad(batch, pad)
            batch = []
    if batch:
        yield _pad(batch, pad)


def _pad(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in batch)
    ids_BT = torch.full((len(batch), width), pad, dtype=torch.long)
    mask_BT = torch.zeros((len(batch), width), dtype=torch.long)
    for i, seq in enumerate(batch):
        ids_BT[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask_BT[i, : len(seq)] = 1
    return ids_BT, mask_BT


def eval_windows(
    tokenizer,
    texts: Iterable[str],
    seq_len: int,
    batch_size: int = 8,
    max_tokens: int | None = None,
    name: str = "text",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Perplexity batches ``(input_ids_BT, attention_mask_BT)`` of fixed, non-overlapping windows
    of ``seq_len`` tokens over the concatenated documents (the last window may be shorter: it is
    right-padded and masked).

    With ``max_tokens``, ``max_tokens // seq_len`` windows (at least one) spread evenly over the
    whole text: the first windows of a corpus are rarely representative. Deterministic.
    ``name`` (e.g. ``domain python``) names the text in the error when it is too short.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 for perplexity, got {seq_len!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    stream = [t for ids in _token_ids(tokenizer, texts) for t in ids]
    windows = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError(f"{name} has {len(stream)} tokens: too short to evaluate")
    if max_tokens is not None:
        wanted = max(1, max_tokens // seq_len)
        if wanted < len(windows):
            pick = torch.linspace(0, len(windows) - 1, wanted).round().long().unique().tolist()
            windows = [windows[i] for i in pick]
    pad = pad_id_of(tokenizer)
    for i in range(0, len(windows), batch_size):
        yield _pad(windows[i : i + batch_size], pad)
