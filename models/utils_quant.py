"""Fake quantizers and QuantizeLinear, with the numerics of LLM-QAT (Liu et al. 2023, section 2).

Everything is "fake" quantization: values are rounded onto a b-bit grid and scaled back, so training
sees the quantization error while tensors keep their float dtype. Scales are recomputed from the
tensor on every call (absmax, dynamic); nothing besides the weights themselves is learned.

Bit widths: 32 means "not quantized"; 16 is a real (nearly lossless) 16-bit fake quantization.
Weight granularity: one scale per output channel (the paper), per tensor (layerwise), or per group of G
consecutive input columns (group_size G, as deployable recipes use: a [out, in] weight is quantized as the
[out * in / G, G] matrix of its groups, the same formula on every row of G).
"""
import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

BITS_RULE = "1-8, 16 or 32 (32: not quantized)"  # the widths a QuantSetting allows (and w_bits 0: TERNARY)
TERNARY = 0  # w_bits 0: ParetoQ's ternary ("1.58-bit") grid, levels {-1, 0, 1} * a / 1.5 with a learned a (seq only)
CLIP_VAL = (-2.0, 2.0)  # gradient is zeroed where the quantizer input lies outside (-2, 2)
# CUDA tensors go through the fused Triton kernels (models/kernels.py); LLMQAT_TRITON=0, or setting this
# flag to False, runs the PyTorch reference on GPUs too (A/B checks). CPU tensors always use the reference.
USE_TRITON = os.environ.get("LLMQAT_TRITON", "1") != "0"


def _ste_mask(input, clip_val):
    # A bool mask (1 byte/element) is all the backward needs: keep it instead of the fp input.
    lo, hi = (float(c) for c in clip_val)
    return (input > lo) & (input < hi)


@functools.cache
def _triton_kernels():
    try:
        from models import kernels
    except ImportError:  # no triton (a CPU-only install): the reference everywhere
        return None
    return kernels


def _kernels_for(x, layerwise=False):
    kernels = _triton_kernels() if USE_TRITON and x.is_cuda and not layerwise else None
    return kernels if kernels is not None and x.shape[-1] <= kernels.MAX_COLS else None


# ---- The weight / activation grid: the one definition used by fake quantization, export and GPTQ ----
EPS = 1e-6  # in the scale's denominator and in the dequantizing step, as the original


def sym_levels(bits):
    """The largest code of the symmetric b-bit grid: codes are -L..L, L = 2^(b-1) - 1."""
    return 2 ** (bits - 1) - 1


def sym_scale(absmax, bits):
    """s = (2^(b-1) - 1) / (max|x| + 1e-6): codes are round(x * s). (int / tensor: torch computes
    reciprocal(max|x| + 1e-6) * L, which the Triton kernels reproduce.)"""
    return range_scale(absmax + EPS, bits)


def range_scale(r, bits):
    """s = L / r for a grid spanning [-r, r]: absmax's r is max|x| + 1e-6; a learned r is a parameter."""
    return sym_levels(bits) / r


def sym_dequant(codes, s):
    """The grid value of codes: codes / (s + 1e-6)."""
    return codes / (s + EPS)


def sym_codes(w, s, bits):
    """The codes round(w s), clamped to -L..L: under the absmax s (|w s| < L) the clamp never acts; under a
    learned s it is what keeps the codes on the b-bit grid."""
    levels = sym_levels(bits)
    return torch.round(w * s).clamp_(-levels, levels)


HALF_CLIP = 0.99  # w / a is clamped to +-0.99 on the 2-bit grid: the outer levels are reached, never passed


def half_codes(w, a):
    """The 2-bit grid's codes {-2, -1, 0, 1}: round(clamp(w / a, -0.99, 0.99) * 2 - 1/2); the levels are
    (code + 1/2) * a/2, i.e. {-1.5, -0.5, 0.5, 1.5} * a/2, no zero level (LLM-QAT's a = 2 mean|w|; ParetoQ's
    stretched elastic quantization, SEQ, is the same grid with a learned a = alpha)."""
    return torch.round(torch.clamp(w / a, -HALF_CLIP, HALF_CLIP) * 2 - 0.5)


TERNARY_STRETCH = 1.5  # ParetoQ's n_levels at num_bits 0 (shift 0): codes round(1.5 w / a), |codes| <= 1


