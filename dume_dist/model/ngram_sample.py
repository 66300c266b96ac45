"""Text a contributor's expert writes, counted into its n-gram statistics (``ngram_sample``).

A contributor's n-gram counts describe the text it chose for statistics; its expert knows more
than that text (what it was tuned on, what its base knew). Where users' text differs from the
statistics text, the n-gram router sends it elsewhere (docs/routing.md: the `ocaml` expert was
counted on proofs, users ask it for system code). With ``ngram_sample`` s > 0 the contributor's
node lets its own expert write text from its BOS token alone — ancestral sampling at
temperature 1, nothing read — about ``s`` times as many tokens as its data gave, at most
``ngram_sample_max``, and counts those tokens with its data's (`NgramCollector.add`, the same
way as a document: BOS first). The router and inference do not change; the counts are still
one contributor's additive statistics, so joining and exact unlearning are unchanged.

Reproducible to the bit, on any number of workers: the sample is ``batches`` of
`SAMPLE_BATCH` sequences of `SAMPLE_LENGTH` new tokens (fewer when the experts' position limit
is smaller); batch ``b`` is drawn with a generator seeded from the expert's fingerprint and ``b``
alone (`batch_seed`), so workers that take the batches round-robin make exactly the batches one
worker makes, and a node and a single-machine build of the same expert count the same tokens.
Different experts draw different samples whatever order they join in.

What leaves the node: nothing new — the counts are sums with the data's counts; the number of
sampled tokens is recorded in the statistics' ``extra`` (``sampled_tokens``). The sample's size
follows the data's size, so a contribution made differentially private counts no sample.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

SAMPLE_LENGTH = 256  # new tokens per sampled sequence (at most the position limit minus BOS)
SAMPLE_BATCH = 32  # sequences per batch: the unit of seeding and of sharding over workers


def sample_shape(real_tokens: int, share: float, max_tokens: int,
                 max_positions: int | None) -> tuple[int, int]:  # fmt: skip
    """``(sequences, new tokens per sequence)`` of the sample: ``share`` × ``real_tokens`` new
    tokens rounded up to whole sequences, at most ``max_tokens`` (a cap below one sequence
    shortens the sequence)."""
    length = SAMPLE_LENGTH if not max_positions else min(SAMPLE_LENGTH, int(max_positions) - 1)
    length = min(length, max_tokens)
    if share <= 0 or real_tokens <= 0 or length < 1:
        return 0, max(length, 0)
    wanted = math.ceil(share * real_tokens / length)
    return min(wanted, max_tokens // length), length


def batch_seed(fingerprint: str, batch: int) -> int:
    """The seed of sample batch ``batch`` of the expert with ``fingerprint``: 63 bits of
    SHA-256, the same on every machine and worker."""
    digest = hashlib.sha256(f"dume-ngram-sample:{fingerprint}:{int(batch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


GENERATION_CONFIG_MAX_BYTES = 1 << 20
_START_KEYS = ("bos_token_id", "eos_token_id")


def start_token(config, model_dir=None) -> int:
    """The token a sample starts from: the expert's BOS, else its EOS (a document boundary), as
    its ``config.json`` names them, else as its ``generation_config.json`` does (where many
    checkpoints keep them). ValueError (one line) when neither names one in the vocabulary."""
    sources = [{k: getattr(config, k, None) for k in _START_KEYS}]
    path = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if path is not None and path.is_file():
        if path.stat().st_size > GENERATION_CONFIG_MAX_BYTES:
            raise ValueError(f"{path} is larger than {GENERATION_CONFIG_MAX_BYTES} bytes")
        try:
            generation = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {path}: {exc}") from None
        if isinstance(generation, dict):
            sources.append(generation)
    for source in sources:  # config.json first: what earlier versions started from
        for key in _START_KEYS:
            value = source.get(key)
            value = value[0] if isinstance(value, (list, tuple)) and value else value
            if isinstance(value, int) and not isinstance(value, bool):
                if 0 <= value < config.vocab_size:
                    return value
    where = "config.json or generation_config.json" if path is not None else "config"
    raise ValueError(
        f"the expert's {where} names no BOS or EOS token to start a sample from: set ngram_sample 0"
    )


@torch.inference_mode()
def sample_batch(model, start: int, rows: int, length: int, seed: int,
                 device: torch.device) -> torch.Tensor:  # fmt: skip
    """``rows`` sequences ``[start, t_1 .. t_length]`` written by ``model`` (temperature 1, the
    whole vocabulary), from a generator seeded with ``seed`` on ``device``; int64 on the CPU."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ids_BT = torch.full((rows, 1), start, dtype=torch.long, device=device)
    # transformers 5.24 renamed the KV cache argument and output `past_key_values` -> `cache`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids_BT, use_cache=True)
    vocab = model.config.vocab_size
    new = []
    for _ in range(length):
        probs_BV = torch.softmax(out.logits[:, -1, :vocab].float(), dim=-1)
        nxt_B1 = torch.multinomial(probs_BV, 1, generator=gen)
        new.append(nxt_B1)
        cache = out["cache"] if "cache" in out else out.past_key_values
        out = model(input_ids=nxt_B1, use_cache=True, **{key: cache})
    return torch.cat([ids_BT, *new], dim=1).cpu()


def expert_model(expert, device, dtype=None) -> torch.nn.Module:
    """The contributor's own dense expert (an ``ExpertSpec``: its safetensors only, no remote
    code), in the dtype its statistics run in (``collect.stats_compute_dtype``)."""
    from transformers import AutoModelForCausalLM

    from dume_dist.model.collect import stats_compute_dtype

    model = AutoModelForCausalLM.from_pretrained(
        str(expert.path), dtype=stats_compute_dtype(expert, device, dtype), use_safetensors=True,
        trust_remote_code=False,
    )  # fmt: skip
    return model.to(device).eval()


class SampledBatches:
    """The sample of one expert as token batches ``(ids_BT, mask_BT)``, made on demand: batch
    ``b`` has `SAMPLE_BATCH` rows (the last one fewer) and its own seed (`batch_seed`). The model
    comes from ``make_model`` at the first batch a worker makes and is dropped with this object."""

    def __init__(self, make_model: Callable[[], torch.nn.Module], fingerprint: str,
                 sequences: int, length: int, start: int, device) -> None:  # fmt: skip
        if not fingerprint:
            raise ValueError("a sample needs the expert's fingerprint (its seed)")
        self.make_model, self.fingerprint = make_model, fingerprint
        self.sequences, self.length, self.start = sequences, length, start
        self.device = torch.device(device)
        self._model = None

    @property
    def num_batches(self) -> int:
        return math.ceil(self.sequences / SAMPLE_BATCH)

    @property
    def num_tokens(self) -> int:
        """Tokens the sample adds to the counts (its BOS tokens included)."""
        return self.sequences * (self.length + 1)

    def _rows(self, b: int) -> int:
        return min(SAMPLE_BATCH, self.sequences - b * SAMPLE_BATCH)

    def tokens_of(self, b: int) -> int:
        """Tokens batch ``b`` adds to the counts."""
        return self._rows(b) * (self.length + 1)

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= b < self.num_batches:
            raise IndexError(f"sample batch {b} of {self.num_batches}")
        if self._model is None:
            self._model = self.make_model().to(self.device).eval()
        ids_BT = sample_batch(self._model, self.start, self._rows(b), self.length,
                              batch_seed(self.fingerprint, b), self.device)  # fmt: skip
        return ids_BT, torch.ones_like(ids_BT)

    def release(self) -> None:
        self._model = None
