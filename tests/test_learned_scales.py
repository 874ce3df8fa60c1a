"""Learned weight ranges (--w_quantizer lsq / seq): lsq starts at absmax's grid bit for bit, the range's gradient
against a hand computation and against autograd of LSQ's own formulation, SEQ's grid and initialization, the
setting's names and checks, save / load / export of the learned grid, and training with it."""
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from models.errors import InputError
from models.export import export
from models.export_gguf import MAX_REL_WEIGHT_ERR, export_gguf
from models.packed import PackedQuantizeLinear
from models.quant_model import QuantSetting, load_exported, load_model
from models.utils_quant import EPS, QuantizeLinear, dequantize, initial_range, learned_quantize_weight
from utils.constants import EMBEDDED_EVAL, EMBEDDED_MODEL, EMBEDDED_TRAIN
from utils.data import load_blocks
from utils.kd_trainer import kd_loss

from conftest import REPO_PATH, run_cli

SMALL = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def pair(bits, group=None, quantizer="lsq", seed=0):
    """An absmax QuantizeLinear and a learned one with the same weight."""
    torch.manual_seed(seed)
    absmax = QuantizeLinear(64, 24, w_bits=bits, a_bits=8, w_group_size=group)
    learned = QuantizeLinear(64, 24, w_bits=bits, a_bits=8, w_group_size=group, w_quantizer=quantizer)
    learned.weight.data.copy_(absmax.weight)
    learned.init_weight_range()
    return absmax, learned


