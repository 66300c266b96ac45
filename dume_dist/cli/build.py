"""`dume build` and `dume eval`: the single-machine MoErge and its evaluation."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from dume_dist.core.paths import check_creatable
from dume_dist.model.routing_options import (  # torch-free: `dume --help` stays fast
    BUILTIN_KIND_OPTIONS,
    COMMON_OPTIONS,
    DEFAULT_PRESET,
    PRESETS,
    ROUTING_FEATURES,
    ROUTING_SOLVERS,
    options_by_name,
    routing_option_names,
)

BACKBONE_HELP = "'average' of the experts' non-MLP weights (the paper) or 'base:DIR'"
ROUTING_PRESETS = tuple(PRESETS)
# The flags take the older names too (`--features ngram --solver nb` is the n-gram kind).
_WIDER_CHOICES = {"features": ROUTING_FEATURES, "solver": ROUTING_SOLVERS}
ROUTING_HELP = (
    f"named routing setting (default {DEFAULT_PRESET!r}, the best measured): "
    + ", ".join(f"{name!r} ({', '.join(f'{k}={v}' for k, v in s.items())})"
                for name, s in PRESETS.items())
)  # fmt: skip


def add_routing_flags(p: argparse.ArgumentParser, *, holdout_owner: str) -> None:
    """The routing flags of `dume build` and `dume coordinator start`, one per routing option of
    `dume_dist.model.routing_options` (the one definition): a preset, then the settings that
    override it (None: the preset's value)."""
    p.add_argument("--routing", choices=ROUTING_PRESETS, default=None,
                   help=ROUTING_HELP + "; the flags below override it (docs/routing.md)")  # fmt: skip
    p.add_argument("--kind", choices=tuple(BUILTIN_KIND_OPTIONS), default=None,
                   help="router kind (default: the preset's)")  # fmt: skip
    options = options_by_name(COMMON_OPTIONS)
    for kind_options in BUILTIN_KIND_OPTIONS.values():
        options.update(options_by_name(kind_options))
    for name in routing_option_names():
        option = options[name]
        owner = f" (of {holdout_owner}s)" if name == "holdout_fraction" else ""
        common = name in options_by_name(COMMON_OPTIONS)
        default = "" if option.default is None or common else f" (kind default {option.default})"
        p.add_argument(
            "--" + name.replace("_", "-"), type=_option_parser(option), default=None,
            choices=_WIDER_CHOICES.get(name) or option.choices or None, metavar=option.metavar,
            help=option.help + owner + default,
        )  # fmt: skip
    p.add_argument(
        "--lam", type=number_or_auto, default=None,
        help="older name of the kind's solver parameter (--ridge-lambda, --lda-shrinkage or "
        "--mu, by the solver), or 'auto'",
    )  # fmt: skip


def _option_parser(option):
    """``option.parse`` whose refusal argparse prints with its reason (a bare ValueError shows
    only as 'invalid parse value')."""
    what = {"int": "an integer", "grid": "comma-separated numbers"}.get(option.type, "a number")
    what += " or 'auto'" if option.auto else ""

    def parse(text: str):
        try:
            return option.parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

    return parse


def positive_float(value: str) -> float:
    """A finite number > 0 (argparse type)."""
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if not math.isfinite(x) or x <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value!r}")
    return x


def routing_settings(args) -> dict:
    """The routing flags given (None: the preset's value) by their option names."""
    names = ("routing", "kind", *routing_option_names(), "lam")
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


DTYPES = ("float32", "bfloat16", "float16")
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def _size(value: str) -> int:
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        # ArgumentTypeError: argparse prints this reason (a ValueError shows as 'invalid value')
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB or 500MB, got {value!r}")
    return max(1, int(float(m.group(1)) * _UNITS[m.group(2).upper()]))


