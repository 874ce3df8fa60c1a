"""Cost of LLM-QAT fake quantization, side by side with the same work unquantized.

(a) QuantizeLinear (W4, A8) forward + backward against nn.Linear on LLaMA-7B layer shapes
    (4096x4096, 4096x11008, 11008x4096), divided by --width_div, at --tokens tokens; and the MiB each
    keeps for its backward (saved tensors, not counting the weight itself).
(b) One W4-A8-KV4 QAT + KD training step (teacher forward, student forward/backward, AdamW step) against
    the same step on the unquantized student (same KD), on a random-weight LLaMA; the two variants are
    interleaved and the medians of --reps steps compared.
(c) Peak memory of one such step, each variant in a fresh process: torch.cuda.max_memory_allocated on
    CUDA; on CPU the peak RSS above the process's RSS after imports, with glibc's mmap threshold fixed so
    that freed tensors leave RSS (MALLOC_MMAP_THRESHOLD_).

CPU defaults: 1/4 widths at 256 tokens; a 4-layer hidden-1024 LLaMA, vocab 32000, 256 tokens, fp32. On a CPU
shared with other jobs, --threads 1 avoids OpenMP threads waiting on a descheduled sibling, and the CPU-time
ratio printed beside the wall-clock one is robust to the other jobs.
CUDA defaults (--device cuda): full widths at 2048 tokens; LLaMA-7B shapes with 2 layers, 2048 tokens,
bf16 autocast over fp32 master weights and a bf16 teacher (as train.py --bf16).
The output ends with two lines: `step_ratio <x>` and `mem_ratio <x>` (QAT over unquantized, wall clock).

    python benchmarks/bench_qat.py [--device cuda] [--threads 1] [--reps 5] [--parts abc]
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.quant_model import QuantSetting  # noqa: E402
from models.utils_quant import QuantizeLinear  # noqa: E402
from utils.kd_trainer import kd_loss  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402

LLAMA_7B_LINEARS = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (in, out)
DEFAULTS = {  # per device: (a) tokens, width divisor; (b) model and sequence
    "cpu": dict(tokens=256, width_div=4, hidden=1024, intermediate=2816, layers=4, heads=16, seq=256, bf16=False),
    "cuda": dict(tokens=2048, width_div=1, hidden=4096, intermediate=11008, layers=2, heads=32, seq=2048, bf16=True),
}
W_BITS, A_BITS, KV_BITS = 4, 8, 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--parts", default="abc", help="which of (a), (b), (c) to run")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per variant (medians)")
    p.add_argument("--tokens", type=int, help="(a) tokens per linear call")
    p.add_argument("--width_div", type=int, help="(a) divide the LLaMA-7B widths by this")
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, help="(b, c) tokens per sequence")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast, bf16 teacher")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--grad_checkpointing", action="store_true", help="as the paper's recipe on GPUs")
    p.add_argument("--mem_probe", choices=["fp", "qat"], help=argparse.SUPPRESS)  # (c) child process
    args = p.parse_args(argv)
    for k, v in DEFAULTS[args.device].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """Wall seconds, and this process's CPU seconds (robust to other jobs on a shared CPU with 1 thread)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved_medians(fns, reps, device, warmup=2):
    """Median (wall, cpu) seconds of each fn, alternating their order every repetition."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for r in range(reps):
        for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
            times[i].append(timed(fns[i], device))
    return [tuple(statistics.median(column) for column in zip(*t)) for t in times]


def ratio_line(name_fp, name_q, t_fp, t_q, device, unit=1.0, fmt="{:.3f} s"):
    line = f"{name_fp} {fmt.format(t_fp[0] * unit)}  {name_q} {fmt.format(t_q[0] * unit)}  ratio {t_q[0] / t_fp[0]:.3f}"
    if device == "cpu":
        line += f"  (CPU time ratio {t_q[1] / t_fp[1]:.3f})"
    return line


def saved_mib(layer, fn):
    """MiB autograd keeps for the backward of fn(): distinct storages, not the weight's (it lives anyway)."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    kept.pop(layer.weight.untyped_storage().data_ptr(), None)
    return sum(kept.values()) / 2**20


def bench_linears(args):
    """(a): seconds of forward + backward, nn.Linear vs QuantizeLinear(W4, A8), per shape."""
    device, ratios = args.device, []
    print(f"(a) linear forward+backward, {args.tokens} tokens, widths / {args.width_div}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, W{W_BITS} A{A_BITS}")
    for n_in, n_out in LLAMA_7B_LINEARS:
        n_in, n_out = n_in // args.width_div, n_out // args.width_div
        torch.manual_seed(0)
        linear = nn.Linear(n_in, n_out, bias=False, device=device)
        qlinear = QuantizeLinear(n_in, n_out, bias=False, w_bits=W_BITS, a_bits=A_BITS, device=device)
        qlinear.weight = nn.Parameter(linear.weight.detach().clone())
        x = torch.randn(args.tokens, n_in, device=device, requires_grad=True)

        def forward(layer):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=args.bf16):
                return layer(x)

        def fwd_bwd(layer):
            def run():
                layer.weight.grad, x.grad = None, None
                y = forward(layer)
                y.backward(torch.ones_like(y))
            return run

        t_fp, t_q = interleaved_medians([fwd_bwd(linear), fwd_bwd(qlinear)], args.reps, device)
        ratios.append(t_q[0] / t_fp[0])
        print(f"    {n_in}x{n_out}: " + ratio_line("nn.Linear", "QuantizeLinear", t_fp, t_q, device, 1e3, "{:.2f} ms")
              + f"; kept for backward {saved_mib(linear, lambda: forward(linear)):.1f} vs "
              f"{saved_mib(qlinear, lambda: forward(qlinear)):.1f} MiB")
    return ratios


