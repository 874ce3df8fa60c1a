"""Quantizer numerics against hand-computed values (reference section 2)."""
import pytest
import torch
import torch.nn.functional as F

from models.utils_quant import AsymQuantizer, QuantizeLinear, SymQuantizer, quantize_act, quantize_weight

CLIP = (-2.0, 2.0)


def sym(x, bits, layerwise=False):
    return SymQuantizer.apply(x, CLIP, bits, layerwise)


def test_sym_8bit_hand_values():
    x = torch.tensor([[1.0, 0.5, -0.25, 0.0]])
    s = 127 / (1.0 + 1e-6)  # max|x| = 1
    expected = torch.tensor([[127.0, 63.0, -32.0, 0.0]]) / (s + 1e-6)  # 63.49994 -> 63, -31.74997 -> -32
    torch.testing.assert_close(sym(x, 8), expected, rtol=0, atol=2e-7)  # one fp32 ulp at 1.0


def test_sym_4bit_hand_values():
    x = torch.tensor([[0.5, -1.0, 0.25, 0.1]])
    s = 7 / (1.0 + 1e-6)  # 3.49999 -> 3, -7, 1.75 -> 2, 0.7 -> 1
    expected = torch.tensor([[3.0, -7.0, 2.0, 1.0]]) / (s + 1e-6)
    torch.testing.assert_close(sym(x, 4), expected, rtol=0, atol=2e-7)  # one fp32 ulp at 1.0


def test_sym_16bit_is_fine_grained_not_identity():
    x = torch.tensor([[1.0, 0.123456789, -0.5]])
    q = sym(x, 16)
    s = 32767 / (1.0 + 1e-6)
    expected = torch.round(x.double() * s) / (s + 1e-6)
    torch.testing.assert_close(q.double(), expected, rtol=0, atol=2e-7)  # one fp32 ulp at 1.0
    assert not torch.equal(q, x)
    assert (q - x).abs().max() < 1 / 32767


def test_sym_is_per_row_and_layerwise_is_per_tensor():
    x = torch.tensor([[1.0, 0.3], [10.0, 0.3]])
    per_row = sym(x, 3)  # s = 3/1 and 3/10: 0.3 -> 0.9 -> 1 -> 1/3 ; 0.3 -> 0.09 -> 0
    torch.testing.assert_close(per_row[:, 1], torch.tensor([1 / 3, 0.0]), rtol=0, atol=1e-5)
    whole = sym(x, 3, layerwise=True)  # one scale from 10: both 0.3 -> 0
    torch.testing.assert_close(whole[:, 1], torch.tensor([0.0, 0.0]))


def test_activation_quantization_is_per_token():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8) * torch.tensor([0.1, 1.0, 5.0, 0.01, 3.0]).view(1, 5, 1)
    q = quantize_act(x, 8)
    for t in range(5):  # each token quantized alone gives the same result
        torch.testing.assert_close(q[:, t], sym(x[:, t], 8))
    s = 127 / (x.abs().amax(-1, keepdim=True) + 1e-6)
    assert torch.allclose(q * (s + 1e-6), torch.round(q * (s + 1e-6)), atol=1e-3)  # on each token's grid


@pytest.mark.parametrize("bits", [1, 2, 32])
def test_activation_quantization_off_at_2_bits_or_less_and_32(bits):
    x = torch.randn(3, 4)
    assert quantize_act(x, bits) is x


def test_weight_2bit_hand_values():
    w = torch.tensor([[0.1, -0.2, 0.5, -1.0]])  # a = 2 * mean|w| = 0.9; levels +-0.5, +-1.5 times a/2
    expected = torch.tensor([[0.225, -0.225, 0.675, -0.675]])
    torch.testing.assert_close(quantize_weight(w, 2), expected, rtol=0, atol=1e-6)


def test_weight_1bit_hand_values():
    w = torch.tensor([[1.0, -3.0, 2.0, -2.0], [0.5, 0.5, -0.5, 0.5]])
    expected = torch.tensor([[2.0, -2.0, 2.0, -2.0], [0.5, 0.5, -0.5, 0.5]])
    torch.testing.assert_close(quantize_weight(w, 1), expected)


