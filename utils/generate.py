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
import fcntl
import hashlib
import json
import logging
import os
import time

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from models.quant_model import DTYPES, resolve_dtype
from utils.decode import Sampling, generate_batch
from utils.errors import InputError
from utils.model_zoo import resolve_model
from utils.process_args import EMBEDDED_MODEL

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


class ShardFile:
    """gen.chunk.XX.jsonl, append-only, and its sidecar gen.chunk.XX.meta.json (the generation settings)."""

    def __init__(self, out_dir, shard):
        self.path = os.path.join(out_dir, f"gen.chunk.{shard:02d}.jsonl")
        self.meta_path = os.path.join(out_dir, f"gen.chunk.{shard:02d}.meta.json")
        self.fd = None

    def check_meta(self, meta):
        """A shard resumes only with the settings it was started with (else its lines would mix two corpora)."""
        if not os.path.exists(self.meta_path):
            return
        with open(self.meta_path, encoding="utf-8") as f:
            old = json.load(f)
        for key, value in meta.items():
            if old.get(key) != value:
                raise InputError(f"{self.path} was started with {key}={old.get(key)!r}, not {value!r}: "
                                 "rerun with the same arguments, or use another --out_dir")

    def scan(self, expected):
        """(start id, prefix length) pairs already written, and the byte size of the complete lines.
        A last line without newline is a write cut short by a kill; any other bad line is an error."""
        done, good_size = set(), 0
        if not os.path.exists(self.path):
            return done, good_size
        with open(self.path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    break  # torn last line
                try:
                    record = json.loads(line)
                    key = (record["start_id"], record["prefix_length"])
                    if not isinstance(record["text"], str):
                        raise TypeError("'text' is not a string")
                except (ValueError, KeyError, TypeError) as e:
                    raise InputError(f"{self.path}:{n}: not a generated line ({e}); "
                                     "move the file away to regenerate the shard") from None
                if key not in expected or key in done:
                    raise InputError(f"{self.path}:{n}: (start id, prefix length) {key} is "
                                     f"{'a duplicate' if key in done else 'not in this shard'}: the file "
                                     "was written with other arguments; use another --out_dir")
                done.add(key)
                good_size += len(line)
        return done, good_size

    def open(self, expected, meta):
        """Lock the shard for this process, cut a torn last line, write the sidecar; returns the pairs done."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel even on kill -9
        except BlockingIOError:
            raise InputError(f"{self.path} is being written by another process (same shard running twice?)") from None
        done, good_size = self.scan(expected)
        torn = os.fstat(self.fd).st_size - good_size
        if torn:
            logger.info("%s: dropping a torn last line (%d bytes) left by an interrupted run", self.path, torn)
            os.ftruncate(self.fd, good_size)
        if not os.path.exists(self.meta_path):
            tmp = self.meta_path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)
            os.replace(tmp, self.meta_path)
        return done

    def append(self, record):
        # One write() per line on an O_APPEND file: a kill leaves whole lines, or one torn last line.
        os.write(self.fd, (json.dumps(record) + "\n").encode("utf-8"))

    def sync(self):
        os.fsync(self.fd)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


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
    # keys and values of 2 * max_length slots (utils.decode: rows of different ages share the cache)
    per_sequence = 2 * cfg.num_hidden_layers * kv_heads * head_dim * 2 * max_length * model.dtype.itemsize
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


def load_model(path, dtype="auto"):
    """The model on the GPU if there is one; dtype "auto": bfloat16 where it pays (models.quant_model.bf16_pays)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[resolve_dtype(dtype, AutoConfig.from_pretrained(path))]
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def check_args(args, config, tokenizer, ids=None):
    """Bad arguments fail here, before anything is written. Returns (start ids, max_length)."""
    if args.max_length < 2:
        raise InputError(f"--max_length {args.max_length}: must be >= 2")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch_size {args.batch_size}: must be >= 1")
    text_config = config.get_text_config()
    vocab_size = min(len(tokenizer), text_config.vocab_size)  # padded embedding rows are no tokens
    if ids is None:
        ids = shard_ids(args.shard, vocab_size, args.n_vocab, args.num_shards)
    elif not (len(ids) and 0 <= min(ids) and max(ids) < vocab_size):
        raise InputError(f"start ids {ids}: must be a non-empty range within the vocabulary 0-{vocab_size - 1}")
    max_length = args.max_length
    limit = getattr(text_config, "max_position_embeddings", None)
    if limit and max_length > limit:
        logger.info("--max_length %d capped to the model's max_position_embeddings %d", max_length, limit)
        max_length = limit
    for j in args.prefix_lengths:
        if not 1 <= j <= max_length:
            raise InputError(f"--prefix_lengths {j}: must be 1 <= j <= max_length {max_length}")
    if len(set(args.prefix_lengths)) < len(args.prefix_lengths):
        raise InputError(f"--prefix_lengths {' '.join(map(str, args.prefix_lengths))}: a length is repeated")
    return ids, max_length


def generate_shard(args, ids=None):
    """generate_data.py: write one shard, or complete an interrupted one. ids (a range, any step) replaces the
    shard's own slice of the vocabulary (the reproduction samples the vocabulary with a stride)."""
    args.model = resolve_model(args.model)
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise InputError(f"--model {args.model!r}: not a local Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise InputError(f"--model {args.model!r}: cannot load its tokenizer ({e})") from None
    ids, max_length = check_args(args, config, tokenizer, ids)
    dtype = resolve_dtype(args.dtype, config)
    meta = {"model": os.path.abspath(args.model), "start_ids": [ids.start, ids.stop],
            **({"id_step": ids.step} if ids.step != 1 else {}),
            "prefix_lengths": args.prefix_lengths, "max_length": max_length, "seed": args.seed, "dtype": dtype}
    shard_file = ShardFile(args.out_dir, args.shard)
    shard_file.check_meta(meta)
    expected = {(i, j) for j in args.prefix_lengths for i in ids}
    done, _ = shard_file.scan(expected)
    name = f"shard {args.shard:02d}"
    if len(done) == len(expected):
        print(f"{name}: complete, all {len(expected)} sequences are in {shard_file.path}; nothing to do")
        return

    model = load_model(args.model, dtype)
    sampling = Sampling.of(model.generation_config)
    batch_size = args.batch_size or default_batch_size(model, max_length)
    logger.info("%s: start ids %s, prefix lengths %s, max_length %d, batch size %d, %s on %s, %s", name,
                f"{ids.start}-{ids.stop - 1}" + (f" step {ids.step}" if ids.step != 1 else ""), args.prefix_lengths, max_length, batch_size, dtype, model.device, sampling)
    try:
        done = shard_file.open(expected, {**meta, "num_sequences": len(expected)})
        start = time.time()
        segments = plan_segments(ids, args.prefix_lengths, batch_size)
        written, tokens = write_sequences(model, tokenizer, shard_file, segments, done, max_length, args.seed, sampling,
                                          eos_token_ids(model), desc=name, batch_size=batch_size)
    finally:
        shard_file.close()
    seconds = time.time() - start
    print(f"{name}: {written} sequences, {tokens} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.0f} "
          f"tokens/s); {len(done) + written} of {len(expected)} in {shard_file.path}")
