"""Dense packing of b-bit integers (b = 1..8) into int32 words: the compressed-tensors `pack-quantized` layout.

Along each row, value i is stored unsigned (value + 2^(b-1)) in bits [i*b, (i+1)*b) of the row's bit stream,
bit k of the stream being bit k % 32 of word k // 32. A row of n values takes ceil(n*b / 32) words, zero-padded.
So int8 is one value per byte, int4 two per byte (low nibble first), int2 four, int1 eight; 3, 5, 6 and 7-bit
values straddle bytes. Words are little-endian, as safetensors stores them.

Both directions work on groups: the fewest values that fill whole bytes (2 values in 1 byte at 4 bits,
8 values in 3 bytes at 3 bits), each group held in one integer and split with shifts.
"""
import math

import torch
import torch.nn.functional as F


def packed_words(n, bits):
    return math.ceil(n * bits / 32)


def _groups(bits):
    """(values per group, bytes per group, integer dtype that holds a group)."""
    per_group = 8 // math.gcd(bits, 8)
    nbytes = per_group * bits // 8
    return per_group, nbytes, torch.uint8 if nbytes == 1 else torch.int32 if nbytes < 4 else torch.int64


def _fit(x, width):
    """Zero-pad or cut the last dim to width (what is cut is only padding)."""
    return F.pad(x, (0, width - x.shape[-1]))


def pack(values, bits):
    """int8 [rows, n] with values in [-2^(b-1), 2^(b-1) - 1] -> int32 [rows, ceil(n*b/32)]."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if values.numel() and not lo <= int(values.min()) <= int(values.max()) <= hi:
        raise ValueError(f"{bits}-bit packing needs values in [{lo}, {hi}]")  # else they would spill into neighbours
    per_group, nbytes, dtype = _groups(bits)
    rows, groups = values.shape[0], math.ceil(values.shape[1] / per_group)
    u = _fit(values.to(dtype) - lo, groups * per_group).view(rows, groups, per_group)
    group = (u << torch.arange(0, per_group * bits, bits, dtype=dtype)).sum(-1, dtype=dtype)  # disjoint bits: + is OR
    data = (group.unsqueeze(-1) >> torch.arange(0, 8 * nbytes, 8, dtype=dtype)) & 0xFF
    return _fit(data.view(rows, -1), packed_words(values.shape[1], bits) * 4).to(torch.uint8).view(torch.int32)


def unpack(packed, bits, n):
    """int32 [rows, words] -> int8 [rows, n]: the inverse of pack."""
    per_group, nbytes, dtype = _groups(bits)
    rows, groups = packed.shape[0], math.ceil(n / per_group)
    data = _fit(packed.contiguous().view(torch.uint8), groups * nbytes).view(rows, groups, nbytes).to(dtype)
    group = (data << torch.arange(0, 8 * nbytes, 8, dtype=dtype)).sum(-1, keepdim=True, dtype=dtype)
    u = (group >> torch.arange(0, per_group * bits, bits, dtype=dtype)) & ((1 << bits) - 1)
    return (u.view(rows, -1)[:, :n] - (1 << (bits - 1))).to(torch.int8)
