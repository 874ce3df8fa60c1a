"""Fake quantizers and QuantizeLinear, with the numerics of LLM-QAT (Liu et al. 2023, section 2).

Everything is "fake" quantization: values are rounded onto a b-bit grid and scaled back, so training
sees the quantization error while tensors keep their float dtype. Scales are recomputed from the
tensor on every call (absmax, dynamic); nothing besides the weights themselves is learned.

Bit widths: 32 means "not quantized"; 16 is a real (nearly lossless) 16-bit fake quantization.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_VAL = (-2.0, 2.0)  # gradient is zeroed where the quantizer input lies outside (-2, 2)


def _ste_mask(input, clip_val):
    # A bool mask (1 byte/element) is all the backward needs: keep it instead of the fp input.
    lo, hi = (float(c) for c in clip_val)
    return (input > lo) & (input < hi)


def _absmax(x, layerwise):
    """Per-row (last dim) absmax, or one scalar for the whole tensor when layerwise."""
    if layerwise:
        return x.abs().amax()
    return x.abs().amax(dim=-1, keepdim=True)


class SymQuantizer(torch.autograd.Function):
    """Symmetric absmax fake quantization over the last dim (per token / per output channel).

    s = (2^(b-1) - 1) / (max|x| + 1e-6);  q = round(x * s) / (s + 1e-6)
    Backward: straight-through, zeroed where x <= clip_val[0] or x >= clip_val[1].
    Computed in float32 and cast back to the input dtype.
    """

    @staticmethod
    def forward(ctx, input, clip_val, num_bits, layerwise):
        ctx.save_for_backward(_ste_mask(input, clip_val))
        x = input.float()
        s = (2 ** (num_bits - 1) - 1) / (_absmax(x, layerwise) + 1e-6)
        return torch.round(x * s).div(s + 1e-6).to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (mask,) = ctx.saved_tensors
        return grad_output * mask, None, None, None


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

    backward = SymQuantizer.backward


def _ste(w, q):
    """Plain straight-through: forward value q, gradient of identity w.r.t. w."""
    return w + (q - w).detach()


def quantize_weight(weight, w_bits, layerwise=False):
    """Fake-quantize a [out, in] weight per output channel (row), or per tensor when layerwise."""
    if w_bits >= 32:
        return weight
    if w_bits >= 3:
        return SymQuantizer.apply(weight, CLIP_VAL, w_bits, layerwise)
    w = weight.detach().float()
    mean_abs = w.abs().mean() if layerwise else w.abs().mean(dim=-1, keepdim=True)
    if w_bits == 2:
        # four levels {-1.5, -0.5, 0.5, 1.5} * a/2 with a = 2 * mean|w|; no zero level
        a = 2 * mean_abs
        q = a * (torch.round(torch.clamp(w / a, -0.99, 0.99) * 2 - 0.5) + 0.5) / 2
    elif w_bits == 1:
        q = torch.sign(w) * mean_abs
    else:
        raise ValueError(f"w_bits={w_bits} is not allowed; use 1-16 or 32")
    return _ste(weight, q.to(weight.dtype))


def quantize_act(x, bits, symmetric=True, layerwise=False):
    """Fake-quantize activations per token (last dim). Off for bits <= 2 and bits >= 32, as in the paper."""
    if bits <= 2 or bits >= 32:
        return x
    quantizer = SymQuantizer if symmetric else AsymQuantizer
    return quantizer.apply(x, CLIP_VAL, bits, layerwise)


class QuantizeLinear(nn.Linear):
    """nn.Linear whose weight (per output channel) and input (per token) are fake-quantized.

    out_bits < 32 also quantizes the output per token: used on k_proj / v_proj for the KV cache.
    Printing shows the nn.Linear repr, as in the original code; the bit widths are attributes.
    """

    def __init__(self, *args, symmetric=True, bias=False, w_bits=32, a_bits=32, out_bits=32,
                 act_layerwise=False, weight_layerwise=False, **kwargs):
        super().__init__(*args, bias=bias, **kwargs)
        self.w_bits, self.a_bits, self.out_bits = w_bits, a_bits, out_bits
        self.symmetric = symmetric
        self.act_layerwise, self.weight_layerwise = act_layerwise, weight_layerwise

    def forward(self, input):
        weight = quantize_weight(self.weight, self.w_bits, self.weight_layerwise)
        input = quantize_act(input, self.a_bits, self.symmetric, self.act_layerwise)
        out = F.linear(input, weight, self.bias)
        if self.out_bits < 32:
            out = SymQuantizer.apply(out, CLIP_VAL, self.out_bits, False)
        return out