def check_device(device: str | None, flag: str = "--device") -> None:
    """Before any work: ``device`` names a device torch knows and this machine has (None: the
    default, cuda when available)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"{flag} {device!r} is not a device (cpu, cuda, cuda:1, mps, ...)"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{flag} {device}: no CUDA device is available")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{flag} {device}: there are {count} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {device}: no MPS device is available")


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def add_dp_flags(p: argparse.ArgumentParser) -> None:
    """Differential privacy of the statistics a contributor sends (docs/privacy.md)."""
    p.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        help="make the statistics (ε, δ)-differentially private before they leave (this "
        "submission's budget, every layer and held-out part included)",
    )
    p.add_argument("--dp-delta", type=float, default=None, help="δ of --dp-epsilon (e.g. 1e-6)")
    p.add_argument(
        "--dp-unit",
        choices=("sequence", "token"),
        default="sequence",
        help="what is protected: one statistics window (sequence) or one token (n-gram routing only)",
    )
    p.add_argument(
        "--dp-clip",
        type=float,
        default=None,
        help="L2 bound on each token's router features (default: from the backbone's norm weights)",
    )
    p.add_argument(
        "--dp-count-cap",
        type=int,
        default=4,
        help="most a sequence adds to any one n-gram count (default 4)",
    )


def dp_spec(args):
    """The DpSpec of --dp-* flags, or None without --dp-epsilon."""
    eps, delta = getattr(args, "dp_epsilon", None), getattr(args, "dp_delta", None)
    if eps is None:
        if delta is not None:
            raise ValueError("--dp-delta needs --dp-epsilon")
        return None
    if delta is None:
        raise ValueError("--dp-epsilon needs --dp-delta (e.g. 1e-6, below 1 / number of units)")
    from dume_dist.core.dp import DpSpec

    return DpSpec(eps, delta, args.dp_unit, args.dp_clip, args.dp_count_cap)


def number_or_auto(value: str) -> float | str:
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"expected a number or 'auto', got {value!r}") from None


def parse_named(values: list[str] | None, flag: str) -> dict[str, list[str]]:
    """``["a=x", "a=y", "b=z"]`` → ``{"a": ["x", "y"], "b": ["z"]}`` (order kept)."""
    out: dict[str, list[str]] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{flag} expects NAME=PATH, got {value!r}")
        out.setdefault(name, []).append(path)
    return out


def data_files_of(data: dict[str, list[str]], flag: str = "--data") -> dict[str, list[str]]:
    """Each NAME's paths as the files they name (a directory: its .txt and .jsonl files, as
    `read_documents` reads them); a file named twice for one NAME (its text would count twice)
    is refused."""
    from dume_dist.model.data import data_files

    out: dict[str, list[str]] = {}
    for name, paths in data.items():
        seen: set[Path] = set()
        out[name] = []
        for path in paths:
            for file in data_files(path):
                if file.resolve() in seen:
                    raise ValueError(f"{flag} {name}: {file} is given twice (it would count twice)")
                seen.add(file.resolve())
                out[name].append(str(file))
    return out


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out_dir(out: Path, overwrite: bool, inputs: list[str | Path]) -> None:
    """Before any work: --out may be written (absent, empty, or --overwrite), its nearest existing
    parent is a directory, and replacing it would not delete an input (an expert, data)."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise ValueError(f"output directory {out} exists and is not empty (use --overwrite)")
    check_creatable(out, "--out")
    target = out.resolve()
    for path in inputs:
        if _inside(Path(path).resolve(), target):
            raise ValueError(f"--out {out} holds the input {path}: writing it would delete that")


