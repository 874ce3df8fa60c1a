"""Data-free generation (LLM-QAT): the full-precision model writes its own training corpus.

Every vocabulary id starts one sequence per prefix length j: the first j tokens (start id included)
are greedy, the rest sampled with the model's generation defaults, until EOS or max_length. One
process writes one shard, `<out_dir>/gen.chunk.XX.jsonl`: one `{"text", "start_id", "prefix_length"}`
line per sequence.

Speed: every prompt is one token (the start id), so the rows of a batch always have the same length
(no padding, no mask), whatever their prefix lengths; one forward per token through a preallocated
KV cache; a row that ends leaves the batch and the cache at once.

Resume: each line is appended with one write() as its sequence ends. A rerun drops a torn last
line, regenerates only the batches that are not complete (whole, so their rows see the same
numerics as before) and writes only the missing sequences. Sampling noise comes from a generator
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
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Cache
from transformers.cache_utils import DynamicLayer

from models.quant_model import DTYPES, resolve_dtype
from utils.errors import InputError
from utils.process_args import EMBEDDED_MODEL

logger = logging.getLogger("llm_qat.generate")

MAX_BATCH_SIZE = 256  # the fastest of 32-256 on a 2-core CPU (embedded model); GPU memory binds first for 7B


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="generate_data.py", description="LLM-QAT data-free generation of one shard: "
        "CUDA_VISIBLE_DEVICES=i python generate_data.py i")
    p.add_argument("shard", type=int, help="shard index i; writes <out_dir>/gen.chunk.<i, two digits>.jsonl")
    p.add_argument("--model", default=EMBEDDED_MODEL, help="local HF model directory (default: the embedded model)")
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
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
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


@dataclass(frozen=True)
class Sampling:
    """The model's sampling defaults, as model.generate(do_sample=True) applies them."""
    temperature: float = 1.0
    top_k: int = 50  # 0: the whole vocabulary
    top_p: float = 1.0

    @classmethod
    def of(cls, generation_config):
        def get(name, default):
            value = getattr(generation_config, name, None)
            return default if value is None else value
        for name, neutral in (("repetition_penalty", 1.0), ("typical_p", 1.0), ("min_p", None),
                              ("no_repeat_ngram_size", 0)):
            if getattr(generation_config, name, None) not in (None, neutral):
                logger.warning("generation_config.%s is not applied", name)
        sampling = cls(float(get("temperature", 1.0)), int(get("top_k", 50)), float(get("top_p", 1.0)))
        if sampling.temperature <= 0:
            raise InputError(f"generation_config.temperature {sampling.temperature}: must be > 0 for sampling")
        return sampling

    def sample(self, logits, u):
        """One token per row from softmax(logits / temperature) truncated to top-k / top-p, by inverse CDF
        at the row's uniform u (so the draw is the row's own, whatever else is in the batch)."""
        k = min(self.top_k or logits.shape[-1], logits.shape[-1])
        values, indices = (logits / self.temperature).topk(k)  # sorted, most likely first
        probs = values.softmax(-1)
        if self.top_p < 1.0:  # keep the most likely tokens until their mass reaches top_p
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= self.top_p, 0.0)
        cdf = probs.cumsum(-1)
        choice = (cdf < u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=k - 1)
        return indices.gather(-1, choice[:, None]).squeeze(-1)


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer with room for max_length tokens from the start: a step writes its key/value in
    place, where DynamicLayer's torch.cat copies the whole cache at every step (embedded model, 2-core
    CPU, 512 tokens: 2.3-3x the tokens/s of DynamicCache)."""

    def __init__(self, max_length):
        super().__init__()
        self.max_length, self.length = max_length, 0

    def lazy_initialization(self, key_states, value_states):
        batch, heads, _, dim = key_states.shape
        self.device = key_states.device
        self.key_buffer = key_states.new_empty(batch, heads, self.max_length, dim)
        self.value_buffer = value_states.new_empty(batch, value_states.shape[1], self.max_length, value_states.shape[3])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self):
        return self.length

    def batch_select_indices(self, indices):
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]


@torch.inference_mode()
def generate_batch(model, start_ids, prefix_lengths, max_length, sampling, seeds, eos_ids):
    """Hybrid decoding of one batch, row r: greedy up to prefix_lengths[r] tokens, then sampling, until EOS or
    max_length. Every prompt is one token, so rows stay the same length (no padding) whatever their prefix
    length. Yields (row, token ids) for each sequence as soon as it ends."""
    device = model.device
    rows = torch.arange(len(start_ids), device=device)  # batch row of each live sequence
    tokens = torch.tensor(list(start_ids), device=device)[:, None]
    greedy_until = torch.tensor(list(prefix_lengths), device=device)
    noise = torch.stack([torch.rand(max_length, generator=torch.Generator().manual_seed(s)) for s in seeds])
    noise = noise.to(device)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
    layers = model.config.get_text_config().num_hidden_layers
    cache = Cache(layers=[PreallocatedLayer(max_length) for _ in range(layers)])
    step_input = tokens
    while True:
        logits = model(input_ids=step_input, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()
        length = tokens.shape[1]
        greedy = length < greedy_until
        next_tokens = logits.argmax(-1)
        if not greedy.all():
            next_tokens = torch.where(greedy, next_tokens, sampling.sample(logits, noise[:, length]))
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
        if length + 1 == max_length:
            yield from zip(rows.tolist(), tokens.tolist())
            return
        ended = torch.isin(next_tokens, eos)
        if ended.any():
            yield from zip(rows[ended].tolist(), tokens[ended].tolist())
            keep = (~ended).nonzero().squeeze(1)
            if len(keep) == 0:
                return
            # Ended rows leave the batch and the cache, so they cost nothing from here on.
            rows, tokens, greedy_until, noise = rows[keep], tokens[keep], greedy_until[keep], noise[keep]
            next_tokens = next_tokens[keep]
            cache.batch_select_indices(keep)
        step_input = next_tokens[:, None]


def plan_batches(start_ids, prefix_lengths, batch_size):
    """A shard's fixed batches of (start id, prefix length) pairs, in the original's order (prefix length,
    then start id); a batch may span two prefix lengths, so batches stay full."""
    pairs = [(i, j) for j in prefix_lengths for i in start_ids]
    return [pairs[k:k + batch_size] for k in range(0, len(pairs), batch_size)]


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
    per_sequence = 2 * cfg.num_hidden_layers * kv_heads * head_dim * max_length * model.dtype.itemsize
    return int(max(1, min(MAX_BATCH_SIZE, (0.8 * memory - model.get_memory_footprint()) // per_sequence)))


def write_sequences(model, tokenizer, shard_file, batches, done, max_length, seed, sampling, eos_ids, desc):
    """Run the batches that miss sequences and append each missing sequence as it ends.
    Returns (sequences written, their generated tokens)."""
    total = sum(map(len, batches))
    written = tokens = 0
    start = time.time()
    with tqdm(total=total, initial=len(done), unit="seq", desc=desc, dynamic_ncols=True) as bar:
        for batch in batches:
            if all(pair in done for pair in batch):
                continue
            ids, prefix_lengths = zip(*batch)
            seeds = [sequence_seed(seed, i, j) for i, j in batch]
            for row, seq in generate_batch(model, ids, prefix_lengths, max_length, sampling, seeds, eos_ids):
                if batch[row] in done:  # written before the interruption; regenerated only to keep the batch
                    continue
                i, j = batch[row]
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
    """The model on the GPU if there is one, in bfloat16 there and float32 on CPU unless dtype says otherwise."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[resolve_dtype(dtype)]).to(device).eval()


