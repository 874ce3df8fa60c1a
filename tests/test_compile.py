"""--compile_layers (issue 22): torch.compile of every decoder layer, of the teacher and of the KD loss. The
quantizers' compiled formula gives the same values and straight-through gradients as the reference on known
inputs; the KD loss the same to fp rounding; a compiled training run learns like the eager one and saves the same
files; the flag's spellings and its one refusal. (Speed: benchmarks/roofline.py --compile_layers.)"""
import copy
import os

import pytest
import torch

from models import utils_quant
from models.quant_model import QuantSetting, load_model
from utils.constants import EMBEDDED_MODEL
from utils.errors import InputError
from utils.kd_trainer import compile_layers, kd_loss
from utils.process_args import process_args

pytestmark = pytest.mark.slow


def quantize(x, bits, dtype):
    return utils_quant.SymQuantizer.apply(x, utils_quant.CLIP_VAL, bits, False, dtype)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_compiled_quantizer_equals_the_reference_values_and_gradient(bits, dtype):
    torch.manual_seed(0)
    x = torch.randn(24, 40) * 1.5  # some entries outside (-2, 2): the straight-through mask matters
    x[3, 5], x[7] = 0.0, 0.25  # a zero, and a row whose entries all equal its max
    grad = torch.randn(24, 40)
    outs = []
    for fn in (quantize, torch.compile(quantize, fullgraph=True)):
        xi = x.clone().requires_grad_()
        q = fn(xi, bits, dtype)
        q.backward(grad.to(q.dtype))
        outs.append((q.detach(), xi.grad))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])
    assert (outs[1][1][x.abs() >= 2] == 0).all() and (outs[1][1][x.abs() < 2] != 0).any()
    # known values: 4 bits, the row [1, -0.5, 0.25]: s = 7 / (1 + 1e-6) just under 7, codes 7, -3 (-3.49999), 2
    if bits == 4 and dtype is None:
        q = torch.compile(quantize)(torch.tensor([[1.0, -0.5, 0.25]]), 4, None)
        assert torch.equal(torch.round(q * 7), torch.tensor([[7.0, -3.0, 2.0]]))
        assert torch.equal(q, quantize(torch.tensor([[1.0, -0.5, 0.25]]), 4, None))


