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
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Calibration:
    """A calibrated baseline's text: up to `windows` windows of seq_len tokens of the files."""
    files: tuple
    windows: int
    seq_len: int  # capped at the model's context


@dataclass(frozen=True)
class EvalPlan:
    """One evaluation, resolved and checked by plan_evaluation before any weights load; run_plan runs it."""
    model: str  # local directory (a packaged name already fetched)
    config: object  # its config.json, read once
    method: str  # FP, QAT, or a baseline's name: RTN, SmoothQuant, GPTQ
    setting: QuantSetting
    alpha: float | None  # SmoothQuant's migration strength
    calibration: Calibration | None  # calibrated baselines only
    ppl_files: tuple
    seq_len: int  # capped at the model's context
    max_windows: int | None
    tasks: tuple
    limit: int | None
    batch_size: int
    shared_context: bool  # zero-shot: a question's context runs once for all its choices (utils/shared_context.py)
    dtype: str  # resolved, never "auto"
    output_json: str | None


def choose_method(path, config, setting=None, baseline=None, alpha=None):
    """(method, setting): a setting given -> that baseline (default RTN) of an FP model; no setting -> a saved
    QAT model's own setting, or FP."""
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


def plan_evaluation(model, setting=None, baseline=None, *, alpha=None, ppl_data=None, seq_len=2048, max_windows=None,
                    tasks=None, limit=None, batch_size=4, dtype="auto", calib_data=None, calib_windows=128,
                    calib_seq_len=512, output_json=None, shared_context=True):
    """evaluate()'s arguments resolved and checked once, as an EvalPlan: bad input fails here, before any
    weights load."""
    path = resolve_model(model)
    config = read_config(path)
    method, setting = choose_method(path, config, setting, baseline, alpha)
    if seq_len < 2:
        raise InputError(f"--seq_len {seq_len}: must be >= 2")
    context = getattr(config.get_text_config(), "max_position_embeddings", None) or seq_len
    calibration = None
    if method in BASELINES and BASELINES[method].calibrated:
        if calib_windows < 1 or calib_seq_len < 2:
            raise InputError(f"--calib_windows {calib_windows} --calib_seq_len {calib_seq_len}: "
                             "need >= 1 window of >= 2 tokens")
        files = default_calib_data(path) if calib_data is None else calib_data
        calibration = Calibration(tuple(f for spec in files for f in expand_paths(spec)), calib_windows,
                                  min(calib_seq_len, context))
    ppl_files = default_ppl_data(path, config) if ppl_data is None else ppl_data
    ppl_files = tuple(f for spec in ppl_files for f in expand_paths(spec))
    task_list = ()
    if tasks:
        from utils.zeroshot import resolve_tasks
        task_list = tuple(resolve_tasks(tasks))
    if seq_len > context:
        print(f"note: --seq_len {seq_len} > the model's max_position_embeddings {context}: windows of {context}")
    return EvalPlan(path, config, method, setting, alpha, calibration, ppl_files, min(seq_len, context), max_windows,
                    task_list, limit, batch_size, shared_context, resolve_dtype(dtype), output_json)


