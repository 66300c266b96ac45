"""Build four text domains, train a 32k byte-level BPE, tokenize, split train/held-out by file.

Input: the four Debian packages of the second expert set (golang-1.19-src, python3.11-doc,
manpages-fr, dict-gcide) unpacked with ``dpkg-deb -x PKG.deb $BUCKETS_DIR/src/NAME``; output:
token ids under ``$BUCKETS_DIR`` for ``measure.py``."""

import glob
import gzip
import json
import os
import random
import re
import time

import numpy as np
from tokenizers import ByteLevelBPETokenizer

ROOT = os.environ.get("BUCKETS_DIR", ".cache/ngram_buckets")
SRC = f"{ROOT}/src"
HELD_CHARS = {"french": 800_000}  # chars held out (docs picked after shuffling); default 1.4M
TRAIN_CHAR_CAP = {"go": 95_000_000}  # go has more than we need
t0 = time.time()


def read(p):
    with open(p, "rb") as f:
        return f.read().decode("utf-8", "replace")


def roff_strip(t):
    out = []
    for line in t.split("\n"):
        if line.startswith(('.\\"', "'\\\"", ".\\}", "'")):
            continue
        if line.startswith("."):
            parts = line.split(None, 1)
            line = parts[1] if len(parts) > 1 else ""
            line = line.replace('"', "")
        line = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", line)
        line = re.sub(r"\\\(..|\\\[[^\]]*\]|\\[&|^%]", "", line)
        line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ")
        if line.strip():
            out.append(line)
    return "\n".join(out) + "\n"


def docs_go():
    for p in sorted(glob.glob(f"{SRC}/golang-1.19-src/**/*.go", recursive=True)):
        if os.path.isfile(p):
            yield p, read(p)


def docs_pydoc():
    for p in sorted(glob.glob(f"{SRC}/python3.11-doc/**/*.txt", recursive=True)):
        if os.path.isfile(p):
            yield p, read(p)


def docs_french():
    for p in sorted(glob.glob(f"{SRC}/manpages-fr/usr/share/man/**/*.gz", recursive=True)):
        with gzip.open(p, "rb") as f:
            yield p, roff_strip(f.read().decode("utf-8", "replace"))


def docs_gcide():
    with gzip.open(f"{SRC}/dict-gcide/usr/share/dictd/gcide.dict.dz", "rb") as f:
        lines = f.read().decode("utf-8", "replace").split("\n")
    block = 2000  # contiguous blocks of 2000 lines are the "files"
    for i in range(0, len(lines), block):
        yield f"gcide:{i}", "\n".join(lines[i : i + block]) + "\n"


DOMAINS = {"go": docs_go, "pydoc": docs_pydoc, "french": docs_french, "gcide": docs_gcide}
split = {}
for name, fn in DOMAINS.items():
    seen, docs = set(), []
    for p, t in fn():  # drop duplicate files (python3.11-doc ships the sources three times)
        h = hash(t)
        if t.strip() and h not in seen:
            seen.add(h)
            docs.append((p, t))
    random.Random(0).shuffle(docs)
    held, train, c = [], [], 0
    for p, t in docs:
        if c < HELD_CHARS.get(name, 1_400_000):
            held.append((p, t))
            c += len(t)
        else:
            train.append((p, t))
    cap, tc, kept = TRAIN_CHAR_CAP.get(name), 0, []
    for p, t in train:
        if cap and tc >= cap:
            break
        kept.append((p, t))
        tc += len(t)
    split[name] = {"held": held, "train": kept}
    print(
        name,
        "docs",
        len(docs),
        "held",
        len(held),
        sum(len(t) for _, t in held),
        "train",
        len(kept),
        tc,
        f"{time.time() - t0:.0f}s",
        flush=True,
    )


# tokenizer: ~3 MB of training text per domain
def sample():
    for name in DOMAINS:
        c = 0
        for _, t in split[name]["train"]:
            if c > 3_000_000:
                break
            yield t[:200_000]
            c += min(len(t), 200_000)


tok = ByteLevelBPETokenizer()
tok.train_from_iterator(
    sample(),
    vocab_size=32000,
    min_frequency=2,
    special_tokens=["<|endoftext|>"],
    show_progress=False,
)
os.makedirs(f"{ROOT}/tokenizer", exist_ok=True)
tok.save(f"{ROOT}/tokenizer/tokenizer.json")
print("tokenizer", tok.get_vocab_size(), f"{time.time() - t0:.0f}s", flush=True)

stats = {}
for name in DOMAINS:
    stats[name] = {}
    for part in ("held", "train"):
        ids, offs = [], [0]
        docs = split[name][part]
        for i in range(0, len(docs), 256):
            for e in tok.encode_batch([t for _, t in docs[i : i + 256]]):
                ids.append(np.asarray(e.ids, dtype=np.uint16))
                offs.append(offs[-1] + len(e.ids))
        arr = np.concatenate(ids)
        np.savez(f"{ROOT}/data_{name}_{part}.npz", ids=arr, offs=np.asarray(offs, dtype=np.int64))
        stats[name][part] = {
            "docs": len(docs),
            "chars": sum(len(t) for _, t in docs),
            "tokens": int(arr.size),
        }
        print(name, part, stats[name][part], f"{time.time() - t0:.0f}s", flush=True)
json.dump(stats, open(f"{ROOT}/data_stats.json", "w"), indent=1)
