"""The bf16 QAT+KD training step with the tuned CPU allocator (utils/allocator.py) against glibc's default, side by side.

    python benchmarks/bench_allocator.py [--model smollm2] [--steps 6] [--rounds 2] [--threads 2]
    python benchmarks/bench_allocator.py --model assets/tiny_llama --seq 64 --steps 2 --rounds 1   # the suite's smoke run

Each variant trains in a child process of its own (the allocator is chosen at process start;
LLMQAT_DEFAULT_ALLOCATOR=1 gives the default), rounds alternate the order. Per variant: the median step,
the page faults per step (first touches of fresh memory: deterministic, unlike the times on a noisy machine) and
the system CPU seconds per step, the process's peak resident memory. The last line: `allocator_step_speedup <x>` (default step / tuned step).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.allocator import page_faults, tune_cpu_allocator  # noqa: E402

VARIANTS = ("tuned", "default")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model directory or packaged name")
    p.add_argument("--setting", default="4-8-4", help="W-A-KV of the QAT step")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant and round (after 2 warm-ups)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the cores)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args):
    """One training run in this process: a JSON line of per-step seconds, page faults and system seconds, and the
    peak resident memory."""
    tune_cpu_allocator()  # a no-op under LLMQAT_DEFAULT_ALLOCATOR=1
    import torch
    from roofline import DATA, StepTimer, timed_training
    from utils.model_zoo import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    faults, system = [], []

    class Counter(StepTimer):
        def on_step_begin(self, *a, **k):
            self.marks = page_faults(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
            return super().on_step_begin(*a, **k)

        def on_step_end(self, *a, **k):
            super().on_step_end(*a, **k)
            faults.append(page_faults() - self.marks[0])
            system.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - self.marks[1])

    with tempfile.TemporaryDirectory() as tmp:
        timer = timed_training(resolve_model(args.model), str(DATA / "shakespeare_train.jsonl"), tmp, "s",
                               args.setting, True, args.steps + 2, args.batch, args.seq, timer=Counter())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"times": timer.times[2:], "faults": faults[2:], "system": system[2:], "peak_mib": [peak]}))


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    runs = {v: {"times": [], "faults": [], "system": [], "peak_mib": []} for v in VARIANTS}
    forward = list(argv if argv is not None else sys.argv[1:])
    for r in range(args.rounds):
        for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            env = {**os.environ, "LLMQAT_DEFAULT_ALLOCATOR": "1" if v == "default" else "0"}
            env.pop("THP_MEM_ALLOC_ENABLE", None)
            out = subprocess.run([sys.executable, __file__, *forward, "--child", v], env=env, check=True,
                                 stdout=subprocess.PIPE, text=True).stdout
            for k, vals in json.loads(out.strip().splitlines()[-1]).items():
                runs[v][k] += vals
    print(f"training step, W-A-KV {args.setting}, batch {args.batch} x {args.seq}, {args.rounds} rounds of "
          f"{args.steps} steps per variant")
    med = {}
    for v in VARIANTS:
        med[v] = statistics.median(runs[v]["times"])
        print(f"  {v:8s} step {med[v]:.3f} s   page faults/step {statistics.median(runs[v]['faults']):.0f}   "
              f"system CPU/step {statistics.median(runs[v]['system']):.3f} s   peak RSS {max(runs[v]['peak_mib']):.0f} MiB")
    print(f"allocator_step_speedup {med['default'] / med['tuned']:.2f}")


if __name__ == "__main__":
    main()
