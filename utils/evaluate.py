"""Evaluation (eval.py): perplexity over fixed windows and zero-shot tasks, for an FP model, a QAT
checkpoint, an export, or an FP model quantized without training (RTN: --w_bits/--a_bits/--kv_bits;
SmoothQuant: the same plus --smoothquant ALPHA; GPTQ weights: plus --gptq; both calibrated on text).

Perplexity: the texts of a jsonl file are tokenized (BOS before each text, as training reads them),
concatenated and cut into non-overlapping windows of seq_len tokens; the remainder is dropped.
ppl = exp(total NLL / predicted tokens), the first token of each window is not predicted. On
prepare_eval_data.py's wiki2.jsonl (the test split joined by "\n\n" as one text) this is the GPTQ
convention exactly. seq_len 2048 is the GPTQ-style figure; the original LLM-QAT evaluated 1024.
"""
import argparse
import json
import logging
import math
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

from models.quant_model import DTYPES, check_bits, is_quantized_config, load_model, quantize_model, resolve_dtype
from utils.data import BlockDataset, expand_paths, read_texts, tokenize_texts
from utils.errors import InputError
from utils.io import atomic_write
from utils.model_zoo import resolve_model
from utils.process_args import EMBEDDED_EVAL, EMBEDDED_MODEL, EMBEDDED_TRAIN

logger = logging.getLogger("llm_qat.eval")
GENERATED = os.path.join("gen_data", "all_gen.jsonl")  # merge_gen_data.py's output


