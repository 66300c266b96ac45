"""Shipped demo assets: five small real domain experts and their data.

* ``base/``                  the tiny Llama base every expert was fine-tuned from
* ``experts/<domain>/``      one expert per domain (complete HF model dirs, bf16,
                             tokenizer included)
* ``data/<domain>/{train,valid}.txt``  the text they were trained / evaluated on
                             (documents separated by a blank line), ``data/SHA256SUMS``
* ``recipe/``                the scripts that made all of the above (``make_data``,
                             ``train``) and the measured ``RESULTS.md``

The four founding domains build the initial MoE; ``JOINING_DOMAIN`` was never seen
by the base and joins later (its expert is fine-tuned from the same base).
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR: Path = Path(__file__).resolve().parent

FOUNDING_DOMAINS: tuple[str, ...] = ("python", "scripture", "german", "math")
JOINING_DOMAIN: str = "ocaml"
DOMAINS: tuple[str, ...] = (*FOUNDING_DOMAINS, JOINING_DOMAIN)

_SPLITS = ("train", "valid")


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown demo domain {domain!r}; known: {', '.join(DOMAINS)}")


def base_dir() -> Path:
    """Directory of the base model (HF format, tokenizer included)."""
    return DEMO_DIR / "base"


def expert_dir(domain: str) -> Path:
    """Directory of ``domain``'s expert (HF format, tokenizer included)."""
    _check_domain(domain)
    return DEMO_DIR / "experts" / domain


def data_path(domain: str, split: str = "train") -> Path:
    """``data/<domain>/<split>.txt``: documents separated by a blank line."""
    _check_domain(domain)
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    return DEMO_DIR / "data" / domain / f"{split}.txt"


__all__ = [
    "DEMO_DIR",
    "DOMAINS",
    "FOUNDING_DOMAINS",
    "JOINING_DOMAIN",
    "base_dir",
    "data_path",
    "expert_dir",
]