def check_out_file(path: str | None, flag: str) -> None:
    """Before any work: a file output (--json, a PNG) can be written where it is asked for."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a directory")
    if not p.absolute().parent.is_dir():
        raise ValueError(f"{flag} {path}: directory {p.absolute().parent} does not exist")


def parse_experts(values: list[str] | None) -> dict[str, str]:
    named = parse_named(values, "--expert")
    dup = [n for n, paths in named.items() if len(paths) > 1]
    if dup:
        raise ValueError(f"--expert names must be unique, {dup[0]!r} is given twice")
    seen: dict[Path, str] = {}
    for name, paths in named.items():
        where = Path(paths[0]).resolve()
        if where in seen:  # one model under two names: two experts no router can tell apart
            raise ValueError(f"--expert {name} and {seen[where]} are the same directory {paths[0]}")
        seen[where] = name
    return {n: paths[0] for n, paths in named.items()}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="MoErge dense experts into one DUME model")
    p.add_argument(
        "--expert",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a dense expert (HF model directory); repeat for each expert",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="router-statistics text of expert NAME (.txt, .jsonl, or a directory of them); repeatable",
    )
    p.add_argument("--out", required=True, help="output model directory (must not exist)")
    p.add_argument("--backbone", default="average", help=BACKBONE_HELP)
    add_routing_flags(p, holdout_owner="expert")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="router temperature T")
    p.add_argument(
        "--max-tokens-per-seq",
        type=int,
        default=None,
        help="leading tokens of each sequence used for statistics (default: the experts' "
        "max_position_embeddings, at most 1024)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=None, help="cap on statistics tokens per expert"
    )
    p.add_argument(
        "--seq-len", type=int, default=None,
        help="window length for statistics (default: --max-tokens-per-seq)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--format",
        choices=("dume", "mixtral"),
        default="dume",
        help="dume (router with bias, remote code) or mixtral (stock transformers)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="dtype of the written weights (default: the experts')",
    )
    p.add_argument(
        "--stats-dtype",
        choices=DTYPES,
        default=None,
        help="dtype the experts run in while statistics are collected (default: the experts' "
        "own; products fp32, sums fp64 either way)",
    )
    p.add_argument(
        "--shard-size",
        type=_size,
        default=None,
        help="largest safetensors shard, e.g. 2GB or 500MB (default 2GB); the backbone, the "
        "routers and each expert are always in shards of their own",
    )
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--save-stats",
        metavar="DIR",
        default=None,
        help="keep the experts' statistics in DIR (outside --out; never in the model) and reuse "
        "those that still match on a later build with the same DIR",
    )
    add_dp_flags(p)
    p.set_defaults(func=run_build)

    e = sub.add_parser("eval", help="held-out perplexity per domain (and routing accuracy)")
    e.add_argument("--model", required=True, help="model directory (DUME, Mixtral or dense)")
    e.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="held-out text of domain NAME; repeatable",
    )
    e.add_argument(
        "--experts",
        action="append",
        metavar="NAME=DIR",
        help="dense experts: adds the baselines (experts, averaging, random, oracle, k=2, bias-free)",
    )
    e.add_argument("--json", help="write the results as JSON here")
    e.add_argument("--heatmap", help="write a routing heatmap PNG here (DUME models)")
    e.add_argument(
        "--seq-len", type=int, default=None,
        help="evaluation window (default: 256, or the model's max_position_embeddings if shorter)",
    )  # fmt: skip
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--max-eval-tokens", type=int, default=32768, help="per domain")
    e.add_argument("--device", default=None)
    e.add_argument(
        "--mixed",
        action="store_true",
        help="mixed-domain sequences (one segment per domain) against the segment oracle",
    )
    e.add_argument("--segment", type=int, default=64, help="--mixed: tokens per segment")
    e.add_argument("--segments", type=int, default=4, help="--mixed: segments per sequence")
    e.add_argument("--sequences", type=int, default=64, help="--mixed: number of sequences")
    e.add_argument("--seed", type=int, default=0, help="--mixed: seed of the sequences")
    e.add_argument(
        "--delays", type=int, nargs="*", default=[4, 16], help="--mixed: oracle delays (tokens)"
    )
    e.add_argument("--routing-png", help="--mixed: PNG of the routing along a few sequences")
    e.add_argument(
        "--stats",
        default=None,
        metavar="DIR",
        help="the build's --save-stats directory: adds the bias-free (Mixtral) baseline",
    )
    e.set_defaults(func=run_eval)


def run_build(args) -> int:
    from dume_dist.model.build import build_dume

    experts = parse_experts(args.expert)
    data = data_files_of(parse_named(args.data, "--data"))
    out = Path(args.out)
    routing = routing_spec(args)
    check_device(args.device)
    base = args.backbone[5:] if args.backbone.startswith("base:") else None
    if args.backbone != "average" and not base:  # before the experts are read
        raise ValueError(f"--backbone must be 'average' or 'base:DIR', got {args.backbone!r}")
    if base and not Path(base).is_dir():
        raise ValueError(f"--backbone {args.backbone}: {base} is not a directory")
    inputs = [*experts.values(), *(f for files in data.values() for f in files)]
    check_out_dir(out, args.overwrite, inputs + ([base] if base else []))
    if args.save_stats:
        stats = Path(args.save_stats)
        if stats.exists() and not stats.is_dir():
            raise ValueError(f"--save-stats {stats} exists and is not a directory")
        check_creatable(stats, "--save-stats")
    extra = {"max_shard_bytes": args.shard_size} if args.shard_size else {}
    result = build_dume(
        experts, data, out,
        backbone=args.backbone, routing=routing, temperature=args.temperature,
        max_tokens_per_seq=args.max_tokens_per_seq, max_tokens=args.max_tokens,
        batch_size=args.batch_size, seq_len=args.seq_len, device=args.device,
        overwrite=args.overwrite, output_format=args.format, dtype=_dtype(args.dtype),
        stats_dtype=_dtype(args.stats_dtype), save_stats=args.save_stats, dp=dp_spec(args),
        **extra,
    )  # fmt: skip
    _print_privacy(result, args.save_stats)
    if args.format == "mixtral":
        print(f"wrote Mixtral model to {out}")
        return 0
    print(f"wrote DUME model to {out}")
    _print_build_summary(result)
    return 0


def _print_privacy(result, save_stats) -> None:
    if save_stats:
        reused = getattr(result, "reused_stats", [])
        print(
            f"statistics kept in {save_stats}"
            + (f" (reused: {', '.join(reused)})" if reused else "")
        )
    for name, g in (getattr(result, "privacy", None) or {}).items():
        print(
            f"{name}: ({g['epsilon']:g}, {g['delta']:g})-DP per {g['unit']}, noise multiplier "
            f"{g['noise_multiplier']:.3g} over {g['num_releases']} releases"
        )


def routing_spec(args):
    """The build's RoutingSpec: the --routing preset with the individual flags on top."""
    from dume_dist.model.routing import resolve_routing

    settings = routing_settings(args)
    preset = settings.pop("routing", None)
    if preset is None and getattr(args, "format", "dume") == "mixtral":
        preset = "paper"  # a Mixtral gate can hold only the paper's routing
    return resolve_routing(preset, **settings)