def test_compiled_kd_loss_equals_the_chunked_loss():
    torch.manual_seed(0)
    student = (torch.randn(2, 40, 700) * 3).requires_grad_()
    teacher = torch.randn(2, 40, 700) * 3
    got = []
    for compiled in (False, True):
        loss = kd_loss(student, teacher, compiled=compiled)
        loss.backward()
        got.append((loss.detach(), student.grad))
        student.grad = None
    torch.testing.assert_close(got[1][0], got[0][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[1][1], got[0][1], rtol=1e-5, atol=1e-7)


def test_compiled_layers_train_like_eager_ones_and_keep_their_keys():
    """Four bf16 QAT+KD steps of the embedded model from the same weights: eager; compiled with eager's bf16
    roundings (TORCHINDUCTOR_EMULATE_PRECISION_CASTS): the same losses but for the compiled teacher's and KD sum's
    rounding at the first step (later ones drift apart as any two roundings of a 4-bit student do: an Adam step of
    2e-5 moves codes across their boundaries); compiled as --compile_layers runs it: it learns. The same parameter
    names (compiled in place)."""
    import torch._inductor.config as inductor_config
    teacher = load_model(EMBEDDED_MODEL, attn_implementation="eager").eval().requires_grad_(False)
    student = QuantSetting(4, 8, 4).apply(copy.deepcopy(teacher).train().requires_grad_(True))
    ids = torch.randint(0, teacher.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    runs = {}
    for variant in ("eager", "emulated", "compiled"):
        model, t = copy.deepcopy(student), copy.deepcopy(teacher)
        torch._dynamo.reset()  # each variant compiles anew (the compiled graphs would serve every copy)
        if variant != "eager":
            compile_layers([model, t])
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
        losses = []
        with inductor_config.patch(emulate_precision_casts=variant == "emulated"):
            for _ in range(4):
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    tl = t(input_ids=ids, use_cache=False).logits
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    sl = model(input_ids=ids, use_cache=False).logits
                loss = kd_loss(sl, tl, compiled=variant != "eager")
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
        runs[variant] = (losses, list(model.state_dict()))
    assert runs["compiled"][1] == runs["eager"][1]
    assert runs["eager"][0][-1] < runs["eager"][0][0] and runs["compiled"][0][-1] < runs["compiled"][0][0]
    assert runs["emulated"][0][0] == pytest.approx(runs["eager"][0][0], rel=5e-3)
    assert runs["compiled"][0][0] != pytest.approx(runs["eager"][0][0], rel=5e-3)  # rounded once: other inputs


def test_compile_flags(tmp_path):
    assert process_args(["--output_dir", str(tmp_path)])[2].compile_layers is False
    args = process_args(["--output_dir", str(tmp_path), "--torch_compile", "True"])[2]
    assert args.compile_layers and not args.torch_compile  # regional, not accelerate's whole-model compile
    args = process_args(["--output_dir", str(tmp_path), "--torch_compile_mode", "max-autotune"])[2]
    assert args.compile_layers and not args.torch_compile and args.torch_compile_mode == "max-autotune"
    assert process_args(["--output_dir", str(tmp_path), "--compile_layers", "True", "--fsdp", "full_shard"])[2].fsdp
    with pytest.raises(InputError, match="--compile_layers.*--fsdp needs FSDP2"):
        process_args(["--output_dir", str(tmp_path), "--compile_layers", "True", "--fsdp", "full_shard",
                      "--fsdp_config", '{"version": 1}'])


def test_compiled_student_rounds_as_eager_when_asked():
    """TORCHINDUCTOR_EMULATE_PRECISION_CASTS=1 (inductor's own knob, documented in docs/speed.md): the compiled
    student's bf16 logits equal eager's bit for bit (without it, a fused kernel rounds to bf16 once)."""
    import torch._inductor.config as inductor_config
    student = QuantSetting(4, 8, 4).apply(load_model(EMBEDDED_MODEL, attn_implementation="eager"))
    ids = torch.randint(0, student.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    compiled = copy.deepcopy(student)
    torch._dynamo.reset()
    compile_layers([compiled])
    logits = []
    with inductor_config.patch(emulate_precision_casts=True):
        for m in (student, compiled):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                logits.append(m(input_ids=ids, use_cache=False).logits)
    assert torch.equal(logits[0], logits[1])


def test_train_with_compile_layers_saves_the_same_student_files(tmp_path):
    """train.py --compile_layers --bf16 end to end (the Trainer's own loop, checkpoint and save): the loss falls on a
    repeated batch, the student has the same files and tensor names as an eager run's, and loads."""
    import json

    from safetensors.torch import load_file
    from utils.train_qat import run

    students = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        out = tmp_path / str(compiled)
        run(*process_args(["--local_dir", str(out), "--w_bits", "4", "--a_bits", "8", "--kv_bits", "4",
                           "--model_max_length", "64", "--max_train_samples", "4", "--per_device_train_batch_size",
                           "4", "--max_steps", "8", "--learning_rate", "1e-4", "--use_cpu", "True", "--bf16", "True",
                           "--report_to", "none", "--save_steps", "4", "--do_eval", "False",
                           "--compile_layers", str(compiled)]))
        model_dir = out / "models" / "W4A8KV4"
        (state,) = (out / "checkpoints" / "W4A8KV4").glob("checkpoint-*/trainer_state.json")
        loss = [h["loss"] for h in json.load(open(state))["log_history"] if "loss" in h]
        assert max(loss[-2:]) < 0.8 * loss[0], loss
        students[compiled] = (sorted(p.name for p in model_dir.iterdir()), sorted(load_file(model_dir /
                                                                                            "model.safetensors")))
        assert load_model(str(model_dir)).config.w_bits == 4
    assert students[True] == students[False]


@pytest.mark.slow
def test_compile_layers_under_fsdp2_shards_and_trains(tmp_path):
    """run_train.sh with 2 processes (FSDP2, gloo) and --compile_layers: each rank holds half of the student and of
    the teacher, the loss falls, the student is saved and loads. (Measured once: the first loss, before any update,
    is the one compiled process's, 3.451, as the eager runs share theirs, 3.455.)"""
    import re
    import subprocess

    from conftest import REPO

    proc = subprocess.run(["sh", "run_train.sh", "4", "8", "4", "--model_max_length", "64", "--max_train_samples", "4",
                           "--learning_rate", "1e-4", "--shuffle", "False", "--per_device_train_batch_size", "2",
                           "--max_steps", "6", "--do_eval", "False", "--logging_steps", "1", "--compile_layers", "True"],
                          cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "NPROC": "2", "OUTPUT": str(tmp_path)})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    loss = [float(x) for x in re.findall(r"'loss': '([0-9.]+)'", log)]
    assert len(loss) == 6 and loss[-1] < loss[0], loss
    for name in ("student", "teacher"):
        held = re.findall(rf"rank \d/2 holds (\d+) of (\d+) {name} ", log)
        assert len(held) == 2 and all(2 * int(a) <= int(b) + 1024 for a, b in held), held or log[-2000:]
    assert load_model(str(tmp_path / "models" / "W4A8KV4")).config.kv_bits == 4