def llama_config(args):
    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       num_key_value_heads=args.heads, vocab_size=args.vocab,
                       max_position_embeddings=max(args.seq, 2048), attn_implementation="sdpa")


def build(args, variants):
    """Teacher and one (student, optimizer) per variant ("fp" or "qat"), all from the same random weights."""
    torch.manual_seed(0)
    with torch.device(args.device):  # initialize on the device: fast for a 7B-wide model on a GPU
        base = LlamaForCausalLM(llama_config(args))
    teacher = copy.deepcopy(base).to(torch.bfloat16 if args.bf16 else torch.float32).eval().requires_grad_(False)
    students = {}
    for v in variants:
        model = copy.deepcopy(base).train()
        if v == "qat":
            QuantSetting(W_BITS, A_BITS, KV_BITS).apply(model)
        if args.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0, fused=args.device == "cuda")
        students[v] = (model, opt)
    del base
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device,
                        generator=torch.Generator(args.device).manual_seed(0))
    return teacher, students, ids


def train_step(args, teacher, model, opt, ids):
    """What KDTrainer does per step: teacher logits, student under autocast, KD loss, backward, AdamW."""
    with torch.no_grad():
        teacher_logits = teacher(input_ids=ids).logits
    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
        student_logits = model(input_ids=ids).logits
    loss = kd_loss(student_logits, teacher_logits)
    del student_logits, teacher_logits
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_step(args):
    """(b): median step seconds, unquantized and QAT."""
    teacher, students, ids = build(args, ["fp", "qat"])
    n_params = sum(p.numel() for p in students["fp"][0].parameters())
    print(f"(b) training step, LLaMA hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"{args.batch}x{args.seq} tokens, {n_params / 1e6:.1f}M params, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}{', grad checkpointing' if args.grad_checkpointing else ''}")
    steps = [lambda v=v: train_step(args, teacher, *students[v], ids) for v in ("fp", "qat")]
    t_fp, t_q = interleaved_medians(steps, args.reps, args.device)
    print("    " + ratio_line("unquantized", f"W{W_BITS}A{A_BITS}KV{KV_BITS} QAT", t_fp, t_q, args.device))
    # the share of the measured matmul rate (benchmarks/roofline.py): student forward + backward, teacher forward
    tokens = args.batch * args.seq
    config = students["fp"][0].config
    shapes = roofline.linear_shapes(config, tokens, True) + roofline.linear_shapes(config, tokens, False)
    flops, gemm_s = roofline.gemm_time(shapes, torch.bfloat16 if args.bf16 else torch.float32, args.reps,
                                       args.device)
    print(f"    step matmuls {flops / 1e12:.2f} TFLOP; measured {'bf16' if args.bf16 else 'fp32'} matmul rate at "
          f"the step's shapes {flops / gemm_s / 1e12:.1f} TFLOP/s; achieved {flops / t_q[0] / 1e12:.1f} TFLOP/s "
          f"(QAT), {flops / t_fp[0] / 1e12:.1f} (unquantized); gemm_fraction QAT {gemm_s / t_q[0]:.3f}, "
          f"unquantized {gemm_s / t_fp[0]:.3f}")
    return t_q[0] / t_fp[0]


def rss(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def allocated(args, base_rss):
    return torch.cuda.memory_allocated() if args.device == "cuda" else rss("VmRSS:") - base_rss


def mem_probe(args):
    """(c) child: bytes held before one training step (weights, optimizer state, teacher) and the step's peak,
    after a warm-up step has allocated the optimizer state."""
    base_rss = rss("VmRSS:") if args.device == "cpu" else 0
    teacher, students, ids = build(args, [args.mem_probe])
    model, opt = students[args.mem_probe]
    train_step(args, teacher, model, opt, ids)
    sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    before = allocated(args, base_rss)
    train_step(args, teacher, model, opt, ids)
    sync(args.device)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else rss("VmHWM:") - base_rss
    print(json.dumps({"before": before, "peak": peak}))


def bench_memory(args, argv):
    """(c): peak memory of each variant, each in a fresh process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    mem = {}
    for v in ("fp", "qat"):
        out = subprocess.run([sys.executable, __file__, *argv, "--mem_probe", v], env=env, check=True,
                             capture_output=True, text=True).stdout
        mem[v] = json.loads(out.strip().splitlines()[-1])
    what = "max_memory_allocated" if args.device == "cuda" else "peak RSS above imports"
    mib = {v: {k: b / 2**20 for k, b in m.items()} for v, m in mem.items()}
    step = {v: m["peak"] - m["before"] for v, m in mib.items()}
    print(f"(c) peak memory of one step ({what}): unquantized {mib['fp']['peak']:.0f} MiB  "
          f"QAT {mib['qat']['peak']:.0f} MiB  ratio {mib['qat']['peak'] / mib['fp']['peak']:.3f}")
    print(f"    of which above what the step starts with (activations, gradients, temporaries): "
          f"unquantized {step['fp']:.0f} MiB  QAT {step['qat']:.0f} MiB  ratio {step['qat'] / step['fp']:.3f}")
    return mib["qat"]["peak"] / mib["fp"]["peak"]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mem_probe:
        return mem_probe(args)
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f" ({os.cpu_count()} CPUs)")
          + f", threads {torch.get_num_threads()}")
    step_ratio = mem_ratio = float("nan")
    if "a" in args.parts:
        bench_linears(args)
    if "b" in args.parts:
        step_ratio = bench_step(args)
    if "c" in args.parts:
        mem_ratio = bench_memory(args, argv)
    print(f"step_ratio {step_ratio:.3f}")
    print(f"mem_ratio {mem_ratio:.3f}")


if __name__ == "__main__":
    main()
