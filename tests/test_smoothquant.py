"""SmoothQuant baseline: the scales on known numbers, the FP function unchanged, outliers handled better than
RTN, and eval.py --smoothquant end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.quant_model import QuantSetting
from models.smoothquant import GROUPS, activation_absmax, smooth
from conftest import FAMILIES, TIMEOUT, TINY, tiny as tiny_model
from utils.constants import EMBEDDED_MODEL

from conftest import REPO  # noqa: E402


def tiny(family, seed=0):
    model = tiny_model(family, seed)
    with torch.no_grad():  # non-trivial norms (HF initializes them to 1)
        for layer in model.model.layers:
            for norm, _ in GROUPS:
                layer.get_submodule(norm).weight.uniform_(0.5, 1.5)
    return model


def windows(n=8, seq=32):
    return torch.randint(0, TINY["vocab_size"], (n, seq), generator=torch.Generator().manual_seed(1))


def test_scales_on_known_numbers():
    config = LlamaConfig(vocab_size=16, hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    model = LlamaForCausalLM(config)
    layer = model.model.layers[0]
    with torch.no_grad():
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            layer.get_submodule(name).weight.fill_(-1.0)
        layer.self_attn.k_proj.weight[2, 0] = -4.0  # column max |W| = [4, 1, 1, 1] over q, k, v together
        layer.input_layernorm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    stats = {(0, "input_layernorm"): torch.tensor([1.0, 4.0, 9.0, 16.0]),
             (0, "post_attention_layernorm"): torch.ones(4)}
    smooth(model, stats, alpha=0.5)
    s = torch.tensor([1 / 2, 2.0, 3.0, 4.0])  # sqrt(max|X|) / sqrt(max|W|)
    assert torch.equal(layer.input_layernorm.weight, torch.tensor([1.0, 2.0, 3.0, 4.0]) / s)
    assert torch.equal(layer.self_attn.q_proj.weight, -s.expand(4, 4))
    assert torch.equal(layer.self_attn.k_proj.weight[2], torch.tensor([-4.0, -1, -1, -1]) * s)


@pytest.mark.parametrize("family", FAMILIES, ids=["llama", "mistral", "qwen2"])
def test_smoothing_keeps_the_fp_function(family):
    model, ids = tiny(family), windows()
    with torch.no_grad():
        before = model(ids).logits
        stats = activation_absmax(model, ids, batch_size=4)
        assert len(stats) == 2 * TINY["num_hidden_layers"]
        assert all(v.shape == (TINY["hidden_size"],) for v in stats.values())
        assert not model.model.layers[0].self_attn.q_proj._forward_pre_hooks  # hooks removed
        smooth(model, stats, alpha=0.5)
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, tiny(family).model.layers[0].input_layernorm.weight)


def test_outlier_channels_quantize_better_than_rtn():
    """An activation outlier channel (as in large LLMs): W8A8 per-token RTN loses the other channels'
    resolution; SmoothQuant moves the outlier into the weights first."""
    def outlier_model():
        model = tiny(FAMILIES[0])
        with torch.no_grad():  # x50 on channel 5 after each norm, undone in the next linears: same function
            for layer in model.model.layers:
                for norm, linears in GROUPS:
                    layer.get_submodule(norm).weight[5] *= 50
                    for name in linears:
                        layer.get_submodule(name).weight[:, 5] /= 50
        return model

    ids = windows()
    with torch.no_grad():
        fp = outlier_model()(ids).logits
        rtn = QuantSetting(8, 8, 32).apply(outlier_model())(ids).logits
        sq = outlier_model()
        smooth(sq, activation_absmax(sq, ids), alpha=0.5)
        sq = QuantSetting(8, 8, 32).apply(sq)(ids).logits
    rtn_err, sq_err = (rtn - fp).pow(2).mean().item(), (sq - fp).pow(2).mean().item()
    assert sq_err < 0.25 * rtn_err, (sq_err, rtn_err)


def test_eval_cli_smoothquant(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, os.path.join(REPO, "eval.py"), EMBEDDED_MODEL, "--w_bits", "8", "--a_bits", "8",
           "--kv_bits", "8",
           "--smoothquant", "0.5", "--calib_windows", "4", "--calib_seq_len", "1024", "--seq_len", "128",
           "--max_windows", "4", "--output_json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)  # no gen_data/ there
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SmoothQuant: calibrated on 4 windows of 512 tokens, alpha 0.5" in proc.stdout  # capped at max_position_embeddings
    r = json.load(open(out))
    assert (r["method"], r["bits"], r["smoothquant"]["alpha"]) == ("SmoothQuant", "8-8-8", 0.5)
    assert r["smoothquant"]["calib_data"][0].endswith("shakespeare_train_small.jsonl")
    assert 1 < r["ppl"]["shakespeare_eval"]["ppl"] < 200


def test_calibration_defaults_to_the_generated_data(tmp_path, monkeypatch):
    from utils.errors import InputError
    from utils.evaluate import default_calib_data
    monkeypatch.chdir(tmp_path)
    assert default_calib_data(EMBEDDED_MODEL)[0].endswith("shakespeare_train_small.jsonl")
    with pytest.raises(InputError, match="no calibration data"):
        default_calib_data(str(tmp_path))  # a real model and no generated data: say what to pass
    (tmp_path / "gen_data").mkdir()
    (tmp_path / "gen_data" / "all_gen.jsonl").write_text('{"text": "x"}\n')
    assert default_calib_data(str(tmp_path)) == default_calib_data(EMBEDDED_MODEL) == ["gen_data/all_gen.jsonl"]
