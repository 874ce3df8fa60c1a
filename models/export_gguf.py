"""export.py --format gguf: a QAT checkpoint as one GGUF file that llama.cpp runs.

The decoder linears go in as Q4_0 (1-4 bit weights) or Q8_0 (5-8 bits) blocks holding the QAT grid itself
(models/gguf_writer.py), embeddings in F16, norms in F32. Before the file is renamed into place it is read back
with gguf's reader and dequantized: every decoder weight must equal the QAT model's fake-quant weight up to the
fp16 rounding of its block scale (relative error <= 2^-11). What llama.cpp does not take from the QAT model:
its activation and KV-cache quantization (llama.cpp quantizes activations itself, to Q8_0 blocks of 32 for
these weight types, and keeps the KV cache in f16 unless asked for q8_0 / q4_0).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from models.errors import InputError
from models.export import check_input
from models.gguf_writer import TENSOR_NAMES, rotary_rows, write_gguf
from models.io import atomic_dir
from models.quant_model import QuantSetting, load_model

MAX_REL_WEIGHT_ERR = 2.0 ** -11 * 1.01  # fp16 rounding of a scale; an fp16 subnormal scale would exceed it


@dataclass
class GGUFReport:
    path: Path
    max_rel_weight_err: float
    types: dict  # tensor name -> GGUF type name
    file_bytes: int


def expected_weights(model):
    """{GGUF tensor name: the QAT model's fake-quant weight in GGUF's row order} for every decoder linear."""
    cfg = model.config
    expected = {}
    with torch.no_grad():
        for n, layer in enumerate(model.model.layers):
            for hf_name, gguf_name in TENSOR_NAMES.items():
                module = layer.get_submodule(hf_name)
                if not isinstance(module, torch.nn.Linear):
                    continue
                w = module.quantized_weight().float()
                heads = {"self_attn.q_proj": cfg.num_attention_heads,
                         "self_attn.k_proj": cfg.num_key_value_heads}.get(hf_name)
                expected[f"blk.{n}.{gguf_name}.weight"] = rotary_rows(w, heads) if heads else w
    return expected


def read_back_error(path, expected):
    """Largest relative difference between the file's dequantized decoder weights and `expected` (0 where the
    QAT weight is 0, which must read back as 0)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    worst = 0.0
    for name, ref in expected.items():
        t = tensors.get(name)
        if t is None:
            raise InputError(f"{path}: tensor {name} missing after writing; nothing kept")
        got = torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(ref.shape))
        zero = ref == 0
        if (got[zero] != 0).any():
            return float("inf")
        worst = max(worst, ((got - ref).abs()[~zero] / ref.abs()[~zero]).max().item() if (~zero).any() else 0.0)
    return worst


def export_gguf(model_dir, out_dir):
    """Write the QAT model in model_dir as out_dir/<setting name>.gguf, checked by reading it back."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = check_input(model_dir, out_dir)
    if config.model_type != "llama" or getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise InputError(f"{model_dir}: --format gguf writes LLaMA-architecture models without biases "
                         f"(this one is {config.model_type!r}); use the default compressed-tensors export")
    setting = QuantSetting.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir).eval()
    expected = expected_weights(model)
    try:
        with atomic_dir(out_dir) as tmp:
            path = Path(tmp) / f"{setting.name}.gguf"
            try:
                types = write_gguf(model, tokenizer, path, np.float16)
            except ValueError as e:  # a tokenizer the writer does not know
                raise InputError(f"{model_dir}: {e}") from None
            err = read_back_error(path, expected)
            if not err <= MAX_REL_WEIGHT_ERR:
                raise InputError(f"the GGUF weights read back differ from the QAT model's by {err:.3g} (relative) > "
                                 f"{MAX_REL_WEIGHT_ERR:.3g}; nothing written")
            size = path.stat().st_size
    except FileExistsError:
        raise InputError(f"{out_dir} appeared while exporting; not overwriting it") from None
    report = GGUFReport(out_dir / path.name, err, types, size)
    linears = [types[name] for name in expected]
    kinds = ", ".join(f"{linears.count(k)} {k}" for k in sorted(set(linears)))
    print(f"exported {len(linears)} decoder linears ({kinds}) of {setting.name} to {report.path} "
          f"({size / 1e6:.2f} MB)")
    if "F32" in linears:
        print("note: linears whose input width is not a multiple of 32 (or whose groups are not) are stored as F32, "
              "their exact fake-quant weights")
    print("llama.cpp runs the weights as trained; activations and KV cache as llama.cpp does (not the QAT model's)")
    print(f"max_rel_weight_err {err:.3g}")
    return report
