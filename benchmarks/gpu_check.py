"""GPU validation of the fused fake-quant kernels (issue 5), in one call of a few minutes on one H100.

(i)   Exactness on the GPU: the Triton path against the PyTorch reference (utils_quant.USE_TRITON off) on
      many shapes (non-power-of-two widths, one wider than MAX_COLS), fp32 / bf16 (fp16 on a few), 3-16 bits,
      rows with exact .5 ties: forward values and straight-through gradients (which carry the masks).
      Prints max |diff| per case.
(ii)  Bandwidth: GB/s of the forward and backward kernels on LLaMA-7B tensors, next to a plain copy.
(iii) benchmarks/bench_qat.py --device cuda: (a) linears, (b) a training step and (c) its peak memory, on a
      LLaMA-7B-shaped model with 2 layers at 2048 tokens, bf16 autocast over fp32 master weights.
Exit code 1 if any difference is not zero.

    python benchmarks/gpu_check.py [--reps 5] [--skip_bench]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models import utils_quant  # noqa: E402
from models.utils_quant import CLIP_VAL, SymQuantizer  # noqa: E402

SHAPES = [(1, 1), (3, 5), (7, 100), (4, 33, 257), (2, 2048, 4096), (4096, 4096), (11008, 4096), (4096, 11008),
          (2048, 5120), (2048, 13824), (2048, 14336), (64, 16384), (4, 16385)]
DEVICE = "cuda"  # a CPU smoke test of this script may set "cpu" (then both paths are the reference)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="bench_qat.py repetitions")
    p.add_argument("--skip_bench", action="store_true", help="only (i) and (ii)")
    return p.parse_args(argv)


def both_paths(fn):
    """fn() with the Triton kernels, then with the PyTorch reference."""
    out = []
    for use_triton in (True, False):
        utils_quant.USE_TRITON = use_triton
        out.append(fn())
    utils_quant.USE_TRITON = True
    return out


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def ties(bits, scale, device):
    qmax = 2 ** (bits - 1) - 1
    s = (1 / (torch.tensor([scale], device=device) + 1e-6)) * qmax
    k = torch.arange(-qmax, qmax, dtype=torch.float32, device=device)
    return torch.cat([torch.tensor([scale], device=device), (k + 0.5) / s]).unsqueeze(0)


def check_exactness():
    """(i): returns the number of cases with a nonzero difference."""
    bad = 0
    torch.manual_seed(0)
    cases = [(shape, dtype, bits, out_dtype) for shape in SHAPES for dtype in (torch.float32, torch.bfloat16)
             for bits in (4, 8) for out_dtype in (None, torch.bfloat16)]  # out bf16: QuantizeLinear under autocast
    cases += [(shape, torch.float16, 8, out_dtype) for shape in SHAPES[2:5] for out_dtype in (None, torch.float16)]
    cases += [((8, 4096), torch.float32, bits, None) for bits in (3, 5, 6, 7, 16)]
    print("(i) Triton vs PyTorch reference on the GPU: max |diff| of q, mask, gradient")
    for shape, dtype, bits, out_dtype in cases:
        x = (torch.randn(shape, device=DEVICE) * 1.5).to(dtype).requires_grad_()
        g = torch.randn(shape, device=DEVICE).to(out_dtype or dtype)

        def run():
            x.grad = None
            y = SymQuantizer.apply(x * 1, CLIP_VAL, bits, False, out_dtype)
            y.backward(g)
            return y.detach(), x.grad

        (q, grad), (q_ref, grad_ref) = both_paths(run)
        diffs = (max_diff(q, q_ref), max_diff(grad, grad_ref))
        equal = torch.equal(q, q_ref) and torch.equal(grad, grad_ref) and q.dtype == q_ref.dtype
        bad += not equal
        print(f"    {str(tuple(shape)):16s} {str(dtype)[6:]:9s} {bits:2d} bits -> {str(out_dtype or dtype)[6:]:9s}"
              f" q {diffs[0]:.3g}  grad {diffs[1]:.3g}{'' if equal else '  MISMATCH'}")
    for bits, scale in ((4, 1.0), (4, 0.37), (8, 3.1), (16, 1.0)):
        x = ties(bits, scale, DEVICE)
        q, q_ref = both_paths(lambda: utils_quant.sym_quant(x, bits)[0])
        equal = torch.equal(q, q_ref)
        bad += not equal
        print(f"    exact ties, {bits} bits, max {scale}: q {max_diff(q, q_ref):.3g}{'' if equal else '  MISMATCH'}")
    print(f"    {bad} mismatching case(s)")
    return bad


def gbps(fn, nbytes, iters=50):
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return nbytes * iters / (start.elapsed_time(end) / 1e3) / 1e9


def check_bandwidth():
    """(ii): bytes moved per second by the kernels, and by a copy of the same size for scale."""
    kernels = utils_quant._triton_kernels()
    print("(ii) kernel bandwidth (GB/s; a copy reads and writes the same tensor)")
    for name, shape, dtype, out_dtype in (("activation 2048x4096 bf16", (2048, 4096), torch.bfloat16, None),
                                          ("activation 2048x11008 fp32 -> bf16", (2048, 11008), torch.float32,
                                           torch.bfloat16),
                                          ("weight 11008x4096 fp32 -> bf16", (11008, 4096), torch.float32,
                                           torch.bfloat16)):
        x = torch.randn(shape, device="cuda").to(dtype)
        out_size = torch.empty((), dtype=out_dtype or dtype).element_size()
        n, mask_bytes = x.numel(), x.numel() // 8
        q, mask = kernels.sym_quant(x, 4, CLIP_VAL, out_dtype)
        g = torch.randn(shape, device="cuda").to(out_dtype or dtype)
        fwd = gbps(lambda: kernels.sym_quant(x, 4, CLIP_VAL, out_dtype), n * (x.element_size() + out_size) + mask_bytes)
        bwd = gbps(lambda: kernels.ste_grad(g, mask, dtype), n * (g.element_size() + x.element_size()) + mask_bytes)
        ref = gbps(lambda: x.clone(), 2 * n * x.element_size())
        print(f"    {name:36s} forward {fwd:6.0f}  backward {bwd:6.0f}  copy {ref:6.0f}")


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU")
    if utils_quant._triton_kernels() is None:
        sys.exit("gpu_check.py needs triton (pip install triton==3.9.0)")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    bad = check_exactness()
    check_bandwidth()
    if not args.skip_bench:
        import bench_qat
        print("(iii) bench_qat.py --device cuda", flush=True)
        bench_qat.main(["--device", "cuda", "--reps", str(args.reps)])
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
