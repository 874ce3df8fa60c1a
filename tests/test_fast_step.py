"""The fast training step (issue 22) against the reference numerics it replaces: an input quantized once for
the linears that share it, the KD loss in fewer passes, the fused AdamW. Values and gradients bit for bit
where the arithmetic is the same; losses and weights within bf16 rounding over a few steps where only the
order of summation changed. (Speed: benchmarks/roofline.py, never a timed test.)"""
import copy

import pytest
import torch

from conftest import make_bpe_llama, make_bpe_tokenizer
from models import utils_quant
from models.quant_model import QuantSetting, load_model
from models.utils_quant import QuantizeLinear
from utils.constants import EMBEDDED_MODEL
from utils.kd_trainer import kd_loss


def embedded():
    return load_model(EMBEDDED_MODEL)


def smollm2_shaped():
    return make_bpe_llama(make_bpe_tokenizer())


MODELS = {"embedded": embedded, "smollm2_shaped": smollm2_shaped}


def unshared(model):
    """The same quantized model with every linear quantizing its own input (the reference path)."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, QuantizeLinear):
            m.shared_input = None
    return ref


def ids_for(model, seed=0):
    return torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("bf16", [False, True])
def test_shared_input_quantizes_each_input_once_with_the_same_values(name, bf16, monkeypatch):
    model = QuantSetting(4, 8, 4).apply(MODELS[name]().train())
    ref = unshared(model)
    calls = []
    real = utils_quant.sym_quant
    monkeypatch.setattr(utils_quant, "sym_quant", lambda x, *a, **k: calls.append(tuple(x.shape)) or real(x, *a, **k))
    ids = ids_for(model)
    outs = []
    for m in (ref, model):
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = m(input_ids=ids).logits
        logits.float().square().mean().backward()
        outs.append((logits.detach(), len(calls)))
    layers = model.config.num_hidden_layers
    # per layer: 7 weights + 2 KV outputs + inputs of q/k/v, o, gate/up, down: 4 instead of 7
    assert outs[0][1] == layers * (7 + 2 + 7) and outs[1][1] == layers * (7 + 2 + 4)
    assert torch.equal(outs[0][0], outs[1][0])  # the forward is bit for bit the reference
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.equal(p.grad, q.grad), n  # each sibling keeps its own straight-through node: same sums


def test_shared_input_is_not_reused_for_another_or_a_modified_tensor():
    shared, made = utils_quant.SharedInput(), []
    x = torch.randn(3, 8)

    def quantize():
        made.append(1)
        return x * 2, None

    key = (8, (-2.0, 2.0), False, None)
    first, again = shared(x, key, quantize)[0], shared(x, key, quantize)[0]
    assert len(made) == 1 and torch.equal(first, again) and first is not again  # a new alias per linear
    assert again.data_ptr() == first.data_ptr()  # of the same values: no copy
    shared(x.clone(), key, quantize)  # equal values, another tensor
    x.add_(1)  # modified in place: its version changed
    shared(x, key, quantize)
    shared(x, (4, (-2.0, 2.0), False, None), quantize)  # other bits
    with torch.inference_mode():
        y = torch.randn(3, 8)
        shared(y, key, quantize), shared(y, key, quantize)  # inference tensors: no version counter, no reuse
    assert len(made) == 6
    assert isinstance(copy.deepcopy(shared), utils_quant.SharedInput) and copy.deepcopy(shared).x is None


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_kd_loss_and_gradient_equal_the_plain_formula(scale):
    torch.manual_seed(0)
    student = (torch.randn(2, 40, 700) * 3).requires_grad_()
    teacher = torch.randn(2, 40, 700) * 3
    grads = []
    for chunked in (True, False):
        loss = scale * kd_loss(student, teacher, chunked=chunked)
        loss.backward()
        grads.append((loss.detach(), student.grad))
        student.grad = None
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", MODELS)
def test_fast_step_follows_the_reference_step_within_bf16_rounding(name):
    """Four bf16-autocast QAT+KD steps on one batch: fused AdamW + shared inputs against torch's per-tensor AdamW
    + per-linear quantization, from the same weights (the KD loss against its plain formula: the test above).
    Measured: the same losses to 5 digits, weights within 1.5e-8."""
    teacher = MODELS[name]().eval().requires_grad_(False)
    student = QuantSetting(4, 8, 4).apply(copy.deepcopy(teacher).train().requires_grad_(True))
    runs = {}
    for variant in ("fast", "reference"):
        model = copy.deepcopy(student) if variant == "fast" else unshared(student)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.0, fused=variant == "fast")
        losses, ids = [], ids_for(model)
        for _ in range(4):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                t = teacher(input_ids=ids).logits
            with torch.autocast("cpu", dtype=torch.bfloat16):
                s = model(input_ids=ids).logits
            loss = kd_loss(s, t)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs[variant] = (losses, model)
    (fast, m_fast), (ref, m_ref) = runs["fast"], runs["reference"]
    assert fast[-1] < fast[0]  # it learns
    assert fast == pytest.approx(ref, rel=1e-4)
    for p, q in zip(m_fast.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_training_uses_the_fused_adamw_unless_asked():
    from utils.process_args import process_args
    assert process_args(["--output_dir", "x"])[2].optim == "adamw_torch_fused"
    assert process_args(["--output_dir", "x", "--optim", "adamw_torch"])[2].optim == "adamw_torch"


@pytest.mark.parametrize("reentrant", [False, True])
def test_shared_input_under_gradient_checkpointing(reentrant):
    """run_train.sh's GPU recipe recomputes each layer in the backward: the shared quantization must give the
    same gradients as without checkpointing and without sharing."""
    model = QuantSetting(4, 8, 4).apply(embedded().train())
    ref = unshared(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = ids_for(model)
    for m in (ref, model):
        m(input_ids=ids).logits.square().mean().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9, msg=n)
