"""Build the demo's text data from Debian packages (reproducible, pinned by sha256).

For each of the five domains this script

1. downloads the pinned Debian package(s) with ``apt-get download`` into a cache
   directory and unpacks them with ``dpkg-deb -x`` (nothing is installed);
2. extracts real human-written *documents* (a source file, a Bible book, a LaTeX
   section, a rendered man page);
3. normalises them (NFC, no tabs, no trailing spaces, no blank lines inside a
   document, so that a blank line always separates two documents);
4. splits them into train / valid **by document** (a seeded shuffle of the sorted
   document ids: the first documents go to valid, the rest to train), and takes
   at most a few ~2 kB chunks per document, spread evenly over the document, so
   that each split covers many documents and not only their beginnings;
5. writes ``data/<domain>/{train,valid}.txt`` (chunks separated by one blank
   line), ``data/SHA256SUMS`` and ``data/SOURCES.json`` (package versions and the
   sha256 of every ``.deb`` used).

Run:  python -m dume_dist.demo.recipe.make_data [--cache /tmp/dume-demo-cache]
Needs: apt-get, dpkg-deb, groff, preconv, col (Debian 12 "bookworm").
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent.parent
DEFAULT_OUT = DEMO_DIR / "data"
DEFAULT_CACHE = Path("/tmp/dume-demo-cache")

SEED = 1234
TRAIN_BYTES = 300_000
VALID_BYTES = 80_000
CHUNK_TARGET = 2_000  # a chunk closes at the first line boundary past this many chars
CHUNK_MAX = 4_000  # hard cap (a longer single line is cut)
CHUNK_MIN = 1_000  # a trailing remainder shorter than this is merged or dropped
MAX_CHUNKS_PER_DOC = {"train": 6, "valid": 3}

# Package versions pinned for reproducibility (Debian 12 "bookworm").
PACKAGES: dict[str, str] = {
    "libpython3.11-stdlib": "3.11.2-6+deb12u9",
    "bible-kjv-text": "4.38",
    "bible-kjv": "4.38",
    "manpages-de": "4.18.1-1",
    "pari-doc": "2.15.2-1",
    "hol-light": "20230128-1+b1",
}

DOMAIN_PACKAGES: dict[str, tuple[str, ...]] = {
    "python": ("libpython3.11-stdlib",),
    "scripture": ("bible-kjv-text", "bible-kjv"),
    "german": ("manpages-de",),
    "math": ("pari-doc",),
    "ocaml": ("hol-light",),
}
DOMAINS = tuple(DOMAIN_PACKAGES)  # = dume_dist.demo.DOMAINS

Doc = tuple[str, Callable[[], str]]  # (document id, lazy loader of its raw text)


# ----------------------------------------------------------------------------- fetch


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(cache: Path, pin: bool = True) -> dict[str, dict]:
    """Download and unpack every package; return {package: {version, deb, sha256, root}}."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    info: dict[str, dict] = {}
    for pkg, version in PACKAGES.items():
        found = sorted(debs.glob(f"{pkg}_*.deb"))
        if pin:
            found = [d for d in found if _deb_field(d, "Version") == version]
        if not found:
            spec = f"{pkg}={version}" if pin else pkg
            print(f"apt-get download {spec}", file=sys.stderr)
            try:
                _run(["apt-get", "download", spec], cwd=debs)
            except subprocess.CalledProcessError as e:
                raise SystemExit(
                    f"apt-get download {spec} failed ({e.stderr.decode(errors='replace').strip()});"
                    " rerun with --no-pin to take the current candidate version"
                    " (SHA256SUMS will then tell whether the text changed)."
                ) from e
            found = sorted(debs.glob(f"{pkg}_*.deb"))
            if pin:
                found = [d for d in found if _deb_field(d, "Version") == version]
        deb = found[-1]
        real_version = _deb_field(deb, "Version")
        root = cache / "x" / deb.stem
        if not (root / ".unpacked").exists():
            root.mkdir(parents=True, exist_ok=True)
            _run(["dpkg-deb", "-x", str(deb), str(root)])
            (root / ".unpacked").touch()
        info[pkg] = {
            "version": real_version,
            "deb": deb.name,
            "sha256": sha256_file(deb),
            "root": root,
        }
    return info


def _deb_field(deb: Path, field: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), field]).stdout.decode().strip()


# -------------------------------------------------------------------- normalisation


