"""What limits LLM-QAT against QAT on real text on SmolLM2: held-out perplexity against training tokens.
Trains LLM-QAT (the model's own hybrid text), QAT-real (Shakespeare) and QAT-real (modern: the Debian handbook's
training chapters) at W-A-KV 4-8-4 on the first N blocks
of the reproduction's own training files, for each N given, with the table's recipe (its chosen learning
rate, batch 4 x 256, cosine, 1 epoch), and evaluates each student as the table does (plus milton_valid).
The full-budget points are the table's committed rows. A diagnosis, not a tuning: nothing is chosen on it.
Resumable: students under <work_dir>/models/curve*, points in results/smollm2_token_curve.json.
--smoke (seconds; the test): the same code path on the embedded model with the reproduction's quick settings cut
down (32 start ids, 64 generated tokens, 4 evaluation windows, its 2e-5 learning rate), budgets of 2 and 4 blocks,
no committed full-budget rows (the embedded model has none), in a temporary work dir (or --work_dir), the points
written there, never to results/. The last line is `token_curve <json>` ({method: {blocks: {text: ppl}}}).

    python benchmarks/token_curve.py [--blocks 150 300 1200] [--methods LLM-QAT "QAT-real (modern)"]
                                     [--bits 4-8-4] [--work_dir ~/.cache/llm-qat/reproduce_smollm2] [--smoke]

--bits W-A-KV[-lsq|-seq] trains every point at another setting of the table (learned-scale settings at the
table's chosen range lr); points of a setting other than 4-8-4 go to results/smollm2_token_curve_<bits>.json,
and the table's row at that setting (if committed) is its full-budget point.

A budget is N blocks of each method's own training file: the table's generated text holds ~1500 blocks and the
handbook's training chapters ~720, so 1200 blocks of the handbook is 1.7 epochs of it (the Trainer stops at
N blocks, max_steps = N / 4; the real text repeats where the generated text never does).
"""
import argparse
import json
import math
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from utils.allocator import tune_cpu_allocator  # noqa: E402
from utils.evaluate import evaluate, write_json  # noqa: E402
from models.quant_model import QuantSetting  # noqa: E402
from utils.reproduce import DATA, MODERN_TEXT, SMOLLM2, TINY, Row, generated_text, real_text, train  # noqa: E402

ROWS = REPO / "results" / "smollm2_table_rows"
OUT = REPO / "results" / "smollm2_token_curve.json"
SOURCES = {"LLM-QAT": "hybrid", "QAT-real": "real", "QAT-real (modern)": "real_modern"}


def point(method, blocks, s, work, profile=SMOLLM2, bits="4-8-4"):
    key = SOURCES[method]
    data = real_text(work, key, profile) if key in profile.real_texts else generated_text("hybrid", s, work, profile)
    budget = {**s, "blocks": blocks, "save_steps": None, "max_steps": blocks * s["epochs"] // 4}  # batch 4
    model, seconds = train(f"curve{blocks}_{method}", bits, data, budget, work, profile, s["chosen_lr"])
    texts = [*profile.ppl_texts.values(), str(DATA / "milton_valid.jsonl")]
    r = evaluate(model, ppl_data=texts, seq_len=256, dtype=profile.eval_dtype, max_windows=s["eval_windows"])
    return {name: round(v["ppl"], 4) for name, v in r["ppl"].items()}


def slope(points, text):
    """d ppl / d log2(tokens) over the last two points: the change per doubling of the training tokens."""
    found = sorted((b, p[text]) for b, p in points.items() if text in p)
    if len(found) < 2:
        return float("nan")
    (b0, p0), (b1, p1) = found[-2:]
    return (p1 - p0) / math.log2(b1 / b0)


def smoke_settings():
    """The embedded model's quick reproduction settings, cut down to seconds."""
    s = dict(TINY.settings["quick"], start_ids=(320, 352), gen_length=64, epochs=1, eval_windows=4)
    s["chosen_lr"] = s["lr"]
    return s


def main(argv=None):
    tune_cpu_allocator()  # as train.py / generate_data.py run (utils/allocator.py)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs="+", default=None, help="training budgets in blocks of 256 tokens "
                   "(default: 150 300 1200; --smoke: 2 4)")
    p.add_argument("--work_dir", default=None, help="default: ~/.cache/llm-qat/reproduce_smollm2 (--smoke: a "
                   "temporary directory)")
    p.add_argument("--methods", nargs="+", default=list(SOURCES), choices=list(SOURCES),
                   help="which methods (default: all three)")
    p.add_argument("--bits", default="4-8-4", type=setting_arg, help="W-A-KV of every point, optionally -lsq / -seq "
                   "(default: 4-8-4, the curve of the table's central setting)")
    p.add_argument("--smoke", action="store_true", help="the embedded model, tiny budgets, seconds (the test)")
    args = p.parse_args(argv)
    bits = args.bits.label
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            work = args.work_dir or tmp
            profile = replace(TINY, real_texts={**TINY.real_texts, "real_modern": MODERN_TEXT})  # all three
            return curve_of(profile, smoke_settings(), args.blocks or [2, 4], work, Path(work) / "token_curve.json",
                            full_rows=False, methods=args.methods, bits=bits)
    s = dict(SMOLLM2.settings["full"])
    s["chosen_lr"] = json.loads((ROWS / "lr_choice.json").read_text())["lr"]
    if args.bits.w_quantizer != "absmax":
        s["chosen_range_lr"] = json.loads((ROWS / "range_lr_choice.json").read_text())["range_lr"]
    out = OUT if bits == "4-8-4" else OUT.with_name(f"smollm2_token_curve_{bits}.json")
    return curve_of(SMOLLM2, s, args.blocks or [150, 300, 1200],
                    args.work_dir or os.path.expanduser("~/.cache/llm-qat/reproduce_smollm2"), out, methods=args.methods,
                    bits=bits)


def setting_arg(text):
    """--bits: the setting QuantSetting parses (W-A-KV, optionally -lsq / -seq), else argparse's one error line."""
    try:
        return QuantSetting.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def curve_of(profile, s, budgets, work, out, full_rows=True, methods=tuple(SOURCES), bits="4-8-4"):
    """Every method at each budget (resumable through `out`; a point scored before a text was added is trained
    and scored again); prints the points, the slopes and the last line."""
    curve = json.loads(out.read_text()) if out.exists() else {}
    methods = [m for m in SOURCES if m in methods and (SOURCES[m] in profile.real_texts or SOURCES[m] in profile.generation)]
    wanted = set(profile.ppl_texts)
    for method in methods:  # the table's rows are the full-budget points (evaluated without milton_valid)
        curve.setdefault(method, {})
        row = ROWS / f"{Row(method, bits).slug}.json"
        if full_rows and row.exists():
            curve[method][str(s["blocks"])] = json.loads(row.read_text())["ppl_by_text"]
    for blocks in budgets:  # every method at each budget, smallest first: a run cut short has whole sets
        for method in methods:
            if not wanted <= set(curve[method].get(str(blocks), {})):
                curve[method][str(blocks)] = point(method, blocks, s, work, profile, bits)
                write_json(str(out), curve)
            print(f"{method} {blocks * 256} tokens: {curve[method][str(blocks)]}", flush=True)
    write_json(str(out), curve)
    for text in profile.ppl_texts:
        per_doubling = {m: slope({int(b): v for b, v in curve[m].items()}, text) for m in methods}
        print(f"{text}: ppl change per doubling of tokens " + ", ".join(f"{m} {d:+.2f}" for m, d in per_doubling.items()))
    print("token_curve " + json.dumps(curve))
    return curve


if __name__ == "__main__":
    main()