def ternary_codes(w, a):
    """The ternary grid's codes {-1, 0, 1}: round(clamp(w / a, -0.99, 0.99) * 1.5) (ParetoQ's stretched elastic
    quantization at num_bits 0); the levels are code * a / 1.5, zero included."""
    return torch.round(torch.clamp(w / a, -HALF_CLIP, HALF_CLIP) * TERNARY_STRETCH)


def has_codes(bits):
    """Whether a weight width has integer codes (exported, GGUF blocks): 1-8 bits and ternary."""
    return 1 <= bits <= 8 or bits == TERNARY


def storage_bits(bits):
    """Bits per stored code: the ternary codes {-1, 0, 1} take 2."""
    return 2 if bits == TERNARY else bits


def groups(weight, group_size):
    """The [out * in / G, G] view of a [out, in] weight's groups of G input columns (G must divide in)."""
    if weight.shape[-1] % group_size:
        raise ValueError(f"w_group_size={group_size} does not divide the weight's {weight.shape[-1]} input columns")
    return weight.reshape(-1, group_size)


@dataclass
class WeightGrid:
    """A weight on the paper's grid: w = (codes - zero_point) * scale, codes int8 [out, in], scale float64
    [out, 1] (or [1, 1] per tensor, [out, in / G] per group of G columns). >= 3 bits: codes round(w s), scale 1/(s + 1e-6) (float64 so that
    s + 1e-6 comes back exactly: dequantize divides as fake quantization does, bit for bit). 2 bits: codes
    {-2..1}, zero point -0.5, levels {-1.5, -0.5, 0.5, 1.5} * a/2, a = 2 mean|w|. 1 bit: codes {-1, 0},
    zero point -0.5, levels -+mean|w| (no zero level: the fake quantizer's sign(0) = 0 is not a code).
    Ternary (bits 0, learned a only): codes {-1, 0, 1}, zero point 0, scale a / 1.5."""
    codes: torch.Tensor
    scale: torch.Tensor
    bits: int

    @property
    def zero_point(self):
        return zero_point(self.bits)


def zero_point(bits):
    """0 on the symmetric >= 3-bit and ternary grids; -0.5 on the 1- and 2-bit grids, whose levels sit between
    integers."""
    return -0.5 if 1 <= bits <= 2 else 0.0


def weight_grid(weight, bits, layerwise=False, group_size=None, weight_range=None):
    """The WeightGrid of a [out, in] weight, per output channel (row), per tensor or per group of group_size
    input columns; computed in fp32 with the same operations as the fake quantizer, so the codes are the QAT
    model's own roundings. weight_range: a learned range r ([out, 1] or [out, in / G], LearnedScaleQuant) instead
    of the one absmax computes from the weight."""
    if not has_codes(bits):
        raise ValueError(f"w_bits={bits}: only 1-8 bit and ternary (0) weights have integer codes")
    if bits == TERNARY and weight_range is None:
        raise ValueError("w_bits=0 (ternary) has no grid without a learned range (w_quantizer seq)")
    if group_size:
        r = None if weight_range is None else weight_range.reshape(-1, 1)
        g = weight_grid(groups(weight, group_size), bits, weight_range=r)
        return WeightGrid(g.codes.reshape(weight.shape), g.scale.reshape(weight.shape[0], -1), bits)
    w = weight.detach().float()
    learned = None if weight_range is None else weight_range.detach().float()

    def reduce(t, op):
        return op(t) if layerwise else op(t, dim=-1, keepdim=True)

    if bits >= 3:
        s = sym_scale(reduce(w.abs(), torch.amax), bits) if learned is None else range_scale(learned, bits)
        return WeightGrid(sym_codes(w, s, bits).to(torch.int8), 1 / (s + EPS).double(), bits)
    if bits == 2:
        a = 2 * reduce(w.abs(), torch.mean) if learned is None else learned
        return WeightGrid(half_codes(w, a).to(torch.int8), (a / 2).double(), bits)
    if bits == TERNARY:
        return WeightGrid(ternary_codes(w, learned).to(torch.int8), (learned / TERNARY_STRETCH).double(), bits)
    mean_abs = reduce(w.abs(), torch.mean)
    return WeightGrid(-(w < 0).to(torch.int8), (2 * mean_abs).double(), bits)


