"""The one tokenizer of a build: what ``AutoTokenizer`` resolves for the experts.

``AutoTokenizer.from_pretrained(expert_dir)`` maps the config's ``model_type`` to the family's
tokenizer class (a ``qwen2`` directory loads ``Qwen2Tokenizer``, which re-derives Qwen's
pre-tokenizer instead of reading ``tokenizer.json``'s), while a DUME directory (``model_type
dume``, no mapping) loads the class its ``tokenizer_config.json`` names. So a checkpoint gets the
experts' tokenizer *as that class saved it* (``save_pretrained`` writes the effective pipeline to
``tokenizer.json`` and the class to ``tokenizer_config.json``), and every place that tokenizes
(build, node agents, the checkpoint's users) is checked to agree on sample text.

Expert directories are loaded without remote code: their files come from contributors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

# Text that tells tokenizers apart: code and indentation, digit runs, contractions, accents,
# other scripts, repeated spaces and blank lines, CRLF, tabs.
SAMPLE_TEXT = (
    "def f(x):\n    return x ** 2  # don't, it's 12345678 or 3.14159\n\n"
    "\tfor i in range(10):  print(i)\r\nÜber Größe: façade naïve — “quotes” ‘single’\n"
    "Привет мир. 你好，世界。 こんにちは 🙂 e\u0301\n   lots    of   spaces\n\n\n"
    "x=1;y=2;z=x+y  I'll we've they'd HELLO Hello hello\n"
)
SAMPLE_CHARS = 2000  # per domain text added to the sample


def load_tokenizer(model_dir: str | Path, *, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` as users call it (remote code only for our own output)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # long documents exceed model_max_length: expected here
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(model_dir), trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # transformers raises many types for unreadable tokenizers
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load the tokenizer of {model_dir}: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return _whole_documents(tokenizer)


def _whole_documents(tokenizer):
    """``tokenizer``, told not to warn that a text is longer than ``model_max_length``: documents
    and samples are tokenized whole and cut into windows of the position limit afterwards, so
    the "indexing errors" the warning announces cannot happen here."""
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def sample_texts(texts: Iterable[Sequence[str]] = ()) -> list[str]:
    """``SAMPLE_TEXT`` and the first ``SAMPLE_CHARS`` characters of each domain's documents."""
    out = [SAMPLE_TEXT]
    for docs in texts:
        out.append("\n\n".join(docs)[:SAMPLE_CHARS])
    return [t for t in out if t]


def first_difference(ref, other, texts: Sequence[str]) -> str | None:
    """None when both tokenize every text alike; else where they first differ."""
    for i, text in enumerate(texts):
        a = ref(text)["input_ids"]
        b = other(text)["input_ids"]
        if a != b:
            pos = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"sample {i}: {len(a)} vs {len(b)} ids, first difference at id {pos}"
    return None


def check_same_tokenization(ref, other, texts: Sequence[str], what: str) -> None:
    """ValueError (one line) unless ``other`` tokenizes ``texts`` exactly like ``ref``."""
    diff = first_difference(ref, other, texts)
    if diff is not None:
        raise ValueError(
            f"{what}: {type(other).__name__} tokenizes differently from {type(ref).__name__} "
            f"({diff})"
        )


def experts_tokenizer(paths: Sequence[tuple[str, Path]], texts: Sequence[str]):
    """The first expert's tokenizer, after checking every expert tokenizes ``texts`` alike."""
    (ref_name, ref_path), *others = paths
    ref = load_tokenizer(ref_path)
    for text in texts:
        if text.strip() and not ref(text)["input_ids"]:
            raise ValueError(
                f"the tokenizer AutoTokenizer loads for expert {ref_name} "
                f"({type(ref).__name__}) turns {len(text)} characters of sample text into no "
                "tokens: it does not fit the directory's tokenizer files"
            )
    for name, path in others:
        check_same_tokenization(
            ref, load_tokenizer(path), texts, f"experts {ref_name} and {name} disagree"
        )
    return ref


def has_tokenizer(model_dir: Path) -> bool:
    return any((Path(model_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


def write_checkpoint_tokenizer(out_dir: Path, tokenizer, texts: Sequence[str] = ()) -> None:
    """Save ``tokenizer`` (the experts', as ``AutoTokenizer`` resolved it) into a checkpoint
    directory whose ``config.json`` is written, and check that ``AutoTokenizer`` loads it back to
    the same tokenization (for a DUME directory with the config class users' remote code gives,
    without importing it from there). ValueError (one line) when it would not."""
    tokenizer.save_pretrained(str(out_dir))
    reloaded = _load_as_users_would(Path(out_dir))
    sample = list(texts) or [SAMPLE_TEXT]
    check_same_tokenization(tokenizer, reloaded, sample, "the checkpoint's tokenizer")


def _load_as_users_would(model_dir: Path):
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from dume_dist.model.modeling_dume import DumeConfig

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
        config_cls = DumeConfig if model_type == DumeConfig.model_type else AutoConfig
        config = config_cls.from_pretrained(str(model_dir))
        return _whole_documents(AutoTokenizer.from_pretrained(str(model_dir), config=config))
    finally:
        hf_logging.set_verbosity(verbosity)


def check_expert_tokenizer(reference_dir: Path, expert_dir: Path, texts: Sequence[str] = ()):
    """A joining expert must tokenize like the model it joins (``reference_dir``: the backbone's
    directory, which carries the founders' tokenizer): ValueError (one line) otherwise; returns
    the reference tokenizer."""
    ref = load_tokenizer(reference_dir)
    check_same_tokenization(
        ref, load_tokenizer(expert_dir), sample_texts([texts] if texts else []),
        f"expert {expert_dir} and the model it joins disagree",
    )  # fmt: skip
    return ref
