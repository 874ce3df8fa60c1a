"""Benchmark of data-free generation: the original loop against utils.generate, side by side.

Original: one sequence at a time, model.generate(input_ids, do_sample=False, max_length=j) for the
greedy prefix, then model.generate(outputs, do_sample=True, max_length=max_length), each line appended
to a file. Ours: batched, KV cache, ended rows dropped (generate_data.py's code path). Same model,
dtype, start ids, prefix lengths and max_length. The peer: Hugging Face generate the obvious way, batched
(greedy call, then sampling call), same batch size. The last two lines: `speedup_vs_hf_generate <Y>x` and
`speedup <X>x` (tokens/s ratios against the peer and against the original loop); with --skip_original the
last line is `speedup_vs_hf_generate`. --rounds N runs the peer and ours N times each, alternating.

Defaults: 16 start ids x prefix lengths 3 4 5 = 48 sequences, max_length 96, so that the original
one-at-a-time loop (2 generate calls per sequence, no batching) takes minutes, not an hour, on SmolLM2 (135M)
on a CPU: `--model smollm2` ran 4.4 min in all at one thread on a shared 2-core CPU (the original loop 220 s
of it, 19 tokens/s), where the former 128 ids x 3 at max_length 128 (8 times the sequences, longer) ran for
most of an hour. --model takes a directory or a packaged model's name (smollm2), as eval.py does. The suite
runs it on the embedded model with --num_ids 4 --prefix_lengths 3 --max_length 24.

    python benchmarks/bench_generate.py [--model assets/tiny_llama | smollm2] [--num_ids 16] [--max_length 96]
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.allocator import tune_cpu_allocator  # noqa: E402
from utils.decode import Sampling  # noqa: E402
from utils.generate import (default_batch_size, eos_token_ids, load_generator as load_model,  # noqa: E402
                            plan_segments, write_sequences)
from utils.shards import ShardFile  # noqa: E402
from utils.constants import EMBEDDED_MODEL  # noqa: E402
from utils.model_zoo import resolve_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_MODEL, help="a model directory or a packaged model's name (smollm2)")
    p.add_argument("--first_id", type=int, default=100, help="start ids first_id .. first_id+num_ids-1")
    p.add_argument("--num_ids", type=int, default=16)
    p.add_argument("--prefix_lengths", type=int, nargs="+", default=[3, 4, 5])
    p.add_argument("--max_length", type=int, default=96)
    p.add_argument("--batch_size", type=int, default=None, help="ours (default: generate_data.py's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="all three sides (auto: generate_data.py's default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, both sides (default: torch's)")
    p.add_argument("--rounds", type=int, default=1, help="HF generate and ours, each this many times, alternating "
                   "which runs first (these machines' speed drifts within minutes)")
    p.add_argument("--skip_original", action="store_true", help="leave out the original loop (minutes on SmolLM2): "
                   "the last line is then speedup_vs_hf_generate")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.num_ids < 1 or args.max_length < 2 or min(args.prefix_lengths) < 1 or \
            max(args.prefix_lengths) > args.max_length:
        p.error("need --rounds >= 1, --num_ids >= 1, --max_length >= 2 and 1 <= --prefix_lengths <= --max_length")
    return args


def original(model, tokenizer, ids, prefix_lengths, max_length, out_file):
    """The original generate_data.py loop; returns the generated token count."""
    tokens = 0
    for j in prefix_lengths:
        for i in ids:
            input_ids = torch.tensor([[i]], device=model.device)
            outputs = model.generate(input_ids, do_sample=False, max_length=j)
            outputs = model.generate(outputs, do_sample=True, max_length=max_length)
            tokens += outputs.shape[1] - 1
            text = tokenizer.batch_decode(outputs, skip_special_tokens=True)[0]
            with open(out_file, "a") as f:
                f.write(json.dumps({"text": text}) + "\n")
    return tokens


def hf_batched(model, tokenizer, ids, prefix_lengths, max_length, batch_size, out_file):
    """The peer: Hugging Face generate used the obvious way, batch_size sequences at a time, two calls (greedy
    for the prefix, then sampling to max_length); returns the generated token count (up to each EOS)."""
    eos = eos_token_ids(model)
    pad = eos[0] if eos else 0
    tokens = 0
    for j in prefix_lengths:
        for k in range(0, len(ids), batch_size):
            input_ids = torch.tensor(ids[k:k + batch_size], device=model.device)[:, None]
            outputs = model.generate(input_ids, do_sample=False, max_length=j, pad_token_id=pad)
            outputs = model.generate(outputs, do_sample=True, max_length=max_length, pad_token_id=pad)
            texts = []
            for row in outputs.tolist():
                end = next((n + 1 for n in range(1, len(row)) if row[n] in eos), len(row))
                tokens += end - 1
                texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
            with open(out_file, "a") as f:
                f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    return tokens


def ours(model, tokenizer, ids, prefix_lengths, max_length, batch_size, seed, out_dir):
    """generate_data.py's path for these ids; returns the generated token count."""
    shard_file = ShardFile(out_dir, 0)
    done = shard_file.open({(i, j) for j in prefix_lengths for i in ids}, {})
    try:
        _, tokens = write_sequences(model, tokenizer, shard_file, plan_segments(ids, prefix_lengths, batch_size), done,
                                    max_length, seed, Sampling.of(model.generation_config), eos_token_ids(model),
                                    desc="batched", batch_size=batch_size)
    finally:
        shard_file.close()
    return tokens