def load_planned(plan):
    """(model, tokenizer) of a plan: its weights (config passed, not read again), then its baseline's
    quantization, calibrated if the baseline needs it."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(plan.model, dtype=DTYPES[plan.dtype], config=plan.config).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(plan.model, config=plan.config)
    if plan.method in BASELINES:
        chosen, windows = BASELINES[plan.method], None
        if plan.calibration:
            windows = calibration_windows(tokenizer, plan.calibration)
            print(f"{plan.method}: calibrated on {len(windows)} windows of {windows.shape[1]} tokens"
                  + (f", alpha {plan.alpha}" if chosen.uses_alpha else ""))
        chosen.quantize(model, plan.setting, windows, plan.alpha)
    return model, tokenizer


def load_for_eval(model, setting=None, baseline=None, **kwargs):
    """(model, tokenizer, method, setting) as evaluate() would score them; kwargs: plan_evaluation's (dtype
    float32 unless given)."""
    plan = plan_evaluation(model, setting, baseline, **{"ppl_data": [], "dtype": "float32", **kwargs})
    return (*load_planned(plan), plan.method, plan.setting)


def calibration_windows(tokenizer, calibration):
    """Up to calibration.windows windows [n, seq_len] of the files' tokens."""
    files, seq_len = list(calibration.files), calibration.seq_len
    ids = torch.cat([tokenize_texts(read_texts(f), tokenizer) for f in files])
    windows = BlockDataset(ids, seq_len).blocks[:calibration.windows]
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
    p.add_argument("--batch_size", type=int, default=4, help="perplexity windows per forward pass; zero-shot: "
                   "questions (contexts) per pass, each with all its choices")
    p.add_argument("--shared_context", type=_flag, default=True, metavar="{True,False}", help="zero-shot: run a "
                   "question's context once for all its choices (default; the same scores up to float rounding, "
                   "1.8-2.5x faster on SmolLM2); False: lm-eval's HFLM, one whole sequence per choice")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--output_json", default=None, help="also write the results here (atomically)")
    return p.parse_args(argv)


def _flag(text):
    if text not in ("True", "False"):
        raise argparse.ArgumentTypeError(f"{text!r}: use True or False")
    return text == "True"


def default_ppl_data(model_path, config):
    base = getattr(config, "llmqat_teacher", model_path)  # a student: the model it came from
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
             calib_seq_len=512, output_json=None, shared_context=True):
    """Perplexity on each ppl_data file (None: the default held-out text; []: none) and zero-shot tasks (a comma
    list) of a model directory or packaged model's name: FP, a QAT checkpoint, an export, or an FP model
    quantized to setting by a training-free baseline (RTN, SmoothQuant with alpha, GPTQ). Returns the result
    dict, also written atomically to output_json."""
    return run_plan(plan_evaluation(
        model, setting, baseline, alpha=alpha, ppl_data=ppl_data, seq_len=seq_len, max_windows=max_windows,
        tasks=tasks, limit=limit, batch_size=batch_size, dtype=dtype, calib_data=calib_data,
        calib_windows=calib_windows, calib_seq_len=calib_seq_len, output_json=output_json,
        shared_context=shared_context))


def run_plan(plan):
    """Load, then score a checked plan: evaluate()'s result dict."""
    net, tokenizer = load_planned(plan)
    method, setting, seq_len = plan.method, plan.setting, plan.seq_len
    result = {"model": plan.model, "method": method, "bits": setting.label, "ppl": {}, "tasks": {}}
    if method == "SmoothQuant":
        result["smoothquant"] = {"alpha": plan.alpha, "calib_data": list(plan.calibration.files)}
    if method == "GPTQ":
        result["gptq"] = {"calib_data": list(plan.calibration.files)}
    print(f"{plan.model}: {method} W-A-KV {setting.label}, {plan.dtype} on {net.device}")
    for path in plan.ppl_files:
        ids = tokenize_texts(read_texts(path), tokenizer)
        name = os.path.splitext(os.path.basename(path))[0]
        r = result["ppl"][name] = {"path": path, **perplexity(net, ids, seq_len, plan.batch_size, plan.max_windows,
                                                              desc=name)}
        print(f"perplexity {name}: {r['ppl']:.4f}  ({r['windows']} windows of {seq_len} tokens)")
    if plan.tasks:
        from utils.zeroshot import evaluate_tasks
        result["tasks"] = evaluate_tasks(net, tokenizer, list(plan.tasks), batch_size=plan.batch_size,
                                         limit=plan.limit, shared_context=plan.shared_context)
        for name, r in result["tasks"].items():
            norm = "" if r.get("acc_norm") is None else f"  acc_norm {r['acc_norm']:.4f}"
            print(f"zero-shot {name}: acc {r['acc']:.4f}{norm}  ({r['n']} docs)")
    if plan.output_json:
        write_json(plan.output_json, result)
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
                    calib_windows=args.calib_windows, calib_seq_len=args.calib_seq_len, output_json=args.output_json,
                    shared_context=args.shared_context)


def write_json(path, obj):
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2)
