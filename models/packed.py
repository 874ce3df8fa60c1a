"""PackedQuantizeLinear: a QuantizeLinear whose weight is stored as packed integer codes (export.py's format).

    weight_packed  int32 [out, ceil(in * b / 32)]  the b-bit codes, packed densely (models/packing.py)
    weight_scale   float64 [out, 1]                one scale per output channel (row), or [out, in / G]: per group
    weight_shape   int64 [2]                       (out, in)
meaning w = (codes - zero_point) * weight_scale: models.utils_quant.WeightGrid, the fake quantizer's own grid.
"""
import torch

from models.packing import pack, packed_words, unpack
from models.utils_quant import QuantizeLinear, WeightGrid, dequantize, storage_bits


class PackedQuantizeLinear(QuantizeLinear):
    """A QuantizeLinear holding packed integer weights (weight_packed, weight_scale, weight_shape) instead of a
    float weight. The weight is dequantized on every forward (only the packed form stays in memory); the input
    (a_bits) and the output (out_bits: the KV cache on k_proj / v_proj) are quantized as in QuantizeLinear."""

    def __init__(self, linear):
        # absmax: the codes and scales are fixed here, whichever quantizer learned them (weight_scale is a buffer)
        super().__init__(linear.in_features, linear.out_features, symmetric=linear.symmetric, w_bits=linear.w_bits,
                         a_bits=linear.a_bits, out_bits=linear.out_bits, act_layerwise=linear.act_layerwise,
                         w_group_size=linear.w_group_size, device="meta")
        self.weight, self.bias = None, linear.bias
        out, n = linear.out_features, linear.in_features
        self.register_buffer("weight_packed", torch.zeros(out, packed_words(n, storage_bits(self.w_bits)), dtype=torch.int32))
        scales = n // self.w_group_size if self.w_group_size else 1
        self.register_buffer("weight_scale", torch.zeros(out, scales, dtype=torch.float64))
        self.register_buffer("weight_shape", torch.tensor([out, n]))

    @classmethod
    def from_linear(cls, linear):
        packed = cls(linear)
        grid = linear.weight_grid()  # absmax's grid, or the learned scale's
        packed.weight_packed.copy_(pack(grid.codes, storage_bits(linear.w_bits)))
        packed.weight_scale.copy_(grid.scale)
        return packed

    def grid(self):
        codes = unpack(self.weight_packed, storage_bits(self.w_bits), self.in_features)
        return WeightGrid(codes, self.weight_scale, self.w_bits)

    def dequantized_weight(self):
        """The fp32 weight on the paper's grid (at >= 3 bits, the QAT model's fake-quant weight bit for bit)."""
        return dequantize(self.grid())

    def quantized_weight(self, dtype=None):
        # QuantizeLinear.forward then quantizes the input and the output (KV) exactly as in training
        weight = self.dequantized_weight()
        return weight if dtype is None else weight.to(dtype)
