"""Triton kernels for SymQuantizer on CUDA tensors (models/utils_quant.py holds the PyTorch reference).

One program owns one row (a token, or an output channel of a weight) and keeps it in registers, so the
forward reads x once and writes q plus a bit-packed straight-through mask (1 bit per element); the backward
reads the gradient and the mask once. The numerics equal the reference bit for bit:
- fp32 math, IEEE-rounded divisions (div_rn; Triton's plain `/` is approximate on GPUs),
- s = reciprocal(max|x| + 1e-6) * (2^(b-1) - 1), because torch evaluates `int / tensor` that way,
- round half to even, as torch.round (written out: libdevice.rint does not run under TRITON_INTERPRET),
- FMA contraction off: a fused x*s - floor(x*s) would skip the rounding of x*s that torch performs,
- fp32 -> bf16 rounds to nearest even, written out (the interpreter's own cast truncates).
Rows are stored as [BLOCK // 8, 8] tiles so that 8 neighbours pack into one mask byte without a reshape.
"""
import torch
import triton
import triton.language as tl

MAX_COLS = 16384  # widest row kept in registers (LLaMA-7B's 11008 fits); wider rows use the reference


@triton.jit
def _rint(y):
    # half to even; exact because |y| <= 2^(b-1) - 1 < 2^22, where y - floor(y) is exact
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(0.5 * f)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _cast(v, dtype: tl.constexpr):
    if dtype == tl.bfloat16:  # round to nearest even on the bits; NaN stays NaN (its bits may carry)
        b = v.to(tl.uint32, bitcast=True)
        b = tl.where(v == v, (b + 0x7FFF + ((b >> 16) & 1)) >> 16, 0x7FC0)
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


@triton.jit
def _sym_quant_fwd(x_ptr, q_ptr, mask_ptr, n_cols, n_bytes, qmax, lo, hi, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    byte = tl.arange(0, BLOCK // 8)
    cols = byte[:, None] * 8 + tl.arange(0, 8)[None, :]
    inside = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=inside, other=0.0).to(tl.float32)
    s = tl.math.div_rn(1.0, tl.max(tl.max(tl.abs(x), axis=1), axis=0) + 1e-6) * qmax
    q = tl.math.div_rn(_rint(x * s), s + 1e-6)
    tl.store(q_ptr + row * n_cols + cols, _cast(q, q_ptr.dtype.element_ty), mask=inside)
    keep = ((x > lo) & (x < hi)).to(tl.int32) << tl.arange(0, 8)[None, :]
    tl.store(mask_ptr + row * n_bytes + byte, tl.sum(keep, axis=1).to(tl.uint8), mask=byte < n_bytes)


@triton.jit
def _ste_bwd(g_ptr, mask_ptr, out_ptr, n_cols, n_bytes, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    byte = tl.arange(0, BLOCK // 8)
    cols = byte[:, None] * 8 + tl.arange(0, 8)[None, :]
    inside = cols < n_cols
    g = tl.load(g_ptr + row * n_cols + cols, mask=inside, other=0.0).to(tl.float32)
    bits = tl.load(mask_ptr + row * n_bytes + byte, mask=byte < n_bytes, other=0).to(tl.int32)
    keep = (bits[:, None] >> tl.arange(0, 8)[None, :]) & 1
    tl.store(out_ptr + row * n_cols + cols, _cast(g * keep.to(tl.float32), out_ptr.dtype.element_ty), mask=inside)


def _config(n_cols):
    """BLOCK (the row padded to a power of two) and compile options; fp fusion off for exactness."""
    block = max(triton.next_power_of_2(n_cols), 64)
    return block, dict(num_warps=min(max(block // 512, 4), 16), enable_fp_fusion=False)


def sym_quant(x, num_bits, clip_val, out_dtype=None):
    """Per-row (last dim) symmetric fake quantization. Returns q (out_dtype, default x.dtype) and the
    bit-packed mask [rows, ceil(n/8)] uint8 of clip_val[0] < x < clip_val[1]."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    q = torch.empty(x2.shape, dtype=out_dtype or x.dtype, device=x.device)
    mask = torch.empty(x2.shape[0], (n + 7) // 8, dtype=torch.uint8, device=x.device)
    if x2.shape[0]:
        block, options = _config(n)
        _sym_quant_fwd[(x2.shape[0],)](x2, q, mask, n, mask.shape[1], float(2 ** (num_bits - 1) - 1),
                                       float(clip_val[0]), float(clip_val[1]), BLOCK=block, **options)
    return q.view(x.shape), mask


def ste_grad(grad, mask, dtype):
    """grad * mask, unpacking the bits; returned in `dtype` (the quantizer input's)."""
    n = grad.shape[-1]
    g2 = grad.reshape(-1, n).contiguous()
    out = torch.empty(g2.shape, dtype=dtype, device=grad.device)
    if g2.shape[0]:
        block, options = _config(n)
        _ste_bwd[(g2.shape[0],)](g2, mask, out, n, mask.shape[1], BLOCK=block, **options)
    return out.view(grad.shape)
