"""Real low-bit checkpoints from a QAT model: packed integer weights with per-row scales, loaded back and run.

Format: compressed-tensors `pack-quantized` (read by vLLM, and by transformers through compressed-tensors).
Every decoder linear stores
    weight_packed  int32 [out, ceil(in * b / 32)]  b-bit integers q, packed densely (models/packing.py)
    weight_scale   float64 [out, 1]                one scale per output channel (row), or [out, in / G] with
                                                   w_group_size G (compressed-tensors' group strategy)
    weight_shape   int64 [2]                       (out, in)
meaning w = (q - zero_point) * weight_scale, LLM-QAT's fake-quant weight (quantize_weight):
    >= 3 bits  q = round(w * s), scale = 1 / (s + 1e-6), zero_point 0;
    2 bits     q in {-2, -1, 0, 1}, scale = a / 2, zero_point -0.5: levels {-1.5, -0.5, 0.5, 1.5} * a/2;
    1 bit      q in {-1, 0}, scale = 2 mean|w|, zero_point -0.5: levels -+mean|w| (a weight of exactly 0, which
               the QAT model keeps at 0, is not representable: export would report it as a weight mismatch).
    ternary    (w_bits 0, learned seq range a) q in {-1, 0, 1} stored in 2 bits, scale = a / 1.5, zero_point 0.
Exactness. >= 3 bits: the loaded model's weights and logits are bit-exact. The scales are float64 for this: in
fp32, q * (1 / (s + 1e-6)) is 1 ulp off the QAT model's q / (s + 1e-6) for some weights, and with 8-bit
activations and a 4-bit KV cache such differences flip roundings downstream (0.09 max logit difference on the
embedded W4A8KV4 model); from a float64 scale, s + 1e-6 comes back exactly and the loaded model divides as the
QAT model does (4 more bytes a row). 1 and 2 bits: the weights are exactly the grid levels, but the QAT forward
uses the straight-through w + (q - w), which is q only up to fp32 rounding and needs the float weight w: logits
match to about 1e-5.
The 1- and 2-bit grids have no zero level and compressed-tensors has no half-integer zero point, so only >= 3-bit
exports carry its `quantization_config`. Every export keeps LLM-QAT's w_bits/a_bits/kv_bits/kv_post_rope and
adds `llmqat_export`; load_exported rebuilds the model from them with the QAT model's activation and KV
quantization, which compressed-tensors cannot express (see compressed_tensors_config).
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from models.errors import InputError
from models.io import atomic_dir
from models.packed import PackedQuantizeLinear
from models.quant_model import QuantSetting, load_exported, load_model, read_config, swap_linears
from models.utils_quant import QuantizeLinear, has_codes, zero_point

SAMPLE_TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
MAX_LOGIT_DIFF = 1e-3


def compressed_tensors_config(bits, group_size=None):
    """The compressed-tensors `quantization_config`: b-bit symmetric int weights, one scale per channel (or per
    group of group_size input columns), packed.

    Weights only: LLM-QAT's per-token activation grid (absmax / (2^(b-1) - 1)) is not compressed-tensors'
    (absmax / (2^(b-1) - 0.5)), and its KV quantization (per token across heads, before RoPE) has no equivalent.
    """
    weights = dict(num_bits=bits, type="int", symmetric=True, strategy="group" if group_size else "channel",
                   group_size=group_size, dynamic=False)
    return dict(quant_method="compressed-tensors", format="pack-quantized", quantization_status="compressed",
                config_groups={"group_0": dict(targets=["Linear"], weights=weights, input_activations=None)},
                ignore=["lm_head"], kv_cache_scheme=None)


def check_input(model_dir, out_dir):
    """One clear error before any work: not a QAT checkpoint, incomplete, or an output that would be overwritten."""
    config = read_config(model_dir)  # no config.json: one error, the hub never asked
    if QuantSetting.from_config(config) is None:
        raise InputError(f"{model_dir} is not a QAT checkpoint: its config.json has no w_bits/a_bits/kv_bits")
    if hasattr(config, "llmqat_export"):
        raise InputError(f"{model_dir} is already an exported checkpoint")
    if not has_codes(config.w_bits):
        raise InputError(f"w_bits={config.w_bits} in {model_dir}: only 1-8 bit and ternary (0) weights are exported")
    for name, files in (("weights", ("model.safetensors", "model.safetensors.index.json")),
                        ("tokenizer", ("tokenizer_config.json",))):
        if not any((model_dir / f).is_file() for f in files):
            raise InputError(f"{model_dir} is incomplete: no {name} ({' or '.join(files)})")
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise InputError(f"{out_dir} exists and is not empty; not overwriting it")
    return config


@dataclass
class ExportReport:
    max_logit_diff: float
    size_ratio: float  # bf16 bytes of the decoder linears / their exported bytes, scales included
    max_weight_diff: float  # largest |dequantized - fake-quant weight| (0: bit-exact)
    bf16_bytes: int
    packed_bytes: int


def export(model_dir, out_dir):
    """Write the QAT model in model_dir as a packed low-bit checkpoint in out_dir, after checking that it
    reproduces the fake-quant model's logits on SAMPLE_TEXT. Writes into a temporary directory, then renames."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = check_input(model_dir, out_dir)
    bits, group_size = config.w_bits, getattr(config, "w_group_size", None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir).eval()
    sample = tokenizer(SAMPLE_TEXT, return_tensors="pt").input_ids
    weight_diffs = []

    def pack_one(name, linear):
        packed = PackedQuantizeLinear.from_linear(linear)
        weight_diffs.append((packed.dequantized_weight() - linear.quantized_weight()).abs().max().item())
        return packed

    with torch.no_grad():
        reference = model(sample).logits
        swap_linears(model, QuantizeLinear, pack_one)
    model.config.llmqat_export = {"format": "pack-quantized", "num_bits": bits, "zero_point": zero_point(bits),
                                  "group_size": group_size}
    if bits >= 3:
        model.config.quantization_config = compressed_tensors_config(bits, group_size)

    try:
        with atomic_dir(out_dir) as tmp:  # a temporary directory beside out_dir, renamed when checked
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            exported = load_exported(tmp)
            with torch.no_grad():
                max_logit_diff = (exported(sample).logits - reference).abs().max().item()
            if not max_logit_diff <= MAX_LOGIT_DIFF:
                raise InputError(f"the exported model's logits differ from the QAT model's by {max_logit_diff:.3g} "
                                 f"> {MAX_LOGIT_DIFF}; nothing written")
            packed = [m for m in exported.modules() if isinstance(m, PackedQuantizeLinear)]
            bf16_bytes = sum(2 * (m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0))
                             for m in packed)
            packed_bytes = sum(t.nbytes for m in packed for t in m.state_dict().values())
    except FileExistsError:
        raise InputError(f"{out_dir} appeared while exporting; not overwriting it") from None
    report = ExportReport(max_logit_diff, bf16_bytes / packed_bytes, max(weight_diffs), bf16_bytes, packed_bytes)
    exact = "bit-exact" if report.max_weight_diff == 0 else f"max difference {report.max_weight_diff:.3g}" + (
        " (its straight-through w + (q - w) is on the grid only up to fp32 rounding)" if bits <= 2 else "")
    layout = "compressed-tensors pack-quantized" if bits >= 3 else "pack-quantized layout, read by load_exported only"
    print(f"exported {len(packed)} decoder linears as int{bits} ({layout}) to {out_dir}")
    print(f"dequantized weights vs the QAT model's fake-quant weights: {exact}")
    print(f"decoder linears: {bf16_bytes / 1e6:.2f} MB as bf16 -> {packed_bytes / 1e6:.2f} MB; "
          f"weight files: {_disk_mb(model_dir):.2f} MB -> {_disk_mb(out_dir):.2f} MB")
    print(f"max_logit_diff {max_logit_diff:.3g} size_ratio {report.size_ratio:.2f}")
    return report


def _disk_mb(path):
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 1e6
