"""GPTQ baseline: RTN's grid exactly, error compensation that beats RTN on correlated inputs, whole models
and eval.py --gptq end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch

from models.gptq import gptq_model, gptq_weight, grid
from models.utils_quant import sym_quant
from conftest import FAMILIES, TIMEOUT, TINY, tiny
from utils.constants import EMBEDDED_MODEL

from conftest import REPO  # noqa: E402


def on_grid(q, w, bits):
    s, levels = grid(w.float(), bits)
    k = q * (s + 1e-6)
    return torch.allclose(k, k.round(), atol=1e-3) and k.abs().round().max() <= levels


def test_identity_hessian_is_exactly_rtn():
    """Uncorrelated, equally scaled inputs: nothing to compensate, so GPTQ rounds exactly as SymQuantizer
    (300 columns: two full blocks of 128 and a partial one)."""
    w = torch.randn(8, 300, generator=torch.Generator().manual_seed(0)) * 0.05
    for bits in (3, 4, 8):
        assert torch.equal(gptq_weight(w, torch.eye(300), bits), sym_quant(w, bits)[0])


def test_correlated_inputs_lower_the_output_error_and_stay_on_the_grid():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 96, generator=g) @ torch.randn(96, 96, generator=g)  # correlated input channels
    w = torch.randn(32, 96, generator=g) * 0.05
    for bits in (3, 4):
        q = gptq_weight(w, 2 * x.T @ x / len(x), bits)
        rtn = sym_quant(w, bits)[0]
        err_gptq, err_rtn = (x @ (w - q).T).pow(2).mean(), (x @ (w - rtn).T).pow(2).mean()
        assert err_gptq < 0.7 * err_rtn, (bits, err_gptq, err_rtn)
        assert on_grid(q, w, bits)


def test_inputs_never_seen_get_zero_weight_and_no_nan():
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    x[:, 3] = 0
    q = gptq_weight(torch.randn(4, 16) * 0.1, 2 * x.T @ x / len(x), 4)
    assert torch.isfinite(q).all() and torch.equal(q[:, 3], torch.zeros(4))


@pytest.mark.parametrize("family", [FAMILIES[0], FAMILIES[2]], ids=["llama", "qwen2"])
def test_whole_model_every_decoder_linear_on_the_grid(family):
    model, original = tiny(family), tiny(family)
    ids = torch.randint(0, TINY["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(2))
    gptq_model(model, ids, bits=3, batch_size=2)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert len(linears) == 7 * TINY["num_hidden_layers"]
    for name, m in linears:
        w0 = original.get_submodule(name).weight.detach()
        assert on_grid(m.weight, w0, 3) and not torch.equal(m.weight, sym_quant(w0, 3)[0]), name
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)  # embeddings and head stay FP
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_eval_cli_gptq_beats_rtn_at_3_bits(tmp_path):
    ppl = {}
    for method in ("RTN", "GPTQ"):
        out = tmp_path / f"{method}.json"
        cmd = [sys.executable, os.path.join(REPO, "eval.py"), EMBEDDED_MODEL, "--w_bits", "3", "--seq_len", "256",
               "--max_windows", "24",
               "--calib_windows", "16", "--output_json", str(out)] + (["--gptq"] if method == "GPTQ" else [])
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)  # no gen_data/ there
        assert proc.returncode == 0, proc.stderr[-3000:]
        r = json.load(open(out))
        assert (r["method"], r["bits"]) == (method, "3-32-32")
        ppl[method] = r["ppl"]["shakespeare_eval"]["ppl"]
    assert "GPTQ: calibrated on 16 windows of 512 tokens" in proc.stdout
    assert ppl["GPTQ"] < ppl["RTN"] - 0.5, ppl