def normalise(text: str, squeeze_spaces: bool = False) -> str:
    """NFC, LF line ends, tabs expanded, trailing spaces and blank lines removed."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    out = []
    for line in text.split("\n"):
        line = line.expandtabs(4).rstrip()
        if squeeze_spaces:
            line = re.sub(r" {2,}", " ", line.strip())
        if line:
            out.append(line)
    return "\n".join(out)


def chunk(text: str) -> list[str]:
    """Cut a normalised document into ~CHUNK_TARGET-char chunks on line boundaries."""
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    for line in text.split("\n"):
        while len(line) > CHUNK_MAX:  # pathological long line: hard cut
            line, rest = line[:CHUNK_MAX], line[CHUNK_MAX:]
            chunks.append(line)
            line = rest
        cur.append(line)
        size += len(line) + 1
        if size >= CHUNK_TARGET:
            chunks.append("\n".join(cur))
            cur, size = [], 0
    if cur:
        tail = "\n".join(cur)
        if chunks and len(tail) < CHUNK_MIN and len(chunks[-1]) + len(tail) + 1 <= CHUNK_MAX:
            chunks[-1] += "\n" + tail
        elif len(tail) >= CHUNK_MIN:
            chunks.append(tail)
    return [c for c in chunks if len(c) >= CHUNK_MIN]


def spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them if n <= k)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n // 2]


# ------------------------------------------------------------------------ extractors


def docs_python(roots: list[Path]) -> list[Doc]:
    base = roots[0] / "usr/lib/python3.11"
    files = sorted(p for p in base.rglob("*.py") if p.is_file() and not p.is_symlink())
    return [
        (str(p.relative_to(base)), lambda p=p: normalise(p.read_text("utf-8", errors="replace")))
        for p in files
    ]


_BIBLE_REF = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")


def docs_scripture(roots: list[Path]) -> list[Doc]:
    """One document per book of the KJV, decoded with the `bible` program (bible-kjv)."""
    data_dir = roots[0] / "usr/lib"
    prog = roots[1] / "usr/bin/bible"
    out = _run([str(prog), "-f", "-p", str(data_dir), "gen1:1-rev22:21"]).stdout.decode("utf-8")
    books: dict[str, list[str]] = {}
    order: list[str] = []
    for line in out.split("\n"):
        m = _BIBLE_REF.match(line.strip())
        if not m:
            continue
        book, chap, verse, text = m.groups()
        if book not in books:
            books[book] = []
            order.append(book)
        books[book].append(f"{chap}:{verse} {text}")
    if len(order) != 66:
        raise RuntimeError(f"expected 66 books from `bible`, got {len(order)}")
    return [
        (f"{i:02d}-{b}", lambda b=b: normalise("\n".join(books[b]))) for i, b in enumerate(order)
    ]


_TEX_SKIP = {"parimacro.tex", "pdfmacs.tex", "paricfg.tex", "users.tex", "refcard.tex"}


def docs_math(roots: list[Path]) -> list[Doc]:
    """One document per \\section of the PARI/GP manuals (LaTeX/TeX source)."""
    base = roots[0] / "usr/share/pari/doc"
    docs: list[Doc] = []
    for p in sorted(base.glob("*.tex")):
        if p.name in _TEX_SKIP:
            continue
        text = p.read_text("utf-8", errors="replace")
        parts = re.split(r"(?m)^(?=\\section\{)", text)
        for i, part in enumerate(parts):
            docs.append((f"{p.name}#{i:03d}", lambda part=part: normalise(part)))
    return docs


_MAN_HEADINGS = re.compile(r"^[A-ZÄÖÜ][A-ZÄÖÜ0-9 ,./()-]+$")


def _render_man(path: Path, translator_heading: str) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    src = raw.decode("utf-8", errors="replace")
    if src.lstrip().startswith(".so "):  # an alias page
        return ""
    pre = _run(["preconv", "-e", "utf-8"], input=src.encode("utf-8")).stdout
    try:
        rendered = subprocess.run(
            ["groff", "-t", "-man", "-Tutf8", "-rHY=0", "-rcR=1", "-P-cbou"],
            input=pre,
            capture_output=True,
            check=True,
            env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"},
        ).stdout
    except subprocess.CalledProcessError:
        return ""
    text = _run(["col", "-bx"], input=rendered, env={"LC_ALL": "C.UTF-8"}).stdout.decode(
        "utf-8", errors="replace"
    )
    lines = text.split("\n")
    # drop the running header / footer lines (first and last non-empty lines)
    nonempty = [i for i, ln in enumerate(lines) if ln.strip()]
    if len(nonempty) < 3:
        return ""
    lines = lines[nonempty[0] + 1 : nonempty[-1]]
    # drop the translator section (identical in every page)
    keep: list[str] = []
    skipping = False
    for ln in lines:
        if _MAN_HEADINGS.match(ln) and not ln.startswith(" "):
            skipping = ln.strip() == translator_heading
        if not skipping:
            keep.append(ln)
    return normalise("\n".join(keep), squeeze_spaces=True)


def docs_german(roots: list[Path]) -> list[Doc]:
    base = roots[0] / "usr/share/man/de"
    files = sorted(p for p in base.rglob("*.gz") if p.is_file() and not p.is_symlink())
    return [(str(p.relative_to(base)), lambda p=p: _render_man(p, "ÜBERSETZUNG")) for p in files]


def docs_ocaml(roots: list[Path]) -> list[Doc]:
    """HOL Light (OCaml) proof scripts and libraries."""
    base = roots[0] / "usr/share/hol-light"
    files = sorted(p for p in base.rglob("*.ml") if p.is_file() and not p.is_symlink())
    return [
        (str(p.relative_to(base)), lambda p=p: normalise(p.read_text("utf-8", errors="replace")))
        for p in files
        if not p.relative_to(base).parts[0] == "Help"
    ]


EXTRACTORS: dict[str, Callable[[list[Path]], list[Doc]]] = {
    "python": docs_python,
    "scripture": docs_scripture,
    "german": docs_german,
    "math": docs_math,
    "ocaml": docs_ocaml,
}


# ----------------------------------------------------------------------------- split


@dataclass
class Split:
    train: list[str]
    valid: list[str]
    train_docs: list[str]
    valid_docs: list[str]


def split_domain(docs: list[Doc], seed: int, domain: str) -> Split:
    rng = random.Random(f"{seed}:{domain}")
    order = sorted(docs, key=lambda d: d[0])
    rng.shuffle(order)
    out = Split([], [], [], [])

    def take(split: str, budget: int, it: Iterator[Doc]) -> None:
        chunks: list[str] = getattr(out, split)
        ids: list[str] = getattr(out, f"{split}_docs")
        used = 0
        for doc_id, load in it:
            cs = chunk(load())
            if not cs:
                continue
            for i in spread(len(cs), MAX_CHUNKS_PER_DOC[split]):
                chunks.append(cs[i])
                used += len(cs[i].encode("utf-8")) + 2
            ids.append(doc_id)
            if used >= budget:
                return
        raise RuntimeError(f"{domain}: ran out of documents filling {split} ({used} B)")

    it = iter(order)
    take("valid", VALID_BYTES, it)  # valid first: the documents it takes are never in train
    take("train", TRAIN_BYTES, it)
    assert not set(out.train_docs) & set(out.valid_docs)
    return out


# ------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="download/unpack dir")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="data output dir")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--no-pin", action="store_true", help="take apt's candidate versions")
    ap.add_argument("--domains", nargs="*", default=list(DOMAINS), choices=DOMAINS)
    args = ap.parse_args(argv)

    info = fetch(args.cache, pin=not args.no_pin)
    sources: dict = {"seed": args.seed, "packages": {}, "domains": {}}
    for pkg, d in info.items():
        sources["packages"][pkg] = {k: d[k] for k in ("version", "deb", "sha256")}
    for domain in args.domains:
        roots = [info[p]["root"] for p in DOMAIN_PACKAGES[domain]]
        docs = EXTRACTORS[domain](roots)
        sp = split_domain(docs, args.seed, domain)
        ddir = args.out / domain
        ddir.mkdir(parents=True, exist_ok=True)
        for split in ("train", "valid"):
            chunks = getattr(sp, split)
            (ddir / f"{split}.txt").write_text("\n\n".join(chunks) + "\n", encoding="utf-8")
        sources["domains"][domain] = {
            "packages": list(DOMAIN_PACKAGES[domain]),
            "documents_available": len(docs),
            "train_documents": len(sp.train_docs),
            "valid_documents": len(sp.valid_docs),
            "train_chunks": len(sp.train),
            "valid_chunks": len(sp.valid),
            "valid_document_ids": sp.valid_docs,
        }
        print(
            f"{domain:10s} docs={len(docs):5d} train={len(sp.train_docs)} docs/{len(sp.train)}"
            f" chunks  valid={len(sp.valid_docs)} docs/{len(sp.valid)} chunks",
            file=sys.stderr,
        )
    (args.out / "SOURCES.json").write_text(json.dumps(sources, indent=1) + "\n")
    sums = [
        f"{sha256_file(p)}  {p.relative_to(args.out).as_posix()}"
        for p in sorted(args.out.rglob("*.txt"))
    ]
    (args.out / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    print((args.out / "SHA256SUMS").read_text(), end="")


if __name__ == "__main__":
    main()
