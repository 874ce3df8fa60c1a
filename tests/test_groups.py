"""Group-wise weights (w_group_size G): one scale per G consecutive input columns. Hand computations at every
width, per-channel unchanged, the setting's names, config and errors, GPTQ on the group grid, the export in
compressed-tensors' group strategy (checked with the library), and train.py / eval.py passing it through."""
import json
import sys

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from models.errors import InputError
from models.export import export
from models.gptq import gptq_weight
from models.packed import PackedQuantizeLinear
from models.quant_model import QuantSetting, load_exported, load_model
from models.utils_quant import QuantizeLinear, dequantize, quantize_weight, sym_quant, weight_grid

from conftest import REPO_PATH, run_cli
from test_export import assert_library_reads_our_weights

SMALL = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def by_hand(w, bits, g):
    """The paper's formulas on each group of g columns, written out one group at a time."""
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], g):
            x = w[r, c:c + g]
            if bits >= 3:
                s = (2 ** (bits - 1) - 1) / (x.abs().max() + 1e-6)
                out[r, c:c + g] = torch.round(x * s) / (s + 1e-6)
            elif bits == 2:
                a = 2 * x.abs().mean()
                out[r, c:c + g] = (torch.round(torch.clamp(x / a, -0.99, 0.99) * 2 - 0.5) + 0.5) / 2 * a
            else:
                out[r, c:c + g] = torch.sign(x) * x.abs().mean()
    return out


@pytest.mark.parametrize("bits", range(1, 9))
def test_group_quantizer_is_the_formula_per_group(bits):
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(bits)) * 0.1
    w[0, :8] *= 10  # one group with a large outlier: its neighbours keep their own scale
    q = quantize_weight(w, bits, group_size=8)
    if bits >= 3:
        assert torch.equal(q, by_hand(w, bits, 8))
    else:  # the 1-2 bit straight-through w + (q - w) is on the grid up to fp32 rounding
        assert torch.allclose(q, by_hand(w, bits, 8), rtol=0, atol=1e-7)
    assert not torch.equal(q, quantize_weight(w, bits))  # the per-channel grid differs
    grid = weight_grid(w, bits, group_size=8)
    assert grid.codes.shape == (6, 32) and grid.scale.shape == (6, 4)
    assert torch.equal(dequantize(grid), q) if bits >= 3 else torch.allclose(dequantize(grid), q, atol=1e-7)


def test_per_channel_unchanged_and_one_group_per_row_is_per_channel():
    w = torch.randn(5, 24, generator=torch.Generator().manual_seed(0))
    for bits in range(1, 9):
        per_row = quantize_weight(w, bits)
        assert torch.equal(quantize_weight(w, bits, group_size=24), per_row)
        assert torch.equal(quantize_weight(w, bits, group_size=None), per_row)
    assert torch.equal(quantize_weight(w, 4), sym_quant(w, 4)[0])


def test_group_gradient_is_straight_through():
    w = (torch.randn(4, 16) * 0.1).requires_grad_()
    layer = QuantizeLinear(16, 4, w_bits=4, w_group_size=8)
    layer.weight = torch.nn.Parameter(w.detach().clone())
    layer(torch.ones(2, 16)).sum().backward()
    assert torch.equal(layer.weight.grad, torch.full((4, 16), 2.0))


def test_setting_names_config_and_errors():
    s = QuantSetting(4, 8, 4, w_group_size=128)
    assert (s.name, s.label) == ("W4A8KV4-g128", "4-8-4-g128")
    assert QuantSetting.parse("4-8-4-g128") == s == QuantSetting.parse("W4A8KV4-g128")
    assert QuantSetting.of("4", "8", "4", w_group_size="128") == s
    assert QuantSetting(4, 8, 4).name == "W4A8KV4" and QuantSetting.of("4", "8", "4", w_group_size="0").w_group_size is None
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    QuantSetting(4, 8, 4, w_group_size=32).apply(model)
    assert model.config.w_group_size == 32 and QuantSetting.from_config(model.config).w_group_size == 32
    assert model.model.layers[0].mlp.down_proj.w_group_size == 32
    for bad, message in ((dict(w_group_size=0), "w_group_size=0 is not allowed"),
                         (dict(w_group_size="x"), "w_group_size=x is not allowed"),
                         (dict(w_bits=32, w_group_size=64), "needs quantized weights")):
        with pytest.raises(InputError, match=message):
            QuantSetting(**{"w_bits": 4, **bad})
    with pytest.raises(InputError, match=r"w_group_size=48 does not divide the decoder linears' input width 64; "
                                         r"use a divisor of every width in \[64, 128\]"):
        QuantSetting(4, 8, 4, w_group_size=48).apply(LlamaForCausalLM(LlamaConfig(**SMALL)))