def check_args(args, config, tokenizer):
    """Bad arguments fail here, before anything is written. Returns (start ids, max_length)."""
    if args.max_length < 2:
        raise InputError(f"--max_length {args.max_length}: must be >= 2")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch_size {args.batch_size}: must be >= 1")
    text_config = config.get_text_config()
    vocab_size = min(len(tokenizer), text_config.vocab_size)  # padded embedding rows are no tokens
    ids = shard_ids(args.shard, vocab_size, args.n_vocab, args.num_shards)
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


def generate_shard(args):
    """generate_data.py: write one shard, or complete an interrupted one."""
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise InputError(f"--model {args.model!r}: not a local Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        raise InputError(f"--model {args.model!r}: cannot load its tokenizer ({e})") from None
    ids, max_length = check_args(args, config, tokenizer)
    dtype = resolve_dtype(args.dtype)
    meta = {"model": os.path.abspath(args.model), "start_ids": [ids.start, ids.stop],
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
    logger.info("%s: start ids %d-%d, prefix lengths %s, max_length %d, batch size %d, %s on %s, %s", name,
                ids.start, ids.stop - 1, args.prefix_lengths, max_length, batch_size, dtype, model.device, sampling)
    try:
        done = shard_file.open(expected, {**meta, "num_sequences": len(expected)})
        start = time.time()
        batches = plan_batches(ids, args.prefix_lengths, batch_size)
        written, tokens = write_sequences(model, tokenizer, shard_file, batches, done, max_length, args.seed, sampling,
                                          eos_token_ids(model), desc=name)
    finally:
        shard_file.close()
    seconds = time.time() - start
    print(f"{name}: {written} sequences, {tokens} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.0f} "
          f"tokens/s); {len(done) + written} of {len(expected)} in {shard_file.path}")
