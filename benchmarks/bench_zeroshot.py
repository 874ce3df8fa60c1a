"""Zero-shot scoring: lm-eval's HFLM (one whole sequence per choice) against utils.shared_context (each context
once), side by side on the same model, tasks and documents, rounds alternating.

Prints each scorer's seconds per round, the accuracy of each, and how far the two scorers' log-likelihoods are
apart per (context, choice): fp32 rounding on an unquantized model; on a quantized one, the rounding a 4-bit
model amplifies (any change of kernel does: --compare_attention also scores HFLM with HF's eager attention in
place of SDPA, for scale). Last line: `shared_context_speedup <x>` (median stock time / median shared time).

    python benchmarks/bench_zeroshot.py [--model smollm2] [--setting 4-8-4] [--tasks shakespeare_nextline,
        pydocs_nextsentence] [--limit 50] [--batch_size 8] [--rounds 2] [--threads 2]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.allocator import tune_cpu_allocator  # noqa: E402

SCORERS = ("stock", "shared")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="assets/tiny_llama", help="model directory or packaged name (smollm2)")
    p.add_argument("--setting", default="4-8-4", help="W-A-KV of the RTN model scored, or 32-32-32 (FP)")
    p.add_argument("--tasks", default="shakespeare_nextline")
    p.add_argument("--limit", type=int, default=50, help="documents per task")
    p.add_argument("--batch_size", type=int, default=8, help="eval.py's --batch_size (the table's: 8)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compare_attention", action="store_true", help="also HFLM with eager attention (for scale)")
    return p.parse_args(argv)


def recorded(scores):
    """Wrap both scorers' _loglikelihood_tokens (for the rest of this process) to keep each (context, choice) ->
    log-likelihood in the newest dict of `scores`."""
    from lm_eval.models.huggingface import HFLM
    from utils.shared_context import SharedContextLM
    for cls in (HFLM, SharedContextLM):
        def wrapper(self, requests, *a, _f=cls.__dict__["_loglikelihood_tokens"], **k):
            out = _f(self, requests, *a, **k)
            scores[-1].update({(tuple(r[1]), tuple(r[2])): ll for r, (ll, _) in zip(requests, out)})
            return out
        cls._loglikelihood_tokens = wrapper


def gap(a, b):
    keys = [k for k in a if k in b]
    d = [abs(a[k] - b[k]) for k in keys]
    return f"max |difference| {max(d):.2e}, mean {statistics.fmean(d):.2e} nats over {len(keys)} (context, choice)"


def main(argv=None):
    args = parse_args(argv)
    tune_cpu_allocator()
    import torch
    from transformers import AutoTokenizer

    from models.quant_model import load_model
    from models.setting import QuantSetting
    from utils.model_zoo import resolve_model
    from utils.zeroshot import evaluate_tasks

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model, tokenizer = load_model(path).eval(), AutoTokenizer.from_pretrained(path)
    setting = QuantSetting.of(*args.setting.split("-"))
    if setting.label != "32-32-32":
        setting.apply(model)
    quantized = "FP" if setting.label == "32-32-32" else f"RTN W-A-KV {setting.label}"
    print(f"model {args.model}, {quantized}, tasks {args.tasks}, {args.limit} docs each, batch "
          f"{args.batch_size}, {torch.get_num_threads()} threads")
    scores, times, accs, lls = [], {k: [] for k in SCORERS}, {}, {}
    recorded(scores)
    for r in range(args.rounds):
        for kind in SCORERS if r % 2 == 0 else SCORERS[::-1]:
            scores.append({})
            start = time.perf_counter()
            out = evaluate_tasks(model, tokenizer, args.tasks, batch_size=args.batch_size, limit=args.limit,
                                 shared_context=kind == "shared")
            times[kind].append(time.perf_counter() - start)
            accs[kind], lls[kind] = {t: v["acc"] for t, v in out.items()}, scores[-1]
            print(f"  round {r + 1} {kind:6s} {times[kind][-1]:7.2f} s  acc {accs[kind]}", flush=True)
    print(f"shared vs stock: {gap(lls['shared'], lls['stock'])}")
    if args.compare_attention:
        model.set_attn_implementation("eager")
        scores.append({})
        evaluate_tasks(model, tokenizer, args.tasks, batch_size=args.batch_size, limit=args.limit,
                       shared_context=False)
        print(f"stock with eager attention vs stock (SDPA): {gap(scores[-1], lls['stock'])}")
    stock, shared = (statistics.median(times[k]) for k in SCORERS)
    print(f"median: stock {stock:.2f} s, shared {shared:.2f} s")
    print(f"shared_context_speedup {stock / shared:.2f}")


if __name__ == "__main__":
    main()