def _print_build_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    stats = getattr(result, "num_tokens", None)
    if not stats:
        return
    table = Table(title="statistics per expert")
    table.add_column("expert")
    table.add_column("tokens", justify="right")
    sampled = getattr(result, "sampled_tokens", None) or {}
    if any(sampled.values()):  # text the experts wrote (ngram_sample), counted with their data's
        table.add_column("of which sampled", justify="right")
    for name, count in stats.items():
        extra = [f"{sampled.get(name, 0):,}"] if any(sampled.values()) else []
        table.add_row(name, f"{count:,}", *extra)
    Console().print(table)
    solved = getattr(result, "routing", None)
    if solved is not None:
        spec = solved.spec
        chosen = solved.chosen or {}
        options = " ".join(
            f"{k}={','.join(f'{x:g}' for x in v) if isinstance(v, tuple) else v}"
            for k, v in spec.options.items()
            if k not in chosen and v is not None and not k.endswith("_grid")
        )  # fmt: skip
        values = " ".join(f"{k}={v:g}" for k, v in chosen.items())
        line = f"routing: kind={spec.kind} {options} {values} k={spec.top_k}"
        if solved.selection is not None:
            line += (
                f" (chosen on {solved.selection.num_holdout_tokens:,} held-out tokens by "
                f"{solved.selection.criterion})"
            )
        print(line)
        from dume_dist.model.routing import routing_warnings

        for warning in routing_warnings(result.manifest):
            print(f"warning: {warning}")


def run_eval(args) -> int:
    from dume_dist.model.evaluate import compare, print_table, write_heatmap

    data = data_files_of(parse_named(args.data, "--data"))
    check_out_file(args.json, "--json")
    check_device(args.device)
    if args.mixed:
        check_out_file(args.routing_png, "--routing-png")
        return _run_eval_mixed(args, data)
    check_out_file(args.heatmap, "--heatmap")
    if args.heatmap and _model_type(args.model) not in (None, "dume"):
        raise ValueError("--heatmap needs a DUME model (no routing was recorded)")
    if args.stats is not None and not Path(args.stats).is_dir():
        raise ValueError(f"--stats {args.stats} is not a directory")
    if args.stats is not None and not args.experts:
        raise ValueError("--stats adds the bias-free baseline, which needs --experts")
    experts = parse_experts(args.experts) if args.experts else None
    table = compare(
        args.model, data, experts=experts, seq_len=args.seq_len, batch_size=args.batch_size,
        max_eval_tokens=args.max_eval_tokens, device=args.device, stats_dir=args.stats,
    )  # fmt: skip
    print_table(table)
    if args.json:
        Path(args.json).write_text(json.dumps(table.to_json(), indent=2))
        print(f"wrote {args.json}")
    if args.heatmap:
        if not table.routing_share:
            raise ValueError("--heatmap needs a DUME model (no routing was recorded)")
        write_heatmap(table, args.heatmap)
        print(f"wrote {args.heatmap}")
    return 0


def _model_type(model_dir) -> str | None:
    """config.json's model_type (None when it cannot be read: the load says why)."""
    try:
        return json.loads(Path(model_dir, "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _run_eval_mixed(args, data) -> int:
    import torch

    from dume_dist.model.evaluate import load_causal_lm
    from dume_dist.model.mixed import (
        MixedSettings,
        mixed_report,
        print_mixed,
        to_json,
        write_routing_png,
    )
    from dume_dist.model.tokenizer import load_tokenizer

    settings = MixedSettings(
        segment=args.segment, segments=args.segments, sequences=args.sequences, seed=args.seed,
        delays=tuple(args.delays), batch_size=args.batch_size,
    )  # fmt: skip
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not Path(args.model, "config.json").is_file():
        raise ValueError(f"no model at {args.model} (config.json missing)")
    tokenizer = load_tokenizer(args.model, trust_remote_code=True)
    model = load_causal_lm(args.model, device)
    if model.config.model_type != "dume":
        raise ValueError("--mixed needs a DUME model (its experts are named after the domains)")
    result = mixed_report(model, tokenizer, data, settings, device=device)
    print_mixed(result)
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(result), indent=2))
        print(f"wrote {args.json}")
    if args.routing_png:
        write_routing_png(result, model.config.expert_names, args.routing_png)
        print(f"wrote {args.routing_png}")
    return 0