def timed(fn, *args):
    start = time.perf_counter()
    tokens = fn(*args)
    return tokens, time.perf_counter() - start


def main(argv=None):
    tune_cpu_allocator()  # as train.py / generate_data.py run (utils/allocator.py)
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, args.dtype)
    max_length = min(args.max_length, model.config.max_position_embeddings)
    ids = list(range(args.first_id, args.first_id + args.num_ids))
    n = len(ids) * len(args.prefix_lengths)
    batch_size = min(args.batch_size or default_batch_size(model, max_length), n)
    print(f"model {args.model} ({model.dtype} on {model.device}, {torch.get_num_threads()} threads): "
          f"{len(ids)} start ids x prefix lengths {args.prefix_lengths} = {n} sequences, max_length {max_length}"
          + (f"; HF generate and ours {args.rounds} times each" if args.rounds > 1 else ""))
    with tempfile.TemporaryDirectory() as tmp:
        original(model, tokenizer, ids[:1], [3], 8, os.path.join(tmp, "warmup.jsonl"))  # first-call costs, both
        ours(model, tokenizer, ids[:2], [3], 8, 2, args.seed, os.path.join(tmp, "warmup"))
        t_orig, s_orig = (timed(original, model, tokenizer, ids, args.prefix_lengths, max_length,
                                os.path.join(tmp, "original.jsonl")) if not args.skip_original else (0, 0.0))
        t_peer = s_peer = t_ours = s_ours = 0  # summed over rounds that alternate which side runs first
        for r in range(args.rounds):
            sides = ["peer", "ours"] if r % 2 == 0 else ["ours", "peer"]
            for side in sides:
                if side == "peer":
                    t, sec = timed(hf_batched, model, tokenizer, ids, args.prefix_lengths, max_length, batch_size,
                                   os.path.join(tmp, f"peer{r}.jsonl"))
                    t_peer, s_peer = t_peer + t, s_peer + sec
                else:
                    t, sec = timed(ours, model, tokenizer, ids, args.prefix_lengths, max_length, batch_size,
                                   args.seed, os.path.join(tmp, f"ours{r}"))
                    t_ours, s_ours = t_ours + t, s_ours + sec
    rows = [(f"HF generate, batches of {batch_size}", t_peer, s_peer),
            (f"ours (batch size {batch_size}, refilled)", t_ours, s_ours)]
    if not args.skip_original:
        rows.insert(0, ("original (one sequence at a time)", t_orig, s_orig))
    for name, tokens, seconds in rows:
        print(f"{name:36s} {n} sequences, {tokens} tokens in {seconds:.1f} s: {tokens / seconds:.0f} tokens/s")
    print(f"speedup_vs_hf_generate {(t_ours / s_ours) / (t_peer / s_peer):.2f}x")
    if not args.skip_original:
        print(f"speedup {(t_ours / s_ours) / (t_orig / s_orig):.1f}x")


if __name__ == "__main__":
    main()
