"""Benchmark of the exported low-bit checkpoint against the float model on CPU: size on disk and generation speed.

Side by side in one run, same prompt, greedy, batch 1, KV cache, exactly --new_tokens new tokens each, best of
--repeats: the float model (fp32 and bf16), the QAT fake-quant model (load_model) and the exported packed model
(load_exported, dequantizing its weights on every forward). Without --model, the QAT checkpoint is the embedded
model quantized round-to-nearest to W4A8KV4 (the same format training writes). The last line is the ratio of
the exported model to the bf16 float model.

    python benchmarks/bench_export.py [--model QAT_DIR] [--float_model DIR] [--new_tokens 64] [--threads N]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from models.export import export, load_exported  # noqa: E402
from models.quant_model import QuantSetting, load_model  # noqa: E402
from utils.model_zoo import resolve_model  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="QAT checkpoint (default: the embedded model, RTN W4A8KV4)")
    p.add_argument("--float_model", default=str(ROOT / "assets" / "tiny_llama"))
    p.add_argument("--prompt", default="ROMEO:")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args()


def disk_mb(path):
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 1e6


def tokens_per_s(model, input_ids, new_tokens, repeats):
    """Best of `repeats` greedy generations of exactly new_tokens tokens (the machine may be shared)."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        model.generate(input_ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # first-call costs
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(input_ids, **kwargs)
            best = min(best, time.perf_counter() - start)
    return new_tokens / best, out


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.float_model = resolve_model(args.float_model)
    if args.model is not None:
        args.model = resolve_model(args.model)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(args.float_model)
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    with tempfile.TemporaryDirectory() as tmp:
        qat_dir = args.model
        if qat_dir is None:
            qat_dir = f"{tmp}/qat"
            QuantSetting(4, 8, 4).apply(AutoModelForCausalLM.from_pretrained(args.float_model)).save_pretrained(qat_dir)
            tokenizer.save_pretrained(qat_dir)
        AutoModelForCausalLM.from_pretrained(args.float_model, dtype=torch.bfloat16).save_pretrained(f"{tmp}/bf16")
        export(qat_dir, f"{tmp}/exported")
        rows = [("float fp32", AutoModelForCausalLM.from_pretrained(args.float_model, dtype=torch.float32),
                 disk_mb(args.float_model)),
                ("float bf16", AutoModelForCausalLM.from_pretrained(f"{tmp}/bf16", dtype=torch.bfloat16),
                 disk_mb(f"{tmp}/bf16")),
                ("QAT fake-quant (fp32)", load_model(qat_dir), disk_mb(qat_dir)),
                ("exported packed", load_exported(f"{tmp}/exported"), disk_mb(f"{tmp}/exported"))]
        print(f"\nprompt {args.prompt!r}, {args.new_tokens} new tokens, greedy, batch 1, best of {args.repeats}, "
              f"{torch.get_num_threads()} threads; weight files in MB (safetensors)")
        speed = {}
        for name, model, mb in rows:
            speed[name], out = tokens_per_s(model.eval(), input_ids, args.new_tokens, args.repeats)
            print(f"{name:24s} {mb:7.2f} MB {speed[name]:8.1f} tokens/s")
        print("exported model says:", repr(tokenizer.decode(out[0], skip_special_tokens=True)))
        bf16_mb, exported_mb = rows[1][2], rows[3][2]
        print(f"exported vs float bf16: disk {bf16_mb / exported_mb:.2f}x smaller, "
              f"tokens/s ratio {speed['exported packed'] / speed['float bf16']:.2f}")


if __name__ == "__main__":
    main()
