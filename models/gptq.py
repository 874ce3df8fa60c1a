"""GPTQ (Frantar et al., 2023) on LLM-QAT's own weight grid, as a training-free weight baseline.

Each decoder linear's weights are rounded one column at a time, and the rounding error of a column is
spread over the columns not yet rounded through the inverse Hessian of its input, H = 2 X^T X / n over
calibration tokens (blocks of 128 columns, damping 1% of mean(diag H)). The grid is exactly RTN's: per
row (or per group of G columns) s = (2^(b-1) - 1) / (max|w| + 1e-6) from the original weights, q = round(w s) / (s + 1e-6), clamped
to the row's levels because compensated weights can leave the original range. Layers are done in order,
each calibrated on the outputs of the already quantized layers before it (their inputs are cached: one pass per
layer, as the GPTQ reference code, instead of re-running the model up to it).
"""
import torch
import torch.nn as nn
from tqdm import tqdm

from models.calibration import StopForward, run_windows
from models.quant_model import decoder_layers
from models.utils_quant import groups, sym_dequant, sym_levels, sym_scale


def grid(weight, bits, group_size=None):
    """The scale s of every weight [out, in] (per row, or per group of group_size columns) and the largest code,
    as SymQuantizer computes them for weights (models.utils_quant)."""
    if group_size:
        s = sym_scale(groups(weight, group_size).abs().amax(dim=1, keepdim=True), bits)
        return s.reshape(weight.shape[0], -1).repeat_interleave(group_size, dim=1), sym_levels(bits)
    return sym_scale(weight.abs().amax(dim=1, keepdim=True), bits).expand(weight.shape), sym_levels(bits)


def round_to_grid(w, s, levels):
    return sym_dequant(torch.clamp(torch.round(w * s), -levels, levels), s)


@torch.no_grad()
def gptq_weight(weight, hessian, bits, blocksize=128, percdamp=0.01, group_size=None):
    """The GPTQ-rounded copy of weight [out, in] (fp32) for input Hessian [in, in]; group_size: on the grid of
    one scale per group of columns (from the original weights, as RTN's)."""
    W, H = weight.detach().float().clone(), hessian.float().clone()
    s, levels = grid(W, bits, group_size)
    dead = torch.diag(H) == 0  # inputs never seen: nothing to compensate with
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(len(H), device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, Hinv1, Err1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2], torch.zeros_like(W[:, i1:i2])
        for i in range(i2 - i1):
            q = round_to_grid(W1[:, i:i + 1], s[:, i1 + i:i1 + i + 1], levels)
            Q[:, i1 + i] = q[:, 0]
            err = (W1[:, i:i + 1] - q) / Hinv1[i, i]
            W1[:, i:] -= err @ Hinv1[i:i + 1, i:]
            Err1[:, i:i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


@torch.no_grad()
def first_layer_inputs(model, windows, batch_size=1):
    """(args, kwargs) the first decoder layer is called with, per batch of windows: the embeddings, the
    position embeddings and the mask, so that each layer can then be run on its own."""
    calls = []

    def grab(module, args, kwargs):
        calls.append((args, kwargs))
        raise StopForward
    run_windows(model, windows, [decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)],
                batch_size)
    return calls


def next_inputs(args, kwargs, output):
    """The next layer's call: this layer's hidden states in place of its input (older transformers return a
    tuple, newer ones the tensor)."""
    hidden = output[0] if isinstance(output, tuple) else output
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def gptq_model(model, windows, bits, batch_size=1, group_size=None):
    """Replace every decoder linear's weight by its GPTQ rounding, layer after layer, in place. Each layer
    runs once on the outputs of the already quantized layers before it (kept in memory: n x seq_len x hidden
    floats), once more after its rounding to give the next layer's inputs."""
    calls = first_layer_inputs(model, windows, batch_size)
    for layer in tqdm(decoder_layers(model), desc=f"GPTQ W{bits}", unit="layer"):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        hessians = {n: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for n, m in linears.items()}

        def accumulate(name):
            def hook(module, args):
                x = args[0].detach().flatten(0, -2).float()
                hessians[name].addmm_(x.T, x, alpha=2.0)
            return hook

        hooks = [m.register_forward_pre_hook(accumulate(n)) for n, m in linears.items()]
        try:
            for args, kwargs in calls:
                layer(*args, **kwargs)
        finally:
            for h in hooks:
                h.remove()
        for name, linear in linears.items():  # every token of every window went through every linear once
            q = gptq_weight(linear.weight, hessians[name] / windows.numel(), bits, group_size=group_size)
            linear.weight.copy_(q.to(linear.weight.dtype))
        calls = [next_inputs(args, kwargs, layer(*args, **kwargs)) for args, kwargs in calls]
    return model