@torch.inference_mode()
def perplexity(model, ids, seq_len, batch_size=1, max_windows=None, desc="perplexity"):
    """Perplexity of token ids over non-overlapping windows of seq_len: {ppl, nll, windows, tokens}."""
    windows = BlockDataset(ids, seq_len).blocks[:max_windows].to(model.device)
    n = len(windows)
    if n == 0:
        raise InputError(f"{len(ids)} tokens: fewer than one window of {seq_len}")
    nll = 0.0
    for i in tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False):
        batch = windows[i:i + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
    tokens = n * (seq_len - 1)
    return {"ppl": math.exp(nll / tokens), "nll": nll / tokens, "windows": n, "seq_len": seq_len, "tokens": tokens}


def eval_setting(path, w_bits=None, a_bits=None, kv_bits=None, smoothquant=None, gptq=False):
    """(method, bits) of what eval.py will run, checked before any loading: bits given -> RTN of an FP
    model (SmoothQuant with an alpha, GPTQ weights with gptq); a saved QAT model -> its own bits; else FP."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"model {path!r}: not a local Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(path)
    if smoothquant is not None and not 0 < smoothquant <= 1:
        raise InputError(f"--smoothquant {smoothquant}: the migration strength alpha must be in (0, 1] (paper: 0.5)")
    if smoothquant is not None and gptq:
        raise InputError("--smoothquant and --gptq are separate baselines: pass one")
    if gptq and w_bits not in range(3, 9):
        raise InputError(f"--gptq needs --w_bits 3-8 (the symmetric per-channel grid), not {w_bits}")
    if all(b is None for b in (w_bits, a_bits, kv_bits)):
        if smoothquant is not None:
            raise InputError("--smoothquant needs the bits to quantize to: --w_bits/--a_bits/--kv_bits")
        if is_quantized_config(config):
            return "QAT", (config.w_bits, config.a_bits, config.kv_bits)
        return "FP", (32, 32, 32)
    if is_quantized_config(config):
        raise InputError(f"model {path!r} is already quantized (W{config.w_bits}-A{config.a_bits}-KV{config.kv_bits}); "
                         "--w_bits/--a_bits/--kv_bits apply to a full-precision model (the RTN baseline)")
    bits = tuple(32 if b is None else b for b in (w_bits, a_bits, kv_bits))
    try:
        check_bits(*bits)
    except ValueError as e:
        raise InputError(str(e)) from None
    return ("GPTQ" if gptq else "RTN" if smoothquant is None else "SmoothQuant"), bits


def load_for_eval(path, w_bits=None, a_bits=None, kv_bits=None, kv_post_rope=False, dtype=torch.float32,
                  setting=None, smoothquant=None, gptq=False, calibration=None):
    """(model, tokenizer, method, bits) for eval_setting's (method, bits), passed in if already checked.
    SmoothQuant, GPTQ: calibration = (jsonl files, windows, seq_len)."""
    method, bits = setting or eval_setting(path, w_bits, a_bits, kv_bits, smoothquant, gptq)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if method in ("SmoothQuant", "GPTQ"):
        windows = calibration_windows(model, tokenizer, *calibration)
        what = f"{len(windows)} windows of {windows.shape[1]} tokens"
        if method == "SmoothQuant":
            from models.smoothquant import activation_absmax, smooth
            smooth(model, activation_absmax(model, windows), smoothquant)
            print(f"SmoothQuant: alpha {smoothquant}, activation maxima from {what}")
        else:
            from models.gptq import gptq_model
            gptq_model(model, windows, bits[0])
            print(f"GPTQ: W{bits[0]} weights calibrated on {what}")
    if method in ("RTN", "SmoothQuant", "GPTQ"):
        # GPTQ's weights are on their grid already (w 32); activations and KV are quantized as RTN's
        quantize_model(model, *((32, *bits[1:]) if method == "GPTQ" else bits), kv_post_rope=kv_post_rope)
    return model, tokenizer, method, "-".join(map(str, bits))


def calibration_windows(model, tokenizer, files, n, seq_len):
    """Up to n windows [n, seq_len] of the files' tokens, seq_len capped at the model's context."""
    seq_len = min(seq_len, getattr(model.config.get_text_config(), "max_position_embeddings", seq_len))
    ids = torch.cat([tokenize_texts(read_texts(f), tokenizer) for f in files])
    windows = BlockDataset(ids, seq_len).blocks[:n]
    if len(windows) == 0:
        raise InputError(f"calibration data {files}: {len(ids)} tokens, fewer than one window of {seq_len}")
    return windows


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="eval.py", description="Perplexity and zero-shot accuracy of an FP model, a QAT "
                                "checkpoint, or an FP model quantized without training (RTN).")
    p.add_argument("model", help="local HF model directory: FP, a train.py output, or an export.py output; or a "
                   "packaged model's name (smollm2)")
    for name in ("w_bits", "a_bits", "kv_bits"):
        p.add_argument(f"--{name}", type=int, default=None, help="quantize an FP model without training (RTN); "
                       "an omitted width stays 32")
    p.add_argument("--kv_post_rope", action="store_true", help="RTN: quantize keys after RoPE")
    p.add_argument("--smoothquant", type=float, default=None, metavar="ALPHA", help="with the bits: SmoothQuant "
                   "baseline, migration strength alpha in (0, 1] (paper: 0.5), then the same quantizers as RTN")
    p.add_argument("--gptq", action="store_true", help="with the bits: GPTQ-round the weights (w_bits 3-8) on the "
                   "same grid instead of RTN; activations and KV as RTN")
    p.add_argument("--calib_data", nargs="+", default=None, help="SmoothQuant / GPTQ calibration jsonl (default: "
                   "gen_data/all_gen.jsonl, the self-generated data; the embedded model: its training text)")
    p.add_argument("--calib_windows", type=int, default=128, help="SmoothQuant / GPTQ: calibration windows")
    p.add_argument("--calib_seq_len", type=int, default=512, help="SmoothQuant / GPTQ: tokens per calibration window")
    p.add_argument("--ppl_data", nargs="*", default=None, help="jsonl {'text'} files, one perplexity each (default: "
                   "the held-out Shakespeare for the embedded model, else wiki2.jsonl from prepare_eval_data.py); "
                   "none given: skip perplexity")
    p.add_argument("--seq_len", type=int, default=2048, help="perplexity window (GPTQ-style 2048; the original "
                   "LLM-QAT used 1024); capped at the model's max_position_embeddings")
    p.add_argument("--max_windows", type=int, default=None, help="at most this many windows per file (c4.jsonl: 256)")
    p.add_argument("--tasks", default=None, help="zero-shot tasks (lm-eval-harness): comma list, local tasks in "
                   "tasks/ (shakespeare_nextline), or 'paper' for the paper's eight (needs the HF hub)")
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--output_json", default=None, help="also write the results here (atomically)")
    return p.parse_args(argv)


def default_ppl_data(model_path):
    if os.path.realpath(model_path) == os.path.realpath(EMBEDDED_MODEL):
        return [EMBEDDED_EVAL]
    if os.path.isfile("wiki2.jsonl"):
        return ["wiki2.jsonl"]
    raise InputError("no perplexity data: pass --ppl_data FILE.jsonl (python prepare_eval_data.py writes wiki2.jsonl), "
                     "or --ppl_data with no file to skip perplexity")


def default_calib_data(model_path):
    if os.path.isfile(GENERATED):
        return [GENERATED]
    if os.path.realpath(model_path) == os.path.realpath(EMBEDDED_MODEL):
        return [EMBEDDED_TRAIN]
    raise InputError(f"no calibration data for --smoothquant / --gptq: pass --calib_data FILE.jsonl "
                     f"(e.g. {GENERATED} from generate_data.py + merge_gen_data.py)")


def evaluate(args):
    args.model = resolve_model(args.model)
    setting = eval_setting(args.model, args.w_bits, args.a_bits, args.kv_bits, args.smoothquant, args.gptq)
    if args.seq_len < 2:
        raise InputError(f"--seq_len {args.seq_len}: must be >= 2")
    calibration = None
    if setting[0] in ("SmoothQuant", "GPTQ"):
        if args.calib_windows < 1 or args.calib_seq_len < 2:
            raise InputError(f"--calib_windows {args.calib_windows} --calib_seq_len {args.calib_seq_len}: "
                             "need >= 1 window of >= 2 tokens")
        files = default_calib_data(args.model) if args.calib_data is None else args.calib_data
        calibration = ([f for spec in files for f in expand_paths(spec)], args.calib_windows, args.calib_seq_len)
    ppl_files = default_ppl_data(args.model) if args.ppl_data is None else args.ppl_data
    ppl_files = [f for spec in ppl_files for f in expand_paths(spec)]  # fail on a missing file before loading
    tasks = []
    if args.tasks:
        from utils.zeroshot import resolve_tasks
        tasks = resolve_tasks(args.tasks)
    dtype = resolve_dtype(args.dtype)
    model, tokenizer, method, bits = load_for_eval(args.model, kv_post_rope=args.kv_post_rope, dtype=DTYPES[dtype],
                                                   setting=setting, smoothquant=args.smoothquant,
                                                   gptq=args.gptq, calibration=calibration)
    seq_len = args.seq_len
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", seq_len)
    if seq_len > limit:
        print(f"note: --seq_len {seq_len} > the model's max_position_embeddings {limit}: windows of {limit}")
        seq_len = limit
    result = {"model": args.model, "method": method, "bits": bits, "ppl": {}, "tasks": {}}
    if method == "SmoothQuant":
        result["smoothquant"] = {"alpha": args.smoothquant, "calib_data": calibration[0]}
    if method == "GPTQ":
        result["gptq"] = {"calib_data": calibration[0]}
    print(f"{args.model}: {method} W-A-KV {bits}, {dtype} on {model.device}")
    for path in ppl_files:
        ids = tokenize_texts(read_texts(path), tokenizer)
        name = os.path.splitext(os.path.basename(path))[0]
        r = result["ppl"][name] = {"path": path, **perplexity(model, ids, seq_len, args.batch_size, args.max_windows,
                                                               desc=name)}
        print(f"perplexity {name}: {r['ppl']:.4f}  ({r['windows']} windows of {seq_len} tokens)")
    if tasks:
        from utils.zeroshot import evaluate_tasks
        result["tasks"] = evaluate_tasks(model, tokenizer, tasks, batch_size=args.batch_size, limit=args.limit)
        for name, r in result["tasks"].items():
            norm = "" if r.get("acc_norm") is None else f"  acc_norm {r['acc_norm']:.4f}"
            print(f"zero-shot {name}: acc {r['acc']:.4f}{norm}  ({r['n']} docs)")
    if args.output_json:
        write_json(args.output_json, result)
    return result


def write_json(path, obj):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)
