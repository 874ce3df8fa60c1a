"""Merge the generation shards (gen_data/gen.chunk.XX.jsonl) into one training file of {"text"} lines.

Every line is checked; the output is written to a temporary file and renamed into place, so a rerun
replaces it (never appends) and a failed merge leaves no output behind.
"""
import argparse
import glob
import hashlib
import json
import os
import random
import re

from utils.data import text_of, write_texts
from utils.errors import InputError

SHARD_NAME = re.compile(r"gen\.chunk\.(\d+)\.jsonl$")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="merge_gen_data.py", description=__doc__)
    p.add_argument("--gen_dir", default="gen_data", help="directory of the gen.chunk.XX.jsonl shards")
    p.add_argument("--out", default="gen_data/all_gen.jsonl", help="merged file (what run_train.sh reads by default)")
    p.add_argument("--skip_bad", action="store_true", help="drop bad lines (and count them) instead of failing")
    p.add_argument("--dedup", action="store_true", help="drop repeated texts, keeping the first")
    p.add_argument("--shuffle", action="store_true", help="shuffle the lines (default: shard order, then file order)")
    p.add_argument("--seed", type=int, default=0, help="seed of --shuffle")
    return p.parse_args(argv)


def shard_paths(gen_dir):
    """Every shard present, in shard order (numeric: 2 before 10)."""
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(gen_dir, "gen.chunk.*.jsonl"))
             if (m := SHARD_NAME.search(os.path.basename(p)))]
    return [p for _, p in sorted(found)]


def read_texts(path, skip_bad):
    """The texts of a shard and its number of bad lines (an error instead, unless skip_bad)."""
    texts, bad = [], 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("unfinished last line (shard still being written, or its run was "
                                     "killed: rerun generate_data.py for this shard to complete it)")
                text = text_of(line)
            except ValueError as e:
                if not skip_bad:
                    raise InputError(f"{path}:{n}: bad line: {e}; --skip_bad drops such lines") from None
                bad += 1
                continue
            texts.append(text)
    return texts, bad


def expected_lines(path):
    """The shard's sequence count from the generator's sidecar, if there is one."""
    meta = path[: -len(".jsonl")] + ".meta.json"
    try:
        with open(meta, encoding="utf-8") as f:
            return json.load(f).get("num_sequences")
    except (OSError, ValueError):
        return None


def merge_shards(args):
    """merge_gen_data.py: returns the number of lines written."""
    paths = shard_paths(args.gen_dir)
    if not paths:
        raise InputError(f"--gen_dir {args.gen_dir!r}: no shards gen.chunk.XX.jsonl; run generate_data.py first")
    out = os.path.abspath(args.out)
    if out in map(os.path.abspath, paths):
        raise InputError(f"--out {args.out!r} is one of the shards; choose another file")
    texts, bad, seen, duplicates = [], 0, set(), 0
    for path in paths:
        shard_texts, shard_bad = read_texts(path, args.skip_bad)
        bad += shard_bad
        expected = expected_lines(path)
        if expected and len(shard_texts) + shard_bad < expected:
            print(f"note: {path} has {len(shard_texts) + shard_bad} of its {expected} sequences (unfinished shard)")
        for text in shard_texts:
            if args.dedup:
                digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                if digest in seen:
                    duplicates += 1
                    continue
                seen.add(digest)
            texts.append(text)
    if args.shuffle:
        random.Random(args.seed).shuffle(texts)

    write_texts(out, texts)
    notes = [f"{n} {what}" for n, what in ((bad, "bad lines skipped"), (duplicates, "duplicates dropped")) if n]
    print(f"wrote {len(texts)} lines from {len(paths)} shards to {args.out}"
          + (f" ({', '.join(notes)})" if notes else ""))
    return len(texts)
