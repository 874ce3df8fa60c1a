"""What limits LLM-QAT against QAT on real text on SmolLM2: held-out perplexity against training tokens.
Trains LLM-QAT (the model's own hybrid text) and QAT-real (Shakespeare) at W-A-KV 4-8-4 on the first N blocks
of the reproduction's own training files, for each N given, with the table's recipe (its chosen learning
rate, batch 4 x 256, cosine, 1 epoch), and evaluates each student as the table does (plus milton_valid).
The full-budget points are the table's committed rows. A diagnosis, not a tuning: nothing is chosen on it.
Resumable: students under <work_dir>/models/curve*, points in results/smollm2_token_curve.json.

    python benchmarks/token_curve.py [--blocks 150 300] [--work_dir ~/.cache/llm-qat/reproduce_smollm2]
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from utils.evaluate import evaluate, write_json  # noqa: E402
from utils.reproduce import DATA, SMOLLM2, generated_text, real_text, train  # noqa: E402

ROWS = REPO / "results" / "smollm2_table_rows"
OUT = REPO / "results" / "smollm2_token_curve.json"
SOURCES = {"LLM-QAT": "hybrid", "QAT-real": "real"}


def point(method, blocks, s, work):
    data = real_text(work) if SOURCES[method] == "real" else generated_text("hybrid", s, work, SMOLLM2)
    model, seconds = train(f"curve{blocks}_{method}", "4-8-4", data, {**s, "blocks": blocks, "save_steps": None},
                           work, SMOLLM2, s["chosen_lr"])
    texts = [*SMOLLM2.ppl_texts.values(), str(DATA / "milton_valid.jsonl")]
    r = evaluate(model, ppl_data=texts, seq_len=256, dtype=SMOLLM2.eval_dtype, max_windows=s["eval_windows"])
    return {name: round(v["ppl"], 4) for name, v in r["ppl"].items()}


def slope(points, text):
    """d ppl / d log2(tokens) over the last two points: the change per doubling of the training tokens."""
    (b0, p0), (b1, p1) = sorted((b, p[text]) for b, p in points.items() if text in p)[-2:]
    return (p1 - p0) / math.log2(b1 / b0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs="+", default=[150, 300])
    p.add_argument("--work_dir", default=os.path.expanduser("~/.cache/llm-qat/reproduce_smollm2"))
    args = p.parse_args(argv)
    s = dict(SMOLLM2.settings["full"])
    s["chosen_lr"] = json.loads((ROWS / "lr_choice.json").read_text())["lr"]
    curve = json.loads(OUT.read_text()) if OUT.exists() else {}
    for method in SOURCES:  # the table's rows are the full-budget points (evaluated without milton_valid)
        full = json.loads((ROWS / f"{method}_4-8-4.json").read_text())
        curve.setdefault(method, {})[str(s["blocks"])] = full["ppl_by_text"]
    for blocks in args.blocks:  # both methods at each budget, smallest first: a run cut short has whole pairs
        for method in SOURCES:
            if str(blocks) not in curve[method]:
                curve[method][str(blocks)] = point(method, blocks, s, args.work_dir)
                write_json(str(OUT), curve)
            print(f"{method} {blocks * 256} tokens: {curve[method][str(blocks)]}", flush=True)
    write_json(str(OUT), curve)
    for text in SMOLLM2.ppl_texts:
        per_doubling = {m: slope({int(b): v for b, v in curve[m].items()}, text) for m in SOURCES}
        print(f"{text}: ppl change per doubling of tokens " + ", ".join(f"{m} {d:+.2f}" for m, d in per_doubling.items()))
    print("token_curve " + json.dumps(curve))


if __name__ == "__main__":
    main()
