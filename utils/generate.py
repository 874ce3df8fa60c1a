"""Data-free generation (LLM-QAT): the full-precision model writes its own training corpus.

Every vocabulary id starts one sequence per prefix length j: the first j tokens (start id included)
are greedy, the rest sampled with the model's generation defaults, until EOS or max_length. One
process writes one shard, `<out_dir>/gen.chunk.XX.jsonl`: one `{"text", "start_id", "prefix_length"}`
line per sequence.

Speed (utils/decode.py): batch_size rows decode together, one forward per token through a preallocated
KV cache, and a row whose sequence ends is refilled at once with the next waiting one, so the batch stays
full.

Resume: each line is appended with one write() as its sequence ends. A rerun drops a torn last
line, regenerates only the segments (8 batches' worth of sequences) that are not complete (whole, so
their rows see the same numerics as before) and writes only the missing sequences. Sampling noise comes from a generator
seeded by (seed, start id, prefix length), so a resumed shard has the same texts as an
uninterrupted one (same machine, same batch size).
"""
import argparse
import hashlib
import logging
import os
import time

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.dtypes import DTYPES, resolve_dtype
from models.quant_model import read_config
from utils.constants import EMBEDDED_MODEL
from utils.decode import Sampling, generate_batch
from utils.errors import InputError
from utils.model_zoo import resolve_model
from utils.shards import ShardFile

logger = logging.getLogger("llm_qat.generate")

MAX_BATCH_SIZE = 256  # the fastest of 32-256 on a 2-core CPU (embedded model); GPU memory binds first for 7B
SEGMENT_BATCHES = 8  # a segment holds 8 batches of sequences: refilled rows keep the batch full for 7/8 of it


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="generate_data.py", description="LLM-QAT data-free generation of one shard: "
        "CUDA_VISIBLE_DEVICES=i python generate_data.py i")
    p.add_argument("shard", type=int, help="shard index i; writes <out_dir>/gen.chunk.<i, two digits>.jsonl")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="local HF model directory, or a packaged model's name "
                   "(smollm2: tools/get_model.py); default: the embedded model")
    p.add_argument("--out_dir", default="gen_data")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--n_vocab", type=int, default=500,
                       help="shard i owns start ids [i*n_vocab, (i+1)*n_vocab), clipped to the vocabulary")
    split.add_argument("--num_shards", type=int, default=None,
                       help="instead: shard i owns the i-th of num_shards equal slices of the vocabulary")
    p.add_argument("--prefix_lengths", type=int, nargs="+", default=[3, 4, 5],
                   help="greedy tokens up to this length (start id included), then sampling; 1: pure sampling, "
                   "max_length: pure greedy")
    p.add_argument("--max_length", type=int, default=2048, help="tokens per sequence at most (start id included); "
                   "capped to the model's max_position_embeddings")
    p.add_argument("--batch_size", type=int, default=None, help="sequences decoded together (default: as many as "
                   f"fit in memory with a KV cache of max_length tokens, at most {MAX_BATCH_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; each sequence draws from its own stream")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on GPU, and on CPUs "
                   "with native bf16 (AVX512-BF16/AMX) for models of hidden size >= 512; else float32 (the original's)")
    return p.parse_args(argv)