@pytest.mark.parametrize("group", [None, 16])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_lsq_first_forward_is_absmax_bit_for_bit(bits, group):
    absmax, lsq = pair(bits, group)
    assert lsq.weight_range.shape == (24, 64 // (group or 64))
    x = torch.randn(2, 5, 64)
    assert torch.equal(lsq.quantized_weight(), absmax.quantized_weight())
    assert torch.equal(lsq.quantized_weight(torch.bfloat16), absmax.quantized_weight(torch.bfloat16))
    assert torch.equal(lsq(x), absmax(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(lsq(x), absmax(x))


def test_lsq_at_2_bits_starts_at_the_papers_2_bit_grid():
    absmax, lsq = pair(2)
    assert torch.equal(lsq.weight_range, 2 * lsq.weight.abs().mean(-1, keepdim=True))  # a = 2 mean|w|
    # absmax's 2-bit forward is the straight-through w + (q - w): q up to fp32 rounding
    torch.testing.assert_close(lsq.quantized_weight(), absmax.quantized_weight(), rtol=0, atol=1e-8)


def test_range_gradient_by_hand_3_bits():
    # r = 0.5, L = 3: s = 6, w s = 1.8, -0.6, 0.3, 4.2 -> codes 2, -1, 0, 3 (the last clamped: outside the range)
    lin = QuantizeLinear(4, 1, w_bits=3, w_quantizer="lsq")
    lin.weight.data = torch.tensor([[0.3, -0.1, 0.05, 0.7]])
    lin.weight_range.data = torch.tensor([[0.5]])
    q = lin.quantized_weight()
    torch.testing.assert_close(q, torch.tensor([[2, -1, 0, 3]]) / (6 + EPS), rtol=0, atol=0)
    q.backward(torch.tensor([[1.0, 2.0, -1.0, 0.5]]))
    # dq/dr = (q - w [inside]) / r: (1/3 - 0.3, -1/6 + 0.1, 0 - 0.05, 1/2 - 0) / 0.5 = (1/15, -2/15, -1/10, 1)
    # sum with the gradient (1, 2, -1, 0.5): 1/15 - 4/15 + 1/10 + 1/2 = 0.4; g = 1 / sqrt(4 * 3)
    torch.testing.assert_close(lin.weight_range.grad, torch.tensor([[0.4 / math.sqrt(12)]]), rtol=1e-5, atol=0)
    assert lin.weight.grad.tolist() == [[1.0, 2.0, -1.0, 0.0]]  # straight through inside the range only


def test_range_gradient_by_hand_2_bits():
    # a = 0.5: w / a = 0.6, -0.2, 0.1, -1.4 (clamped to -0.99) -> codes 1, -1, 0, -2 -> levels 3/4, -1/4, 1/4, -3/4 of a
    lin = QuantizeLinear(4, 1, w_bits=2, w_quantizer="seq")
    lin.weight.data = torch.tensor([[0.3, -0.1, 0.05, -0.7]])
    lin.weight_range.data = torch.tensor([[0.5]])
    q = lin.quantized_weight()
    assert q.tolist() == [[0.375, -0.125, 0.125, -0.375]]
    q.backward(torch.tensor([[1.0, 2.0, -1.0, 0.5]]))
    # dq/da = (q - w [inside]) / a = (0.15, -0.05, 0.15, -0.75); summed with the gradient: -0.475; g = 1 / sqrt(4 * 1)
    torch.testing.assert_close(lin.weight_range.grad, torch.tensor([[-0.475 * 0.5]]), rtol=1e-6, atol=0)
    assert lin.weight.grad.tolist() == [[1.0, 2.0, -1.0, 0.0]]


def round_ste(x):
    return x + (torch.round(x) - x).detach()


def grad_scale(x, g):
    """LSQ's gradient scaling: the value of x, the gradient times g."""
    return (x - x * g).detach() + x * g


def lsq_reference(w, r, bits):
    """LSQ written in its own variables, differentiated by autograd: step Delta, w_q = round(clamp(w / Delta)) Delta.
    >= 3 bits Delta = 1 / (s + 1e-6), s = L / r, codes -L..L; 2 bits: Delta = a / 2, the zero-free levels."""
    levels = 2 ** (bits - 1) - 1
    r = grad_scale(r, 1 / math.sqrt(w.shape[-1] * (levels if bits >= 3 else 1)))
    if bits >= 3:
        delta = 1 / (levels / r + EPS)
        return round_ste(torch.clamp(w / delta, -levels, levels)) * delta
    if bits == 0:  # ternary: Delta = a / 1.5, levels -1, 0, 1 (times Delta)
        return round_ste(torch.clamp(w / r, -0.99, 0.99) * 1.5) * (r / 1.5)
    delta = r / 2
    x = torch.clamp(w / r, -0.99, 0.99)
    return (round_ste(x * 2 - 0.5) + 0.5) * delta


@pytest.mark.parametrize("bits,group", [(3, None), (4, None), (4, 16), (8, None), (2, None), (2, 16), (0, None),
                                        (0, 16)])
def test_range_gradient_is_lsq_by_autograd(bits, group):
    _, lin = pair(bits, group, quantizer="seq" if bits == 0 else "lsq", seed=bits)
    with torch.no_grad():
        lin.weight_range.mul_(0.7)  # some weights now outside the range: the clipped branch is exercised too
    upstream = torch.randn(24, 64)
    (lin.quantized_weight() * upstream).sum().backward()
    w = lin.weight.detach().clone().requires_grad_()
    r = lin.weight_range.detach().clone().requires_grad_()
    rows, r_rows = (w.reshape(-1, group), r.reshape(-1, 1)) if group else (w, r)
    ref = lsq_reference(rows, r_rows, bits).reshape(24, 64)
    torch.testing.assert_close(ref, lin.quantized_weight(), rtol=1e-5, atol=1e-7)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(lin.weight_range.grad, r.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(lin.weight.grad, w.grad, rtol=1e-6, atol=0)  # w / Delta * Delta: 1 up to rounding
    assert (lin.weight.grad == 0).any() and (lin.weight.grad != 0).any()


def test_ternary_seq_grid_and_gradient_by_hand():
    # a = 0.5: w / a = 0.6, -0.2, 0.1, -1.4 (clamped to -0.99); times 1.5: 0.9, -0.3, 0.15, -1.485 -> codes 1, 0, 0, -1
    lin = QuantizeLinear(4, 1, w_bits=0, w_quantizer="seq")
    lin.weight.data = torch.tensor([[0.3, -0.1, 0.05, -0.7]])
    lin.init_weight_range()
    assert lin.weight_range.tolist() == [[pytest.approx(0.7)]]  # ParetoQ's start: a = max|w|
    lin.weight_range.data = torch.tensor([[0.5]])
    q = lin.quantized_weight()
    third = torch.tensor(0.5) / 1.5  # fp32: levels code * a / 1.5, zero included
    assert torch.equal(q.detach(), torch.stack([third, 0 * third, 0 * third, -third]).view(1, 4))
    grid = lin.weight_grid()
    assert grid.codes.tolist() == [[1, 0, 0, -1]] and grid.zero_point == 0 and torch.equal(dequantize(grid), q.detach())
    q.backward(torch.tensor([[1.0, 2.0, -1.0, 0.5]]))
    # dq/da = (q - w [inside]) / a = (1/3 - 0.3, 0.1, -0.05, -1/3) / 0.5; summed with the gradient: 0.7 / 3;
    # g = 1 / sqrt(4 * 1) (ParetoQ's Q_P at num_bits 0)
    torch.testing.assert_close(lin.weight_range.grad, torch.tensor([[0.7 / 3 * 0.5]]), rtol=1e-6, atol=0)
    assert lin.weight.grad.tolist() == [[1.0, 2.0, -1.0, 0.0]]  # straight through inside the range only
    torch.manual_seed(0)
    big = QuantizeLinear(64, 8, w_bits=0, w_quantizer="seq")
    levels = (big.quantized_weight() / big.weight_range * 1.5).detach()
    assert set(levels.round().flatten().tolist()) == {-1.0, 0.0, 1.0}
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-6)


def test_seq_levels_and_paretoq_initialization():
    lin = QuantizeLinear(4, 2, w_bits=2, w_quantizer="seq")
    lin.weight.data = torch.tensor([[0.8, -0.45, 0.1, -0.05], [0.2, 0.0, -0.1, 0.05]])
    lin.init_weight_range()
    assert lin.weight_range.tolist() == [[0.800000011920929], [0.20000000298023224]]  # alpha = max|w| per row
    # w / alpha = 1, -0.5625, 0.125, -0.0625 -> levels 3/4, -3/4, 1/4, -1/4 of alpha: no zero level
    torch.testing.assert_close(lin.quantized_weight()[0], torch.tensor([0.6, -0.6, 0.2, -0.2]), rtol=0, atol=1e-7)
    assert set((lin.quantized_weight() / lin.weight_range).flatten().tolist()) <= {-0.75, -0.25, 0.25, 0.75}
    lsq = QuantizeLinear(4, 2, w_bits=2, w_quantizer="lsq")
    lsq.weight.data = lin.weight.data.clone()
    lsq.init_weight_range()
    torch.testing.assert_close(lsq.weight_range, torch.tensor([[0.7], [0.175]]))  # a = 2 mean|w| (LLM-QAT)
    assert torch.equal(initial_range(lin.weight, 2, "seq", group_size=2), torch.tensor([[0.8, 0.1], [0.2, 0.1]]))


def test_setting_names_config_and_errors():
    s = QuantSetting(2, 16, 16, w_quantizer="lsq")
    assert (s.name, s.label) == ("W2A16KV16-lsq", "2-16-16-lsq")
    g = QuantSetting(2, 8, 4, w_group_size=32, w_quantizer="seq")
    assert (g.name, g.label) == ("W2A8KV4-g32-seq", "2-8-4-g32-seq")
    t = QuantSetting(0, 8, 4, w_quantizer="seq")
    assert (t.name, t.label) == ("W0A8KV4-seq", "0-8-4-seq")
    for x in (s, g, t, QuantSetting(4, 8, 4)):
        assert QuantSetting.parse(x.name) == QuantSetting.parse(x.label) == x
    assert QuantSetting(4, 8, 4).name == "W4A8KV4"  # absmax: names unchanged
    config = LlamaConfig(**SMALL)
    g.write_config(config)
    assert config.w_quantizer == "seq" and QuantSetting.from_config(config) == g
    del config.w_quantizer  # a config written before the choice existed: absmax
    assert QuantSetting.from_config(config).w_quantizer == "absmax"
    for kwargs, message in ((dict(w_quantizer="lsqq"), "w_quantizer=lsqq is not allowed; use absmax, lsq, seq"),
                            (dict(w_bits=1, w_quantizer="lsq"), "w_quantizer=lsq with w_bits=1: learned scales need "
                                                                "w_bits 2-8"),
                            (dict(w_bits=32, w_quantizer="lsq"), "w_bits=32: learned scales need w_bits 2-8"),
                            (dict(w_bits=3, w_quantizer="seq"), "w_quantizer=seq with w_bits=3: SEQ is ParetoQ's "
                                                                "grid for 2 bits and ternary; use w_bits 2 or 0"),
                            (dict(w_bits=0), r"w_bits=0 \(ternary\) with w_quantizer=absmax: .* add w_quantizer seq"),
                            (dict(w_bits=0, w_quantizer="lsq"), "w_quantizer=lsq with w_bits=0: learned scales need"),
                            (dict(a_bits=0), "a_bits=0 is not allowed")):
        with pytest.raises(InputError, match=message):
            QuantSetting(**{"a_bits": 8, "kv_bits": 8, "w_bits": 4, **kwargs})


def trained_like(setting, seed=0):
    """A tiny LLaMA with the setting applied and its ranges moved off their start (as training would)."""
    torch.manual_seed(seed)
    model = setting.apply(LlamaForCausalLM(LlamaConfig(**SMALL)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight_range"):
                p.mul_(torch.empty_like(p).uniform_(0.6, 1.1))
    return model


def save(model, path):
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(REPO_PATH / "assets" / "tiny_llama").save_pretrained(path)
    return path


@pytest.mark.parametrize("setting", [QuantSetting(3, 8, 4, w_quantizer="lsq"),
                                     QuantSetting(2, 16, 16, w_group_size=32, w_quantizer="seq"),
                                     QuantSetting(0, 8, 4, w_quantizer="seq")], ids=lambda s: s.name)
def test_save_load_gives_identical_logits(tmp_path, setting):
    model = trained_like(setting)
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        reference = model(ids).logits
        save(model, tmp_path / "qat")
        loaded = load_model(tmp_path / "qat")
        assert torch.equal(loaded(ids).logits, reference)
        moved = loaded.model.layers[1].mlp.down_proj
        bits, group = setting.w_bits, setting.w_group_size  # the moved ranges are used, not their start
        start = initial_range(moved.weight, bits, setting.w_quantizer, group)
        assert not torch.equal(moved.quantized_weight(), learned_quantize_weight(moved.weight, start, bits, None, group))


def test_missing_ranges_are_one_clear_error(tmp_path):
    model = trained_like(QuantSetting(4, 8, 4))
    save(model, tmp_path / "qat")
    config = (tmp_path / "qat" / "config.json")
    config.write_text(config.read_text().replace('"w_quantizer": "absmax"', '"w_quantizer": "lsq"'))
    with pytest.raises(InputError, match=r"w_quantizer=lsq but the weights have no learned range "
                                         r"model.layers.0.mlp.down_proj.weight_range \(14 missing\)"):
        load_model(tmp_path / "qat")


@pytest.mark.parametrize("setting", [QuantSetting(4, 8, 4, w_quantizer="lsq"), QuantSetting(3, 8, 8, w_quantizer="lsq"),
                                     QuantSetting(2, 8, 4, w_quantizer="seq"), QuantSetting(0, 8, 4, w_quantizer="seq"),
                                     QuantSetting(4, 8, 4, w_group_size=32, w_quantizer="lsq")], ids=lambda s: s.name)
def test_export_packs_the_learned_grid_exactly(tmp_path, setting):
    qat = save(trained_like(setting), tmp_path / "qat")
    report = export(qat, tmp_path / "out")
    assert report.max_weight_diff == 0 and report.max_logit_diff == 0  # the learned 2-bit grid is exact too
    exported = load_exported(tmp_path / "out")
    packed = exported.model.layers[0].mlp.up_proj
    assert isinstance(packed, PackedQuantizeLinear)
    qat_up = load_model(qat).model.layers[0].mlp.up_proj
    assert torch.equal(packed.dequantized_weight(), qat_up.quantized_weight())
    gguf = export_gguf(qat, tmp_path / "gguf")
    assert gguf.max_rel_weight_err <= MAX_REL_WEIGHT_ERR


def train_cmd(out, *extra):
    return [sys.executable, "train.py", "--input_model_filename", EMBEDDED_MODEL, "--train_data_local_path",
            EMBEDDED_TRAIN, "--local_dir", str(out), "--w_bits", "2", "--a_bits", "16", "--kv_bits", "16",
            "--w_quantizer", "lsq", "--w_range_lr", "1e-3", "--learning_rate", "1e-4", "--model_max_length", "64",
            "--max_train_samples", "4", "--per_device_train_batch_size", "4", "--max_steps", "4", "--save_steps", "2",
            "--save_total_limit", "2", "--shuffle", "False", "--do_eval", "False", "--use_cpu", "True",
            "--report_to", "none", "--logging_steps", "1", *extra]


def log_losses(ckpt):
    return [h["loss"] for h in json.load(open(ckpt / "trainer_state.json"))["log_history"] if "loss" in h]


@pytest.mark.slow
def test_train_lsq_ranges_learn_loss_drops_and_resume_is_identical(tmp_path):
    run_cli(train_cmd(tmp_path))
    model_dir, ckpts = tmp_path / "models" / "W2A16KV16-lsq", tmp_path / "checkpoints" / "W2A16KV16-lsq"
    assert json.load(open(model_dir / "config.json"))["w_quantizer"] == "lsq"
    first = load_file(model_dir / "model.safetensors")
    teacher = load_file(Path(EMBEDDED_MODEL) / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    start = initial_range(teacher[name], 2, "lsq")
    moved = (first[name + "_range"] - start).abs()
    assert 0 < moved.max() <= 4 * 1e-3 * 1.01  # Adam moves each range at most ~lr_range a step
    losses = log_losses(ckpts / "checkpoint-4")
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    groups = torch.load(ckpts / "checkpoint-4" / "optimizer.pt", weights_only=False)["param_groups"]
    assert [g.get("llmqat_weight_ranges", False) for g in groups] == [False, False, True]
    assert groups[-1]["initial_lr"] == 1e-3 and groups[-1]["weight_decay"] == 0.0 and groups[0]["initial_lr"] == 1e-4
    assert len(groups[-1]["params"]) == 4 * 7  # every decoder linear's range, nothing else

    shutil.rmtree(ckpts / "checkpoint-4")  # as if killed between step 2 and the end
    shutil.rmtree(tmp_path / "models")
    proc = run_cli(train_cmd(tmp_path))
    assert f"resuming from {ckpts}/checkpoint-2" in proc.stderr
    assert log_losses(ckpts / "checkpoint-4") == losses
    again = load_file(model_dir / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    loaded = load_model(str(model_dir)).model.layers[0].mlp.down_proj
    assert torch.equal(loaded.weight_range, first[name + "_range"])


@pytest.mark.slow
def test_train_ternary_saves_ranges_and_a_three_level_grid(tmp_path):
    """train.py --w_bits 0 --w_quantizer seq: the ternary student trains (loss drops), its ranges are saved, and it
    reloads with every decoder weight on {-1, 0, 1} * a / 1.5."""
    run_cli(train_cmd(tmp_path, "--w_bits", "0", "--w_quantizer", "seq", "--save_steps", "4"))
    model_dir = tmp_path / "models" / "W0A16KV16-seq"
    config = json.load(open(model_dir / "config.json"))
    assert (config["w_bits"], config["w_quantizer"]) == (0, "seq")
    losses = log_losses(tmp_path / "checkpoints" / "W0A16KV16-seq" / "checkpoint-4")
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    down = load_model(str(model_dir)).model.layers[0].mlp.down_proj
    assert set(down.weight_grid().codes.unique().tolist()) == {-1, 0, 1}


def kd_after(quantizer, steps, train, held, teacher):
    """Held-out KD loss per token of a W2A16KV16 student after `steps` AdamW steps of KD at the recipe's lr (2e-5,
    ranges the same), before and after."""
    torch.manual_seed(0)
    student = QuantSetting(2, 16, 16, w_quantizer=quantizer).apply(load_model(EMBEDDED_MODEL))
    ranges = [p for n, p in student.named_parameters() if n.endswith("weight_range")]
    rest = [p for n, p in student.named_parameters() if not n.endswith("weight_range")]
    opt = torch.optim.AdamW([{"params": rest}, {"params": ranges}], lr=2e-5, weight_decay=0.0)

    def held_kd():
        with torch.no_grad():
            return kd_loss(student(held).logits, teacher(held).logits).item() / held.shape[1]

    before = held_kd()
    for i in range(steps):
        x = train[4 * i:4 * i + 4]
        with torch.no_grad():
            target = teacher(x).logits
        opt.zero_grad()
        kd_loss(student(x).logits, target).backward()
        opt.step()
    return before, held_kd()


@pytest.mark.slow
def test_w2_learned_ranges_against_absmax_on_the_embedded_model(capsys):
    """Measured, not tuned (docs/training.md): 30 steps of 4 x 128 tokens at the recipe's lr 2e-5. lsq starts where
    absmax does and ends lower; seq starts (a = max|w|) and ends higher. At lr 1e-4 lsq and absmax tie (0.1751 vs
    0.1741): on this model the few-step advantage is small and depends on the lr."""
    tok = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    train = load_blocks(EMBEDDED_TRAIN, tok, 128, 120).blocks
    held = load_blocks(EMBEDDED_EVAL, tok, 128, 16).blocks
    teacher = load_model(EMBEDDED_MODEL).eval()
    kd = {q: kd_after(q, 30, train, held, teacher) for q in ("absmax", "lsq", "seq")}
    with capsys.disabled():
        print("\nW2A16KV16 held-out KD per token (before, after 30 steps):",
              {q: tuple(round(v, 4) for v in k) for q, k in kd.items()})
    # the same start (absmax's 2-bit forward is w + (q - w): q up to fp32 rounding), and every student learns
    assert kd["lsq"][0] == pytest.approx(kd["absmax"][0], rel=1e-5) and all(a < b for b, a in kd.values())
    assert kd["lsq"][1] < kd["absmax"][1] < kd["seq"][1]


@pytest.mark.slow
def test_fsdp_two_processes_shard_the_ranges_and_train_as_one(tmp_path):
    """Under FSDP2 the ranges are sharded with their decoder layer; rank 1, built without weights, gets rank 0's
    (the same broadcast as the weights), and 2 processes train what 1 process trains (up to reduction order)."""
    args = ["sh", "run_train.sh", "2", "16", "16", "--w_quantizer", "lsq", "--model_max_length", "64",
            "--max_train_samples", "4", "--learning_rate", "1e-4", "--w_range_lr", "1e-3", "--max_steps", "2",
            "--do_eval", "False", "--shuffle", "False"]
    one = run_cli([*args, "--per_device_train_batch_size", "4"], env={"OUTPUT": str(tmp_path / "one")})
    two = run_cli([*args, "--per_device_train_batch_size", "2"], env={"OUTPUT": str(tmp_path / "two"), "NPROC": "2"})
    ranges = 4 * (256 + 128 + 128 + 256 + 688 + 688 + 256)  # one per output row of q, k, v, o, gate, up, down
    assert f"holds {3950848 + ranges} of {3950848 + ranges} student" in one.stdout
    for rank in (0, 1):
        assert f"rank {rank}/2 holds {(3950848 + ranges) // 2} of {3950848 + ranges} student" in two.stdout
    a, b = (load_file(tmp_path / run / "models" / "W2A16KV16-lsq" / "model.safetensors") for run in ("one", "two"))
    assert a.keys() == b.keys()
    name = "model.layers.3.self_attn.o_proj.weight_range"
    start = initial_range(load_file(Path(EMBEDDED_MODEL) / "model.safetensors")[name[:-6]], 2, "lsq")
    assert (a[name] - start).abs().max() > 1e-3  # moved, by about lr_range a step
    torch.testing.assert_close(b[name], a[name], rtol=0, atol=2e-5)


def test_bad_quantizer_on_the_command_line_is_one_error_line(tmp_path):
    proc = run_cli([sys.executable, "train.py", "--w_bits", "3", "--w_quantizer", "seq", "--local_dir", str(tmp_path)],
                   check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        "error: w_quantizer=seq with w_bits=3: SEQ is ParetoQ's grid for 2 bits and ternary; use w_bits 2 or 0 "
        "(lsq for 3-8 bits)")
    assert list(tmp_path.iterdir()) == []
