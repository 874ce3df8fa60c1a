"""The Triton fake-quant kernels equal the PyTorch reference bit for bit.

They run here on CPU tensors through the Triton interpreter; benchmarks/gpu_check.py runs the same comparison
compiled on a GPU. TRITON_INTERPRET=1 only works if set before triton is first imported (triton decorates its
own tl.max, tl.sum, ... then): when another test module imported it first (transformers does), these tests
skip here and test_kernels_in_a_fresh_process reruns this file in a new process.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

FRESH = "triton" not in sys.modules
if FRESH:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed (see requirements.txt)")
import triton.language as tl  # noqa: E402

from models import kernels, utils_quant  # noqa: E402
from models.utils_quant import CLIP_VAL, QuantizeLinear, SymQuantizer, sym_quant  # noqa: E402

from conftest import REPO_PATH as REPO  # noqa: E402
interpreted = pytest.mark.skipif(not FRESH, reason="triton was imported first: see test_kernels_in_a_fresh_process")


@pytest.mark.skipif(FRESH or "LLMQAT_KERNEL_CHILD" in os.environ,
                    reason="this process interprets the kernels itself (or is the fresh process: never recurse)")
def test_kernels_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "LLMQAT_KERNEL_CHILD": "1"})
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-4000:] + out.stderr[-2000:]


def unpack(mask, n):
    """[rows, ceil(n/8)] uint8 -> [rows, n] bool, bit j of byte i = element 8i + j."""
    bits = (mask.long().unsqueeze(-1) >> torch.arange(8)) & 1
    return bits.flatten(-2)[..., :n].bool()


def rows_with_ties(bits, scale):
    """A row whose x*s lands exactly on k + 0.5 for many k: where half-to-even rounding matters."""
    qmax = 2 ** (bits - 1) - 1
    s = (1 / (torch.tensor([scale]) + 1e-6)) * qmax  # as torch evaluates qmax / (max|x| + 1e-6)
    k = torch.arange(-qmax, qmax, dtype=torch.float32)
    ties = (k + 0.5) / s
    assert ((ties * s) == k + 0.5).sum() > qmax // 2  # most survive fp32 rounding
    return torch.cat([torch.tensor([scale]), ties]).unsqueeze(0)


@triton.jit
def _rint_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, kernels._rint(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)


@interpreted
def test_rint_is_torch_round_half_to_even():
    halves = torch.arange(-40.0, 40.0) + 0.5
    near = torch.cat([torch.nextafter(halves, halves + 1), torch.nextafter(halves, halves - 1)])
    x = torch.cat([halves, near, torch.tensor([0.0, -0.0, 0.49999997, -0.49999997]),
                   torch.empty(2000).uniform_(-32767, 32767)])
    y = torch.empty_like(x)
    _rint_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    assert torch.equal(y, torch.round(x))


SHAPES = [(1, 1), (3, 5), (2, 3, 257), (4, 1000), (3, 4096), (2, 11008)]


@interpreted
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_reference(shape, dtype):
    torch.manual_seed(sum(shape))
    x = torch.randn(shape) * torch.logspace(-3, 1, shape[-2] if len(shape) > 1 else 1).unsqueeze(-1)
    x = x.to(dtype)
    x.view(-1)[: min(x.numel(), 3)] = torch.tensor([2.0, -2.0, 1.9921875])[: min(x.numel(), 3)].to(dtype)
    for bits in (4, 8, 16):
        for out_dtype in (None, torch.bfloat16):
            q, mask = kernels.sym_quant(x, bits, CLIP_VAL, out_dtype)
            q_ref, mask_ref = sym_quant(x, bits, CLIP_VAL, False, out_dtype)  # CPU tensor: the reference
            assert q.dtype == q_ref.dtype and torch.equal(q, q_ref), (bits, out_dtype)
            assert mask.shape == (x.numel() // shape[-1], (shape[-1] + 7) // 8)
            mask_ref = torch.ones_like(x, dtype=torch.bool) if mask_ref is None else mask_ref  # nothing clipped
            assert torch.equal(unpack(mask, shape[-1]), mask_ref.reshape(-1, shape[-1]))


@interpreted
@pytest.mark.parametrize("bits,scale", [(4, 1.0), (4, 0.37), (8, 1.0), (8, 3.1)])
def test_forward_equals_reference_on_exact_ties(bits, scale):
    x = rows_with_ties(bits, scale)
    assert torch.equal(kernels.sym_quant(x, bits, CLIP_VAL)[0], sym_quant(x, bits)[0])


@interpreted
def test_zero_row_and_asymmetric_clip():
    x = torch.cat([torch.zeros(1, 40), torch.linspace(-3, 3, 40).unsqueeze(0)])
    for clip in (CLIP_VAL, (-1.0, 2.5)):
        q, mask = kernels.sym_quant(x, 8, clip)
        q_ref, mask_ref = sym_quant(x, 8, clip)
        assert torch.equal(q, q_ref) and torch.equal(unpack(mask, 40), mask_ref)


@interpreted
@pytest.mark.parametrize("grad_dtype,input_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.bfloat16, torch.float32)])
def test_backward_equals_reference(grad_dtype, input_dtype):
    torch.manual_seed(0)
    x = (torch.randn(5, 1000) * 1.5).to(input_dtype)
    g = torch.randn(5, 1000).to(grad_dtype)
    _, mask = kernels.sym_quant(x, 4, CLIP_VAL)
    grad = kernels.ste_grad(g, mask, input_dtype)
    assert grad.dtype == input_dtype
    assert torch.equal(grad, (g * ((x > -2) & (x < 2))).to(input_dtype))


@interpreted
def test_sym_quantizer_through_the_triton_path(monkeypatch):
    """SymQuantizer end to end with the kernels (as on CUDA): same values and gradients, 1 bit/element kept."""
    monkeypatch.setattr(utils_quant, "_kernels_for", lambda x, layerwise=False: kernels)
    torch.manual_seed(0)
    x = (torch.randn(2, 6, 300) * 1.2).requires_grad_()
    g = torch.randn(2, 6, 300)
    y = SymQuantizer.apply(x * 1.0, CLIP_VAL, 8, False, torch.bfloat16)
    (mask,) = y.grad_fn.saved_tensors
    assert mask.dtype == torch.uint8 and mask.numel() == 12 * 38  # ceil(300 / 8) bytes per row
    y.backward(g.bfloat16())
    grad = x.grad.clone()
    monkeypatch.undo()
    x.grad = None
    y_ref = SymQuantizer.apply(x * 1.0, CLIP_VAL, 8, False, torch.bfloat16)
    y_ref.backward(g.bfloat16())
    assert torch.equal(y, y_ref) and torch.equal(grad, x.grad)


@interpreted
@pytest.mark.parametrize("bits", [4, 8])
def test_group_wise_weights_through_the_triton_path(monkeypatch, bits):
    """w_group_size: the kernel runs on the [out * in / G, G] rows of the groups, bit-exact with the reference."""
    from models.utils_quant import quantize_weight
    torch.manual_seed(0)
    w = (torch.randn(48, 256) * 0.05).requires_grad_()
    ref = quantize_weight(w, bits, group_size=32)
    monkeypatch.setattr(utils_quant, "_kernels_for", lambda x, layerwise=False: kernels)
    q = quantize_weight(w, bits, group_size=32)
    assert torch.equal(q, ref) and not torch.equal(q, quantize_weight(w.detach(), bits))
    (mask,) = q.grad_fn.next_functions[0][0].saved_tensors  # the kernel's bit-packed mask, one row per group
    assert mask.dtype == torch.uint8 and mask.shape == (48 * 8, 4)
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_reference_keeps_no_mask_when_nothing_is_clipped():
    """On CPU a tensor inside (-2, 2), as weights are in practice, keeps nothing: its gradient passes unchanged."""
    w = (torch.rand(32, 64) - 0.5).requires_grad_()
    q = SymQuantizer.apply(w, CLIP_VAL, 4, False)
    assert q.grad_fn.saved_tensors == (None,)
    g = torch.randn_like(q)
    q.backward(g)
    assert torch.equal(w.grad, g)
    w.data[0, 0] = 2.0  # one clipped element: the bool mask is back
    q = SymQuantizer.apply(w, CLIP_VAL, 4, False)
    assert q.grad_fn.saved_tensors[0].dtype == torch.bool


def test_quantize_linear_under_autocast_quantizes_straight_into_bf16():
    """out_dtype = the autocast dtype gives the same values and gradients as quantize-then-cast."""
    torch.manual_seed(0)
    layer = QuantizeLinear(64, 32, w_bits=4, a_bits=8, out_bits=4)
    x = torch.randn(3, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_ref = SymQuantizer.apply(F.linear(SymQuantizer.apply(x, CLIP_VAL, 8, False),
                                            SymQuantizer.apply(layer.weight, CLIP_VAL, 4, False)), CLIP_VAL, 4, False)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    grads = torch.autograd.grad(y.float().sum(), (x, layer.weight))
    grads_ref = torch.autograd.grad(y_ref.float().sum(), (x, layer.weight))
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))


COMPILE = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from models import kernels
div16 = [["tt.divisibility", 16]]  # what the launcher specializes for 16-aligned pointers and widths
sig = {"x_ptr": "*fp32", "q_ptr": "*bf16", "mask_ptr": "*u8", "n_cols": "i32", "n_bytes": "i32",
       "qmax": "fp32", "lo": "fp32", "hi": "fp32", "BLOCK": "constexpr"}
block, options = kernels._config(4096)
src = ASTSource(kernels._sym_quant_fwd, sig, {"BLOCK": block}, {(i,): div16 for i in range(5)})
print(triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"])
"""


def test_compiles_for_h100_with_ieee_division_and_no_fma():
    """What the interpreter cannot show: the sm_90 code divides exactly, fuses no multiply-add, loads 16 bytes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", COMPILE], env=env, cwd=REPO, capture_output=True, text=True)
    if out.returncode and "ptxas" in out.stderr and "not found" in out.stderr:
        pytest.skip("no ptxas in this triton install")
    assert out.returncode == 0, out.stderr[-2000:]
    ptx = out.stdout
    assert "div.rn.f32" in ptx and "div.full" not in ptx and "div.approx" not in ptx
    assert "fma" not in ptx and "mul.rn.f32" in ptx and "ld.global.v4" in ptx
