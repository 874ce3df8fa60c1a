"""Merge the generation shards (gen_data/gen.chunk.XX.jsonl) into one training file of {"text"} lines.

Every line is checked; the output is written to a temporary file and renamed into place, so a rerun
replaces it (never appends) and a failed merge leaves no output behind.
"""
import argparse
import hashlib
import os
import random

from utils.data import text_of, write_texts
from utils.errors import InputError
from utils.shards import complete_lines, read_meta, shard_number, shard_paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="merge_gen_data.py", description=__doc__)
    p.add_argument("--gen_dir", default="gen_data", help="directory of the gen.chunk.XX.jsonl shards, or a comma "
                   "list of them (several machines' shards: their union, each shard number once)")
    p.add_argument("--out", default="gen_data/all_gen.jsonl", help="merged file (what run_train.sh reads by default)")
    p.add_argument("--skip_bad", action="store_true", help="drop bad lines (and count them) instead of failing")
    p.add_argument("--dedup", action="store_true", help="drop repeated texts, keeping the first")
    p.add_argument("--shuffle", action="store_true", help="shuffle the lines (default: shard order, then file order)")
    p.add_argument("--seed", type=int, default=0, help="seed of --shuffle")
    return p.parse_args(argv)


def read_shard(path, skip_bad):
    """The texts of a shard and its number of bad lines (an error instead, unless skip_bad); a torn last line
    is skipped (utils.shards)."""
    texts, bad = [], 0
    with open(path, "rb") as f:
        lines, _ = complete_lines(f, path)
    for n, line in lines:
        try:
            texts.append(text_of(line))
        except ValueError as e:
            if not skip_bad:
                raise InputError(f"{path}:{n}: bad line: {e}; --skip_bad drops such lines") from None
            bad += 1
    return texts, bad


def union_of_shards(gen_dirs):
    """The shards of every directory in shard order; a shard number found twice is refused (two machines ran
    it), and start ids no shard covers are named (a machine's shards missing)."""
    found = {}
    for gen_dir in filter(None, gen_dirs.split(",")):
        for path in shard_paths(gen_dir):
            number = shard_number(path)
            if number in found:
                raise InputError(f"shard {number} is in two places: {found[number]} and {path}; keep one")
            found[number] = path
    if not found:
        raise InputError(f"--gen_dir {gen_dirs!r}: no shards gen.chunk.XX.jsonl; run generate_data.py first")
    paths = [found[n] for n in sorted(found)]
    spans = sorted(tuple(m["start_ids"]) for m in map(read_meta, paths) if m and "start_ids" in m)
    gaps = [(a_end, b_start) for (_, a_end), (b_start, _) in zip([(0, 0)] + spans, spans) if b_start > a_end]
    if gaps:
        print("note: start ids " + ", ".join(f"{a}-{b - 1}" for a, b in gaps) + " are in no shard (not generated, "
              "or another machine's shards are missing)")
    return paths


def merge_shards(gen_dir="gen_data", out="gen_data/all_gen.jsonl", skip_bad=False, dedup=False, shuffle=False,
                 seed=0):
    """Every shard of gen_dir (a directory or a comma list of them) into one {"text"} jsonl, written atomically;
    returns the number of lines written."""
    paths = union_of_shards(gen_dir)
    if os.path.abspath(out) in map(os.path.abspath, paths):
        raise InputError(f"--out {out!r} is one of the shards; choose another file")
    texts, bad, seen, duplicates = [], 0, set(), 0
    for path in paths:
        shard_texts, shard_bad = read_shard(path, skip_bad)
        bad += shard_bad
        expected = (read_meta(path) or {}).get("num_sequences")
        if expected and len(shard_texts) + shard_bad < expected:
            print(f"note: {path} has {len(shard_texts) + shard_bad} of its {expected} sequences (unfinished shard)")
        for text in shard_texts:
            if dedup:
                digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                if digest in seen:
                    duplicates += 1
                    continue
                seen.add(digest)
            texts.append(text)
    if shuffle:
        random.Random(seed).shuffle(texts)

    write_texts(out, texts)
    notes = [f"{n} {what}" for n, what in ((bad, "bad lines skipped"), (duplicates, "duplicates dropped")) if n]
    print(f"wrote {len(texts)} lines from {len(paths)} shards to {out}" + (f" ({', '.join(notes)})" if notes else ""))
    return len(texts)


def main(argv=None):
    """merge_gen_data.py: the command line in, one merge_shards() call."""
    a = parse_args(argv)
    return merge_shards(a.gen_dir, a.out, a.skip_bad, a.dedup, a.shuffle, a.seed)
