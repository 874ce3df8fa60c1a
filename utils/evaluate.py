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
from transformers import AutoTokenizer

from models.baselines import BASELINES, baseline as get_baseline
from models.dtypes import DTYPES, resolve_dtype
from models.quant_model import QuantSetting, load_model, read_config
from utils.data import BlockDataset, expand_paths, read_texts, tokenize_texts
from utils.errors import InputError
from utils.io import atomic_write
from utils.model_zoo import resolve_model
from utils.constants import EMBEDDED_EVAL, EMBEDDED_MODEL, EMBEDDED_TRAIN, GENERATED

logger = logging.getLogger("llm_qat.eval")


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


def eval_plan(path, setting=None, baseline=None, alpha=None):
    """(method, setting) of what evaluation will run, checked before any loading: a setting given -> that
    baseline (default RTN) of an FP model; no setting -> a saved QAT model's own setting, or FP."""
    config = read_config(path)
    saved = QuantSetting.from_config(config)
    if setting is None:
        if baseline not in (None, "RTN"):
            raise InputError(f"--{baseline.lower()} needs the bits to quantize to: --w_bits/--a_bits/--kv_bits")
        return ("QAT", saved) if saved is not None else ("FP", QuantSetting())
    if saved is not None:
        raise InputError(f"model {path!r} is already quantized ({saved.name}); --w_bits/--a_bits/--kv_bits "
                         "apply to a full-precision model (the RTN baseline)")
    chosen = get_baseline(baseline or "RTN")
    chosen.check(setting, alpha)
    return chosen.name, setting


def load_for_eval(path, setting=None, baseline=None, alpha=None, calibration=None, dtype=torch.float32, plan=None):
    """(model, tokenizer, method, setting) for eval_plan's (method, setting), passed in as plan if checked.
    SmoothQuant, GPTQ: calibration = (jsonl files, windows, seq_len)."""
    method, setting = plan or eval_plan(path, setting, baseline, alpha)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if method in BASELINES:
        chosen, windows = BASELINES[method], None
        if chosen.calibrated:
            windows = calibration_windows(model, tokenizer, *calibration)
            print(f"{method}: calibrated on {len(windows)} windows of {windows.shape[1]} tokens"
                  + (f", alpha {alpha}" if chosen.uses_alpha else ""))
        chosen.quantize(model, setting, windows, alpha)
    return model, tokenizer, method, setting


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
    p.add_argument("--w_group_size", type=int, default=None, help="with the bits: one weight scale "
                   "per group of this many input columns (RTN, SmoothQuant, GPTQ); default: per output channel")
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
    base = getattr(read_config(model_path), "llmqat_teacher", model_path)  # a student: the model it came from
    if os.path.realpath(model_path) == os.path.realpath(EMBEDDED_MODEL) or (
            os.path.realpath(base) == os.path.realpath(EMBEDDED_MODEL)):
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


def evaluate(model, setting=None, baseline=None, *, alpha=None, ppl_data=None, seq_len=2048, max_windows=None,
             tasks=None, limit=None, batch_size=4, dtype="auto", calib_data=None, calib_windows=128,
             calib_seq_len=512, output_json=None):
    """Perplexity on each ppl_data file (None: the default held-out text; []: none) and zero-shot tasks (a comma
    list) of a model directory or packaged model's name: FP, a QAT checkpoint, an export, or an FP model
    quantized to setting by a training-free baseline (RTN, SmoothQuant with alpha, GPTQ). Returns the result
    dict, also written atomically to output_json."""
    model_path = resolve_model(model)
    plan = eval_plan(model_path, setting, baseline, alpha)
    method, setting = plan
    if seq_len < 2:
        raise InputError(f"--seq_len {seq_len}: must be >= 2")
    calibration = None
    if method in BASELINES and BASELINES[method].calibrated:
        if calib_windows < 1 or calib_seq_len < 2:
            raise InputError(f"--calib_windows {calib_windows} --calib_seq_len {calib_seq_len}: "
                             "need >= 1 window of >= 2 tokens")
        files = default_calib_data(model_path) if calib_data is None else calib_data
        calibration = ([f for spec in files for f in expand_paths(spec)], calib_windows, calib_seq_len)
    ppl_files = default_ppl_data(model_path) if ppl_data is None else ppl_data
    ppl_files = [f for spec in ppl_files for f in expand_paths(spec)]  # fail on a missing file before loading
    task_list = []
    if tasks:
        from utils.zeroshot import resolve_tasks
        task_list = resolve_tasks(tasks)
    dtype = resolve_dtype(dtype)
    net, tokenizer, method, setting = load_for_eval(model_path, alpha=alpha, calibration=calibration,
                                                    dtype=DTYPES[dtype], plan=plan)
    limit_len = getattr(net.config.get_text_config(), "max_position_embeddings", seq_len)
    if seq_len > limit_len:
        print(f"note: --seq_len {seq_len} > the model's max_position_embeddings {limit_len}: windows of {limit_len}")
        seq_len = limit_len
    result = {"model": model_path, "method": method, "bits": setting.label, "ppl": {}, "tasks": {}}
    if method == "SmoothQuant":
        result["smoothquant"] = {"alpha": alpha, "calib_data": calibration[0]}
    if method == "GPTQ":
        result["gptq"] = {"calib_data": calibration[0]}
    print(f"{model_path}: {method} W-A-KV {setting.label}, {dtype} on {net.device}")
    for path in ppl_files:
        ids = tokenize_texts(read_texts(path), tokenizer)
        name = os.path.splitext(os.path.basename(path))[0]
        r = result["ppl"][name] = {"path": path, **perplexity(net, ids, seq_len, batch_size, max_windows, desc=name)}
        print(f"perplexity {name}: {r['ppl']:.4f}  ({r['windows']} windows of {seq_len} tokens)")
    if task_list:
        from utils.zeroshot import evaluate_tasks
        result["tasks"] = evaluate_tasks(net, tokenizer, task_list, batch_size=batch_size, limit=limit)
        for name, r in result["tasks"].items():
            norm = "" if r.get("acc_norm") is None else f"  acc_norm {r['acc_norm']:.4f}"
            print(f"zero-shot {name}: acc {r['acc']:.4f}{norm}  ({r['n']} docs)")
    if output_json:
        write_json(output_json, result)
    return result


def main(argv=None):
    """eval.py: the command line in, one evaluate() call."""
    args = parse_args(argv)
    bits = (args.w_bits, args.a_bits, args.kv_bits)
    setting = None
    if any(b is not None for b in bits):
        setting = QuantSetting(*(32 if b is None else b for b in bits), kv_post_rope=args.kv_post_rope,
                               w_group_size=args.w_group_size)
    elif args.w_group_size is not None:
        raise InputError("--w_group_size needs the bits to quantize to (--w_bits ...)")
    if args.smoothquant is not None and args.gptq:
        raise InputError("--smoothquant and --gptq are separate baselines: pass one")
    baseline = "SmoothQuant" if args.smoothquant is not None else "GPTQ" if args.gptq else None
    return evaluate(args.model, setting, baseline, alpha=args.smoothquant, ppl_data=args.ppl_data,
                    seq_len=args.seq_len, max_windows=args.max_windows, tasks=args.tasks, limit=args.limit,
                    batch_size=args.batch_size, dtype=args.dtype, calib_data=args.calib_data,
                    calib_windows=args.calib_windows, calib_seq_len=args.calib_seq_len, output_json=args.output_json)


def write_json(path, obj):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)
