"""Host-RAM benchmark of FSDP loading: every rank reading the checkpoint vs rank 0 only, side by side.

Runs `NPROC sh run_train.sh 4 8 4` for one step twice on the same model: with cpu_ram_efficient_loading
(the default here: ranks != 0 build the student and the teacher without weights and get rank 0's while FSDP
shards) and without it (every rank loads both, as the original). Each run prints every rank's peak host
memory at the start of training (after loading and sharding). The last lines are `rank<r>_ratio <x>`
(efficient over plain). Without --model a random LLaMA of ~435M parameters (bf16 safetensors, like the
released checkpoints) is written to a temp dir; on CPU.

    python benchmarks/bench_host_memory.py [--model DIR] [--nproc 2]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def random_llama(path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from utils.constants import EMBEDDED_MODEL
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=6,
                         num_attention_heads=16, max_position_embeddings=2048)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL).save_pretrained(path)  # same 32000-token LLaMA vocabulary


def peaks(model, nproc, out, extra):
    env = {**os.environ, "MODEL": model, "NPROC": str(nproc), "OUTPUT": out, "PYTHON": sys.executable,
           "EVAL_DATA": "none", "TRAIN_DATA": str(REPO / "assets/data/shakespeare_train_small.jsonl")}
    cmd = ["sh", "run_train.sh", "4", "8", "4", "--max_steps", "1", "--model_max_length", "64",
           "--max_train_samples", str(nproc), "--save_strategy", "no", "--report_to", "none", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    found = dict(re.findall(r"rank (\d+)/\d+ host memory peak so far: (\d+) MiB", proc.stdout + proc.stderr))
    return {int(r): int(m) for r, m in found.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: a random 435M LLaMA)")
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is not None:
            from utils.model_zoo import resolve_model
            model = resolve_model(model)
        else:
            model = os.path.join(tmp, "model")
            random_llama(model)
        n = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / 2**20
        print(f"model {model}: {n:.0f} MiB of safetensors; {args.nproc} CPU processes; peak host MiB per rank")
        runs = {"plain": peaks(model, args.nproc, os.path.join(tmp, "plain"),
                               ["--fsdp_config", '{"cpu_ram_efficient_loading": false}']),
                "efficient": peaks(model, args.nproc, os.path.join(tmp, "efficient"), [])}
    for name, found in runs.items():
        print(f"{name:10s}", "  ".join(f"rank{r} {m}" for r, m in sorted(found.items())))
    for r in sorted(runs["plain"]):
        print(f"rank{r}_ratio {runs['efficient'][r] / runs['plain'][r]:.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