def test_weight_per_output_channel():
    w = torch.tensor([[1.0, 0.26], [0.01, 0.0026]])  # rows with scales 100x apart keep the same grid
    q = quantize_weight(w, 4)
    torch.testing.assert_close(q[1] * 100, q[0], rtol=1e-4, atol=1e-7)


def test_weight_32_bits_is_untouched():
    w = torch.randn(3, 4)
    assert quantize_weight(w, 32) is w


def test_sym_gradient_zeroed_outside_clip():
    x = torch.tensor([[-3.0, -2.0, -1.5, 0.0, 1.9, 2.0, 2.5]], requires_grad=True)
    sym(x, 8).backward(torch.full_like(x, 3.0))
    assert x.grad.tolist() == [[0.0, 0.0, 3.0, 3.0, 3.0, 0.0, 0.0]]


def test_asym_gradient_zeroed_outside_clip():
    x = torch.tensor([[-2.5, 0.0, 1.0, 2.0]], requires_grad=True)
    AsymQuantizer.apply(x, CLIP, 4, False).sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 0.0]]


@pytest.mark.parametrize("bits", [1, 2])
def test_low_bit_weight_gradient_is_plain_straight_through(bits):
    w = torch.tensor([[3.0, -0.5, 0.25, -2.5]], requires_grad=True)
    quantize_weight(w, bits).backward(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    assert w.grad.tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_asym_hand_values():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.4, 0.6, 1.0]])
    q = AsymQuantizer.apply(x, CLIP, 1, False)  # 1 level: (x - min)/(max - min) rounds to 0 or 1
    torch.testing.assert_close(q, torch.tensor([[0.0, 0.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0]]), rtol=0, atol=1e-6)
    q2 = AsymQuantizer.apply(x[:1], CLIP, 2, False)  # 3 levels over [0, 3]: exact
    torch.testing.assert_close(q2, x[:1], rtol=0, atol=1e-6)


def test_bf16_input_keeps_dtype():
    x = torch.randn(4, 16).bfloat16()
    q = sym(x, 8)
    assert q.dtype == torch.bfloat16
    torch.testing.assert_close(q, sym(x.float(), 8).bfloat16())


def test_backward_saves_a_compact_mask_not_the_input():
    x = torch.randn(64, 64, requires_grad=True)
    y = sym(x * 1.0, 8)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].dtype == torch.bool


def test_quantize_linear_forward_matches_formula():
    torch.manual_seed(0)
    layer = QuantizeLinear(16, 8, bias=True, w_bits=4, a_bits=8)
    x = torch.randn(2, 3, 16)
    expected = F.linear(quantize_act(x, 8), quantize_weight(layer.weight, 4), layer.bias)
    torch.testing.assert_close(layer(x), expected)
    assert repr(layer) == "QuantizeLinear(in_features=16, out_features=8, bias=True)"


def test_quantize_linear_32_bits_equals_linear():
    torch.manual_seed(0)
    layer = QuantizeLinear(16, 8)
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_quantize_linear_out_bits_quantizes_the_output_per_token():
    torch.manual_seed(0)
    layer = QuantizeLinear(16, 8, out_bits=4)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(layer(x), sym(F.linear(x, layer.weight), 4))


def test_quantize_linear_gradients_reach_weight_and_input():
    torch.manual_seed(0)
    layer = QuantizeLinear(8, 4, w_bits=4, a_bits=8)
    x = (torch.randn(3, 8) * 0.5).requires_grad_()
    layer(x).sum().backward()
    # straight-through: the same gradients as the plain linear evaluated at the quantized operands
    qx = quantize_act(x.detach(), 8)
    torch.testing.assert_close(layer.weight.grad, torch.ones(3, 4).T @ qx)
    mask = (x.detach().abs() < 2).float()
    torch.testing.assert_close(x.grad, (torch.ones(3, 4) @ quantize_weight(layer.weight.detach(), 4)) * mask)