def dequantize(grid):
    """The fp32 weight of a WeightGrid: bit-exact the fake-quant weight at >= 3 bits; at 1-2 bits the grid's
    levels (a/2 and 2 mean|w| are exact in fp32)."""
    scale = grid.scale
    if scale.shape[-1] > 1:  # per group: each scale covers its G columns
        scale = scale.repeat_interleave(grid.codes.shape[-1] // scale.shape[-1], dim=-1)
    if grid.bits >= 3:  # codes / (s + 1e-6): the float64 scale gives back s + 1e-6 exactly
        return grid.codes / (1 / scale).float()
    return (grid.codes - grid.zero_point) * scale.float()


def sym_quant(x, num_bits, clip_val=CLIP_VAL, layerwise=False, out_dtype=None):
    """SymQuantizer's forward: (q, STE mask), q in out_dtype (default x.dtype).

    Fused Triton kernel for CUDA tensors (bit-packed mask, 1 bit/element), else the PyTorch reference
    (bool mask, or None on CPU when nothing is clipped); both give the same q bit for bit."""
    if torch.compiler.is_compiling():
        return _sym_quant_traced(x, num_bits, clip_val, layerwise, out_dtype)
    kernels = _kernels_for(x, layerwise)
    if kernels is not None:
        return kernels.sym_quant(x, num_bits, clip_val, out_dtype)
    xf = x.float()
    a = xf.abs()
    absmax = a.amax() if layerwise else a.amax(dim=-1, keepdim=True)
    lo, hi = (float(c) for c in clip_val)
    if lo != -hi:
        mask = _ste_mask(x, clip_val)
    elif x.device.type == "cpu" and bool((absmax < hi).all()):
        mask = None  # nothing clipped (|w| < 2 for weights), known from the row maxima: no mask pass at all
    else:  # |x| < c in one pass (not three), written as uint8 (a bool output is ~1.5x slower on CPUs), kept as bool
        mask = torch.lt(a, hi, out=torch.empty_like(a, dtype=torch.uint8)).view(torch.bool)
    s = sym_scale(absmax, num_bits)
    q = torch.mul(xf, s, out=a).round_().div_(s + EPS)  # sym_dequant in |x|'s buffer: no new temporaries
    return q.to(out_dtype or x.dtype), mask


def _sym_quant_traced(x, num_bits, clip_val, layerwise, out_dtype):
    """sym_quant's formula for torch.compile (--compile_layers): no data-dependent branch, no in-place write, the
    mask in q's float dtype (inductor's CPU kernels vectorize a float output next to q; a bool one runs ~7x
    slower), and the PyTorch formula on GPUs too (inductor writes its own kernel). The same q on the tests'
    inputs; the compiler may round the rest of the layer differently, which is why the flag is off by default."""
    xf = x.float()
    a = xf.abs()
    absmax = a.amax() if layerwise else a.amax(dim=-1, keepdim=True)
    dtype = out_dtype or x.dtype
    lo, hi = (float(c) for c in clip_val)
    mask = ((x > lo) & (x < hi)) if lo != -hi else a < hi
    s = sym_scale(absmax, num_bits)
    return (xf * s).round().div(s + EPS).to(dtype), mask.to(dtype)


def ste_grad(grad, mask, dtype):
    """Straight-through gradient grad * mask for any mask format, in dtype (the quantizer input's)."""
    if mask is None:
        return grad
    if mask.is_floating_point():  # the compiled path's 0/1 mask
        return grad * mask
    if mask.dtype == torch.bool:
        # the uint8 view multiplies the same 0/1 but vectorized (a bool operand is ~2x slower on CPUs);
        # autograd casts the result to the input's dtype if it differs
        return grad * mask.view(torch.uint8)
    return _triton_kernels().ste_grad(grad, mask, dtype)


class SymQuantizer(torch.autograd.Function):
    """Symmetric absmax fake quantization over the last dim (per token / per output channel).

    s = (2^(b-1) - 1) / (max|x| + 1e-6);  q = round(x * s) / (s + 1e-6)
    Backward: straight-through, zeroed where x <= clip_val[0] or x >= clip_val[1].
    Computed in float32 and cast back to the input dtype, or written straight in out_dtype.
    shared: a SharedInput, which hands sibling linears one quantization of their common input.
    """

    @staticmethod
    def forward(ctx, input, clip_val, num_bits, layerwise, out_dtype=None, shared=None):
        if shared is None or torch.compiler.is_compiling():  # compiled: no version counter to trust
            q, mask = sym_quant(input, num_bits, clip_val, layerwise, out_dtype)
        else:
            q, mask = shared(input, (num_bits, tuple(clip_val), layerwise, out_dtype),
                             lambda: sym_quant(input, num_bits, clip_val, layerwise, out_dtype))
        ctx.save_for_backward(mask)
        ctx.input_dtype = input.dtype
        return q

    @staticmethod
    def backward(ctx, grad_output):
        (mask,) = ctx.saved_tensors
        return ste_grad(grad_output, mask, ctx.input_dtype), None, None, None, None, None


class SharedInput:
    """One quantization of an input read by several linears (q/k/v_proj, gate/up_proj): the last input and its
    (q, mask), reused while the same tensor object, unmodified (same version), comes back with the same
    settings. Each linear still gets its own straight-through node (an alias of q), so the siblings'
    gradients are masked and summed in the input's dtype exactly as when each quantizes alone: values and
    gradients bit for bit. QuantSetting.apply gives one to all linears of a model: siblings run one after
    another, so a single entry finds every reuse and keeps at most one activation alive."""

    def __init__(self):
        self.x = self.key = self.result = None

    def __call__(self, x, key, quantize):
        if x.is_inference():  # no version counter to trust: quantize every time
            return quantize()
        key = (x._version, *key)
        if self.x is not x or self.key != key:
            q, mask = quantize()
            self.x, self.key, self.result = x, key, (q.detach(), mask)
            return q, mask
        q, mask = self.result
        return q.detach(), mask  # a new alias: the returned tensor becomes this node's output

    def __deepcopy__(self, memo):  # a copied model gets its own, empty one
        return SharedInput()


class AsymQuantizer(torch.autograd.Function):
    """Asymmetric min-max fake quantization over the last dim on 2^b - 1 levels (not the paper's default).

    q = round((x - min) / (max - min) * (2^b - 1)) / (2^b - 1) * (max - min) + min
    Backward: as SymQuantizer.
    """

    @staticmethod
    def forward(ctx, input, clip_val, num_bits, layerwise):
        ctx.save_for_backward(_ste_mask(input, clip_val))
        x = input.float()
        if layerwise:
            beta, top = x.amin(), x.amax()
        else:
            beta, top = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
        alpha = top - beta + 1e-8
        levels = 2**num_bits - 1
        q = torch.round((x - beta) / alpha * levels).div(levels)
        return (q * alpha + beta).to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (mask,) = ctx.saved_tensors
        return ste_grad(grad_output, mask, None), None, None, None


def _ste(w, q):
    """Plain straight-through: forward value q, gradient of identity w.r.t. w."""
    return w + (q - w).detach()


def quantize_weight(weight, w_bits, layerwise=False, dtype=None, group_size=None):
    """Fake-quantize a [out, in] weight per output channel (row), per tensor when layerwise, or per group of
    group_size input columns.

    dtype: the >= 3-bit result is written straight in it (autocast's compute dtype: one pass, no fp32 copy)."""
    if w_bits >= 32:
        return weight
    if group_size:  # the same quantizer on the rows of G columns (the Triton kernel included)
        return quantize_weight(groups(weight, group_size), w_bits, False, dtype).reshape(weight.shape)
    if w_bits >= 3:
        return SymQuantizer.apply(weight, CLIP_VAL, w_bits, layerwise, dtype)
    if w_bits < 1:
        raise ValueError(f"w_bits={w_bits} is not allowed; use {BITS_RULE}")
    q = dequantize(weight_grid(weight, w_bits, layerwise))
    if w_bits == 1:
        q = q * (weight.detach() != 0)  # sign(w) * mean|w|: a weight of exactly 0 stays 0
    return _ste(weight, q.to(weight.dtype))


# ---- Learned scales: LSQ (Esser et al. 2020) and ParetoQ's SEQ (Liu et al. 2025) on the grids above ----
W_QUANTIZERS = ("absmax", "lsq", "seq")


class LearnedScaleQuant(torch.autograd.Function):
    """Fake quantization of a [rows, cols] weight on the paper's grids with one learned range r per row ([rows, 1]):
    the grid spans [-r, r], in the weight's own units (so one learning rate suits every width).

    >= 3 bits: s = L / r (range_scale; absmax's s is L / (max|w| + 1e-6), i.e. r = max|w| + 1e-6):
        c = clamp(round(w s), -L, L),  w_q = c / (s + 1e-6)          (sym_codes, sym_dequant)
    2 bits: r = a (LLM-QAT's 2 mean|w|, ParetoQ's alpha):
        c = round(clamp(w / a, -0.99, 0.99) * 2 - 1/2),  w_q = (c + 1/2) * a/2      (half_codes)
    ternary (bits 0; ParetoQ's SEQ at num_bits 0): r = a:
        c = round(clamp(w / a, -0.99, 0.99) * 1.5),  w_q = c * a/1.5               (ternary_codes)
    Backward (LSQ): w gets the straight-through gradient where it lies inside the grid's range (|w s| <= L,
    |w / a| <= 0.99), 0 outside. r gets LSQ's step-size gradient by the chain rule, scaled by
    g = 1 / sqrt(cols * Q_P) (Q_P = L = 2^(b-1) - 1, 1 at 2 bits and ternary as ParetoQ; cols = weights per range).
    LSQ: dw_q/dDelta = c - w/Delta inside the range, c outside (round's derivative taken as 1). Here
        >= 3 bits  Delta = 1 / (s + 1e-6), s = L / r:  dw_q/dr = (w_q - w [inside]) / r * s / (s + 1e-6)
        2 bits     Delta = a / 2 (levels (c + 1/2) Delta):  dw_q/da = (w_q - w [inside]) / a
        ternary    Delta = a / 1.5 (levels c Delta):         dw_q/da = (w_q - w [inside]) / a
    (ParetoQ's ternary backward gives dw_q/da = +-1 outside the range, where its forward's derivative is +-1/1.5;
    this is the forward's own derivative, as at 2 bits, where the two agree.)
    and dLoss/dr = g * sum over the row of dLoss/dw_q * dw_q/dr."""

    @staticmethod
    def forward(ctx, weight, weight_range, bits, out_dtype=None):
        ctx.save_for_backward(weight, weight_range)
        ctx.bits = bits
        return learned_grid_value(weight.float(), weight_range.float(), bits).to(out_dtype or weight.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        weight, weight_range = ctx.saved_tensors
        w, r, grad = weight.float(), weight_range.float(), grad_output.float()
        q = learned_grid_value(w, r, ctx.bits)
        if ctx.bits >= 3:
            s = range_scale(r, ctx.bits)
            inside = (w * s).abs() <= sym_levels(ctx.bits)
            dq_dr = (q - w * inside) / r * (s / (s + EPS))
        else:
            inside = (w / r).abs() <= HALF_CLIP
            dq_dr = (q - w * inside) / r
        g = 1 / math.sqrt(w.shape[-1] * (sym_levels(ctx.bits) if ctx.bits >= 3 else 1))
        grad_range = (grad * dq_dr).sum(dim=-1, keepdim=True) * g
        return (grad * inside).to(weight.dtype), grad_range.to(weight_range.dtype), None, None


def learned_grid_value(w, r, bits):
    """w_q of LearnedScaleQuant (fp32): the codes and levels weight_grid(..., weight_range=r) exports."""
    if bits >= 3:
        s = range_scale(r, bits)
        return sym_dequant(sym_codes(w, s, bits), s)
    if bits == TERNARY:
        return ternary_codes(w, r) * (r / TERNARY_STRETCH)
    return (half_codes(w, r) - zero_point(bits)) * (r / 2)


def initial_range(weight, bits, quantizer, group_size=None):
    """The learned range's start, [out, 1] or [out, in / G], fp32. lsq: absmax's own (r = max|w| + 1e-6, at 2 bits
    a = 2 mean|w|), so the first forward is absmax's grid bit for bit; seq (2 bits, ternary): a = max|w| (ParetoQ's
    initialization)."""
    w = weight.detach().float()
    rows = groups(w, group_size) if group_size else w
    if bits >= 3:
        r = rows.abs().amax(dim=-1, keepdim=True) + EPS
    elif quantizer == "seq":
        r = rows.abs().amax(dim=-1, keepdim=True)
    else:
        r = 2 * rows.abs().mean(dim=-1, keepdim=True)
    return r.reshape(w.shape[0], -1)


def learned_quantize_weight(weight, weight_range, bits, dtype=None, group_size=None):
    """Fake-quantize a [out, in] weight with its learned range ([out, 1], or [out, in / G] per group of G)."""
    if group_size:
        q = LearnedScaleQuant.apply(groups(weight, group_size), weight_range.reshape(-1, 1), bits, dtype)
        return q.reshape(weight.shape)
    return LearnedScaleQuant.apply(weight, weight_range, bits, dtype)


def quantize_act(x, bits, symmetric=True, layerwise=False, dtype=None, shared=None):
    """Fake-quantize activations per token (last dim). Off for bits <= 2 and bits >= 32, as in the paper.

    dtype: as in quantize_weight (symmetric only). shared: a SharedInput (symmetric only)."""
    if bits <= 2 or bits >= 32:
        return x
    if not symmetric:
        return AsymQuantizer.apply(x, CLIP_VAL, bits, layerwise)
    return SymQuantizer.apply(x, CLIP_VAL, bits, layerwise, dtype, shared)


class QuantizeLinear(nn.Linear):
    """nn.Linear whose weight (per output channel, or per group of w_group_size input columns) and input (per
    token) are fake-quantized.

    out_bits < 32 also quantizes the output per token: used on k_proj / v_proj for the KV cache.
    Printing shows the nn.Linear repr, as in the original code; the bit widths are attributes.
    """

    def __init__(self, *args, symmetric=True, bias=False, w_bits=32, a_bits=32, out_bits=32,
                 act_layerwise=False, weight_layerwise=False, w_group_size=None, w_quantizer="absmax", **kwargs):
        super().__init__(*args, bias=bias, **kwargs)
        if w_group_size and self.in_features % w_group_size:
            raise ValueError(f"w_group_size={w_group_size} does not divide in_features={self.in_features}")
        self.w_bits, self.a_bits, self.out_bits, self.w_group_size = w_bits, a_bits, out_bits, w_group_size or None
        self.symmetric = symmetric
        self.act_layerwise, self.weight_layerwise = act_layerwise, weight_layerwise
        self.shared_input = None  # a SharedInput: quantize an input once for the linears that read it
        self.w_quantizer = w_quantizer
        if self.learns_scale:
            self.init_weight_range()

    @property
    def learns_scale(self):
        return self.w_quantizer != "absmax" and (2 <= self.w_bits <= 8 or self.w_bits == TERNARY)

    def init_weight_range(self, empty=False):
        """(Re)create the learned range weight_range from the current weight (initial_range); empty: allocated, not
        computed (a rank whose weights FSDP broadcasts from rank 0, or a saved model's ranges about to be read)."""
        shape = (self.out_features, self.in_features // (self.w_group_size or self.in_features))
        value = torch.empty(shape, dtype=self.weight.dtype, device=self.weight.device) if empty else \
            initial_range(self.weight, self.w_bits, self.w_quantizer, self.w_group_size).to(self.weight.dtype)
        self.weight_range = nn.Parameter(value)

    def weight_grid(self):
        """The integer grid of the weight the forward uses (absmax's, or the learned range's): what export packs."""
        r = self.weight_range if self.learns_scale else None
        return weight_grid(self.weight, self.w_bits, self.weight_layerwise, self.w_group_size, r)

    def quantized_weight(self, dtype=None):
        """The fake-quantized weight (in dtype if given); an exported model dequantizes its codes here."""
        if self.learns_scale:
            return learned_quantize_weight(self.weight, self.weight_range, self.w_bits, dtype, self.w_group_size)
        return quantize_weight(self.weight, self.w_bits, self.weight_layerwise, dtype, self.w_group_size)

    def forward(self, input):
        # Under autocast F.linear would cast both operands: quantize straight into the compute dtype instead.
        device = input.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        # the input first: the weight is then freshly written, still in cache, when the matmul reads it
        input = quantize_act(input, self.a_bits, self.symmetric, self.act_layerwise, dtype, self.shared_input)
        weight = self.quantized_weight(dtype)
        out = F.linear(input, weight, self.bias)
        if self.out_bits < 32:
            out = SymQuantizer.apply(out, CLIP_VAL, self.out_bits, False)
        return out
