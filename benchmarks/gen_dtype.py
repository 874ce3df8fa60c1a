"""How much of the generated corpus the generation dtype changes: the same start ids, prefix lengths and
per-sequence seeds (generate_data.py's decoder) once in float32 (the original's) and once in bfloat16 (the
default on GPUs). Prints, per dtype, mean length and distinct tokens / bigrams, and between them the share of
identical greedy prefixes, of identical whole sequences, and the mean position where they first differ.
Last line: `gen_dtype <json>`.

    python benchmarks/gen_dtype.py [--model assets/tiny_llama] [--id_step 16] [--max_length 256]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.constants import EMBEDDED_MODEL  # noqa: E402
from utils.decode import Sampling, generate_batch  # noqa: E402
from utils.generate import eos_token_ids, load_generator, sequence_seed  # noqa: E402
from utils.model_zoo import resolve_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_MODEL, help="a model directory or a packaged name (smollm2)")
    p.add_argument("--id_step", type=int, default=16, help="start ids 0, step, 2*step, ... over the vocabulary")
    p.add_argument("--prefix_lengths", type=int, nargs="+", default=[3])
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def corpus(model_dir, dtype, pairs, a):
    model = load_generator(model_dir, dtype)
    seeds = [sequence_seed(a.seed, i, j) for i, j in pairs]
    ids, lengths = zip(*pairs)
    start = time.time()
    with torch.inference_mode():
        out = dict(generate_batch(model, ids, lengths, a.max_length, Sampling.of(model.generation_config), seeds,
                                  eos_token_ids(model), a.batch_size))
    seconds = time.time() - start
    return [out[k] for k in range(len(pairs))], seconds


def stats(seqs):
    tokens = [t for s in seqs for t in s[1:]]
    bigrams = {(a, b) for s in seqs for a, b in zip(s[1:], s[2:])}
    return {"mean_length": round(sum(map(len, seqs)) / len(seqs), 1), "distinct_tokens": len(set(tokens)),
            "distinct_bigrams": len(bigrams), "tokens": len(tokens)}


def first_difference(a, b):
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv=None):
    a = parse_args(argv)
    model_dir = resolve_model(a.model)
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
    pairs = [(i, j) for j in a.prefix_lengths for i in range(0, vocab, a.id_step)]
    runs = {dtype: corpus(model_dir, dtype, pairs, a) for dtype in ("float32", "bfloat16")}
    fp, bf = runs["float32"][0], runs["bfloat16"][0]
    same_prefix = sum(x[:j] == y[:j] for x, y, (_, j) in zip(fp, bf, pairs)) / len(pairs)
    result = {"model": a.model, "sequences": len(pairs), "max_length": a.max_length, "prefix_lengths": a.prefix_lengths,
              "identical_greedy_prefix": round(same_prefix, 4),
              "identical_sequence": round(sum(x == y for x, y in zip(fp, bf)) / len(pairs), 4),
              "mean_first_difference": round(sum(map(first_difference, fp, bf)) / len(pairs), 1),
              **{dtype: {**stats(seqs), "seconds": round(sec, 1)} for dtype, (seqs, sec) in runs.items()}}
    for dtype in ("float32", "bfloat16"):
        print(f"{dtype}: {result[dtype]}")
    print(f"identical greedy prefixes {same_prefix:.1%}, identical sequences {result['identical_sequence']:.1%}, "
          f"first difference at token {result['mean_first_difference']} on average")
    print("gen_dtype " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
