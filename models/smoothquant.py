"""SmoothQuant (Xiao et al., 2023) as a training-free baseline beside RTN and LLM-QAT.

Per input channel j of the linears that read a normalized hidden state, s_j = max|X_j|^alpha / max|W_j|^(1-alpha)
(activation max over calibration tokens, weight max over the rows of every linear sharing that input).
The norm's weight is divided by s and the linears' columns multiplied by it: the FP function is unchanged,
the activation outlier channels shrink, and the weights absorb them. Then the same fake quantizers as RTN.
Smoothed per decoder layer: input_layernorm -> q/k/v_proj and post_attention_layernorm -> gate/up_proj (the
usual LLaMA port; o_proj and down_proj read no norm output and are left as they are).
"""
import torch

from models.calibration import run_windows
from models.quant_model import decoder_layers

GROUPS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))


def activation_absmax(model, windows, batch_size=1):
    """Per-channel max |x| at the input of each smoothed group, over windows [n, seq_len] of token ids."""
    stats, hooks = {}, []

    def record(key):
        def hook(module, args):
            x = args[0].detach().flatten(0, -2).abs().amax(dim=0).float()
            stats[key] = x if key not in stats else torch.maximum(stats[key], x)
        return hook

    for i, layer in enumerate(decoder_layers(model)):
        for norm, linears in GROUPS:
            hooks.append(layer.get_submodule(linears[0]).register_forward_pre_hook(record((i, norm))))
    run_windows(model, windows, hooks, batch_size)
    return stats


@torch.no_grad()
def smooth(model, act_absmax, alpha=0.5):
    """Fold the smoothing scales into the norms and the linears, in place (the FP function is unchanged)."""
    for i, layer in enumerate(decoder_layers(model)):
        for norm_name, linear_names in GROUPS:
            norm, linears = layer.get_submodule(norm_name), [layer.get_submodule(n) for n in linear_names]
            w_max = torch.stack([lin.weight.abs().amax(dim=0).float() for lin in linears]).amax(dim=0)
            a_max = act_absmax[(i, norm_name)].to(w_max.device)
            s = (a_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
            norm.weight.div_(s.to(norm.weight.dtype))
            for lin in linears:
                lin.weight.mul_(s.to(lin.weight.dtype))
    return model
