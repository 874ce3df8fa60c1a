"""The entry scripts' start-up with the collector off during their imports (utils/startup.py) against on, side by side.

    python benchmarks/bench_startup.py [--scripts train.py eval.py generate_data.py] [--rounds 5]
    python benchmarks/bench_startup.py --scripts merge_gen_data.py --rounds 1    # the suite's smoke run

Each run is `python SCRIPT --help` in a fresh process (the imports, then argparse's help: a command's fixed
cost before its work), LLMQAT_IMPORT_GC=1 for "gc on"; rounds alternate the order. Per script: the median wall
and CPU seconds of each. The last line: `startup_speedup <x>` (the sum of the medians' wall times, on / off).
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("off", "on")  # the collector during the imports


def run_once(script: str, variant: str) -> tuple:
    """(wall, CPU) seconds of `python SCRIPT --help` in a fresh process."""
    env = {**os.environ, "LLMQAT_IMPORT_GC": "1" if variant == "on" else "0"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, script, "--help"], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scripts", nargs="+", default=["train.py", "eval.py", "generate_data.py"])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    missing = [s for s in args.scripts if not (REPO / s).is_file()]
    if missing:
        sys.exit(f"error: --scripts {' '.join(missing)}: no such script in {REPO}")
    print(f"python SCRIPT --help, {args.rounds} round(s), threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    total = {v: 0.0 for v in VARIANTS}
    for script in args.scripts:
        runs = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                runs[v].append(run_once(script, v))
        med = {v: (statistics.median(w for w, _ in runs[v]), statistics.median(c for _, c in runs[v]))
               for v in VARIANTS}
        for v in VARIANTS:
            total[v] += med[v][0]
        print(f"  {script:20s} gc off {med['off'][0]:.2f} s (CPU {med['off'][1]:.2f})   "
              f"gc on {med['on'][0]:.2f} s (CPU {med['on'][1]:.2f})")
    print(f"startup_speedup {total['on'] / total['off']:.2f}")


if __name__ == "__main__":
    main()