def shard_ids(shard, vocab_size, n_vocab=500, num_shards=None):
    """The start ids a shard owns: the original's [i*n_vocab, (i+1)*n_vocab), or the i-th of num_shards slices."""
    if num_shards is not None:
        if not 1 <= num_shards <= vocab_size:
            raise InputError(f"--num_shards {num_shards}: must be 1-{vocab_size} (the vocabulary size)")
        if not 0 <= shard < num_shards:
            raise InputError(f"shard {shard}: must be 0-{num_shards - 1} with --num_shards {num_shards}")
        return range(shard * vocab_size // num_shards, (shard + 1) * vocab_size // num_shards)
    if n_vocab < 1:
        raise InputError(f"--n_vocab {n_vocab}: must be >= 1")
    last = (vocab_size - 1) // n_vocab
    if not 0 <= shard <= last:
        raise InputError(f"shard {shard}: must be 0-{last} (vocabulary of {vocab_size} ids, --n_vocab {n_vocab})")
    return range(shard * n_vocab, min((shard + 1) * n_vocab, vocab_size))


def sequence_seed(seed, start_id, prefix_length):
    """A sequence's own random stream: its text does not depend on its batch or on interruptions."""
    digest = hashlib.sha256(f"{seed}/{start_id}/{prefix_length}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def plan_segments(start_ids, prefix_lengths, batch_size):
    """A shard's fixed segments of (start id, prefix length) pairs, in the original's order (prefix length,
    then start id). A segment (SEGMENT_BATCHES batches' worth) decodes with batch_size refilled rows and is the
    unit of resume: an interrupted segment is regenerated whole, so its rows see the same numerics as before."""
    pairs = [(i, j) for j in prefix_lengths for i in start_ids]
    size = batch_size * SEGMENT_BATCHES
    return [pairs[k:k + size] for k in range(0, len(pairs), size)]


def default_batch_size(model, max_length):
    """As many sequences as fit with a full KV cache of max_length tokens in 80% of the device's memory
    beside the weights, at most MAX_BATCH_SIZE. From total, not free, memory, so a rerun gets the same
    batches (and texts)."""
    if model.device.type == "cuda":
        memory = torch.cuda.get_device_properties(model.device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    # keys and values of max_length slots per row (utils.decode)
    per_sequence = 2 * cfg.num_hidden_layers * kv_heads * head_dim * max_length * model.dtype.itemsize
    return int(max(1, min(MAX_BATCH_SIZE, (0.8 * memory - model.get_memory_footprint()) // per_sequence)))


def write_sequences(model, tokenizer, shard_file, segments, done, max_length, seed, sampling, eos_ids, desc,
                    batch_size):
    """Run the segments that miss sequences and append each missing sequence as it ends.
    Returns (sequences written, their generated tokens)."""
    total = sum(map(len, segments))
    written = tokens = 0
    start = time.time()
    with tqdm(total=total, initial=len(done), unit="seq", desc=desc, dynamic_ncols=True) as bar:
        for segment in segments:
            if all(pair in done for pair in segment):
                continue
            ids, prefix_lengths = zip(*segment)
            seeds = [sequence_seed(seed, i, j) for i, j in segment]
            for k, seq in generate_batch(model, ids, prefix_lengths, max_length, sampling, seeds, eos_ids, batch_size):
                if segment[k] in done:  # written before the interruption; regenerated only to keep the numerics
                    continue
                i, j = segment[k]
                text = tokenizer.decode(seq, skip_special_tokens=True)
                shard_file.append({"text": text, "start_id": i, "prefix_length": j})
                written += 1
                tokens += len(seq) - 1
                bar.update(1)
                bar.set_postfix_str(f"{tokens / max(time.time() - start, 1e-9):.0f} tok/s", refresh=False)
            shard_file.sync()
    return written, tokens


def eos_token_ids(model):
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def load_generator(path, dtype="auto"):
    """The model on the GPU if there is one; dtype "auto": bfloat16 where it pays (models.dtypes.bf16_pays)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[resolve_dtype(dtype, read_config(path))]
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def check_settings(start_ids, prefix_lengths, max_length, batch_size, config, tokenizer):
    """Bad settings fail here, before anything is written. Returns max_length capped to the model's context."""
    if max_length < 2:
        raise InputError(f"--max_length {max_length}: must be >= 2")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch_size {batch_size}: must be >= 1")
    vocab_size = vocab_of(config, tokenizer)
    if not (len(start_ids) and 0 <= min(start_ids) and max(start_ids) < vocab_size):
        raise InputError(f"start ids {start_ids}: must be a non-empty range within the vocabulary 0-{vocab_size - 1}")
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit and max_length > limit:
        logger.info("--max_length %d capped to the model's max_position_embeddings %d", max_length, limit)
        max_length = limit
    for j in prefix_lengths:
        if not 1 <= j <= max_length:
            raise InputError(f"--prefix_lengths {j}: must be 1 <= j <= max_length {max_length}")
    if len(set(prefix_lengths)) < len(prefix_lengths):
        raise InputError(f"--prefix_lengths {' '.join(map(str, prefix_lengths))}: a length is repeated")
    return max_length


def vocab_of(config, tokenizer):
    return min(len(tokenizer), config.get_text_config().vocab_size)  # padded embedding rows are no tokens


def load_config_and_tokenizer(model):
    config = read_config(model)
    try:
        return config, AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise InputError(f"--model {model!r}: cannot load its tokenizer ({e})") from None


def generate_shard(model, start_ids, out_dir="gen_data", shard=0, prefix_lengths=(3, 4, 5), max_length=2048,
                   batch_size=None, seed=0, dtype="auto"):
    """Write shard `shard` of out_dir: one sequence per (start id, prefix length), start_ids a range (any step);
    or complete an interrupted one. Returns the shard's path."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--out_dir {out_dir!r} is a file, not a directory")
    model = resolve_model(model)
    config, tokenizer = load_config_and_tokenizer(model)
    prefix_lengths = list(prefix_lengths)
    max_length = check_settings(start_ids, prefix_lengths, max_length, batch_size, config, tokenizer)
    ids = start_ids
    dtype = resolve_dtype(dtype, config)
    meta = {"model": os.path.abspath(model), "start_ids": [ids.start, ids.stop],
            **({"id_step": ids.step} if ids.step != 1 else {}),
            "prefix_lengths": prefix_lengths, "max_length": max_length, "seed": seed, "dtype": dtype}
    shard_file = ShardFile(out_dir, shard)
    shard_file.check_meta(meta)
    expected = {(i, j) for j in prefix_lengths for i in ids}
    done, _ = shard_file.scan(expected)
    name = f"shard {shard:02d}"
    if len(done) == len(expected):
        print(f"{name}: complete, all {len(expected)} sequences are in {shard_file.path}; nothing to do")
        return shard_file.path

    net = load_generator(model, dtype)
    sampling = Sampling.of(net.generation_config)
    batch_size = batch_size or default_batch_size(net, max_length)
    logger.info("%s: start ids %s, prefix lengths %s, max_length %d, batch size %d, %s on %s, %s", name,
                f"{ids.start}-{ids.stop - 1}" + (f" step {ids.step}" if ids.step != 1 else ""), prefix_lengths,
                max_length, batch_size, dtype, net.device, sampling)
    try:
        done = shard_file.open(expected, {**meta, "num_sequences": len(expected)})
        start = time.time()
        segments = plan_segments(ids, prefix_lengths, batch_size)
        written, tokens = write_sequences(net, tokenizer, shard_file, segments, done, max_length, seed, sampling,
                                          eos_token_ids(net), desc=name, batch_size=batch_size)
    finally:
        shard_file.close()
    seconds = time.time() - start
    print(f"{name}: {written} sequences, {tokens} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.0f} "
          f"tokens/s); {len(done) + written} of {len(expected)} in {shard_file.path}")
    return shard_file.path


def main(argv=None):
    """generate_data.py: the command line in, one generate_shard() call."""
    args = parse_args(argv)
    model = resolve_model(args.model)
    config, tokenizer = load_config_and_tokenizer(model)
    ids = shard_ids(args.shard, vocab_of(config, tokenizer), args.n_vocab, args.num_shards)
    return generate_shard(model, ids, args.out_dir, args.shard, args.prefix_lengths, args.max_length,
                          args.batch_size, args.seed, args.dtype)