def test_gptq_rounds_onto_the_group_grid():
    torch.manual_seed(0)
    w, x = torch.randn(8, 64) * 0.1, torch.randn(256, 64) @ torch.randn(64, 64)
    assert torch.equal(gptq_weight(w, torch.eye(64), 4, group_size=16), quantize_weight(w, 4, group_size=16))
    q = gptq_weight(w, 2 * x.T @ x / len(x), 4, group_size=16)
    grid = weight_grid(w, 4, group_size=16)  # every GPTQ weight is a level of its group's (original) scale
    codes = q.double() / grid.scale.repeat_interleave(16, dim=1)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.round().abs().max() <= 7
    assert not torch.equal(q, quantize_weight(w, 4, group_size=16))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REPO_PATH / "assets" / "tiny_llama")


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_group_export_is_exact_and_compressed_tensors_reads_it(tmp_path, tokenizer, bits):
    torch.manual_seed(0)
    QuantSetting(bits, 8, 4, w_group_size=32).apply(LlamaForCausalLM(LlamaConfig(**SMALL))).save_pretrained(
        tmp_path / "qat")
    tokenizer.save_pretrained(tmp_path / "qat")
    report = export(tmp_path / "qat", tmp_path / "out")
    assert report.max_logit_diff == 0 if bits >= 3 else report.max_logit_diff < 1e-4
    exported = load_exported(tmp_path / "out")
    down = exported.model.layers[0].mlp.down_proj
    assert type(down) is PackedQuantizeLinear and down.weight_scale.shape == (64, 128 // 32)
    qat = load_model(str(tmp_path / "qat"))
    assert torch.equal(down.dequantized_weight(), qat.model.layers[0].mlp.down_proj.quantized_weight()) or bits < 3
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["w_group_size"] == 32 and config["llmqat_export"]["group_size"] == 32
    if bits < 3:  # no compressed-tensors config for the zero-free grids
        assert "quantization_config" not in config
        return
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (weights["strategy"], weights["group_size"]) == ("group", 32)
    assert_library_reads_our_weights(tmp_path / "out", exported)


def test_eval_cli_takes_group_size_for_rtn_and_refuses_it_alone(tmp_path):
    from utils.errors import cli
    from utils.evaluate import main

    def cli_main(argv):
        return cli(lambda: main(argv))
    eval_py, model = [sys.executable, str(REPO_PATH / "eval.py")], str(REPO_PATH / "assets" / "tiny_llama")
    out = tmp_path / "r.json"
    run_cli(eval_py + [model, "--w_bits", "4", "--w_group_size", "16", "--seq_len", "128", "--max_windows", "2",
                       "--output_json", str(out)], cwd=tmp_path)
    assert json.loads(out.read_text())["bits"] == "4-32-32-g16"
    for args, message in ((["--w_group_size", "16"], "error: --w_group_size needs the bits to quantize to (--w_bits ...)"),
                          (["--w_bits", "4", "--w_group_size", "100"], "error: w_group_size=100 does not divide the "
                           "decoder linears' input width 256; use a divisor of every width in [256, 688]")):
        with pytest.raises(SystemExit) as e:  # in-process: eval.py's main exits with the one error line
            cli_main([model] + args)
        assert e.value.code == message


def test_gptq_baseline_on_a_model_uses_the_group_grid():
    from models.baselines import BASELINES
    from models.utils_quant import QuantizeLinear
    model = LlamaForCausalLM(LlamaConfig(**SMALL))
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    ids = torch.randint(0, SMALL["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(0))
    BASELINES["GPTQ"].quantize(model, QuantSetting(4, 8, 4, w_group_size=32), ids)
    down = model.model.layers[1].mlp.down_proj
    assert type(down) is QuantizeLinear and down.w_bits == 32 and down.a_bits == 8  # weights already on the grid
    grid = weight_grid(original["model.layers.1.mlp.down_proj"], 4, group_size=32)
    codes = down.weight.detach().double() / grid.scale.repeat_interleave(32, dim=1)
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.round().abs().max() <= 7
    with pytest.raises(InputError, match="w_group_size=48 does not divide"):
        BASELINES["GPTQ"].quantize(LlamaForCausalLM(LlamaConfig(**SMALL)), QuantSetting(4, w_group_size=48), ids)
