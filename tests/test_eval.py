"""eval.py: perplexity against a hand computation, RTN at 32 bits equals FP exactly, clear errors."""
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from utils.errors import InputError
from models.quant_model import QuantSetting
from utils.evaluate import load_for_eval, main as evaluate_main, perplexity
from utils.constants import EMBEDDED_MODEL

from conftest import REPO, TIMEOUT  # noqa: E402


class Bigram(torch.nn.Module):
    """logits of the next token = a fixed row per current token."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.device = torch.device("cpu")

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def test_perplexity_equals_hand_computation():
    table = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0], [1.0, 1.0, 3.0]])
    ids = torch.tensor([0, 1, 2, 2, 1, 0, 2, 1, 2])  # two windows of 4; the last token is dropped
    nll = 0.0
    for window in ([0, 1, 2, 2], [1, 0, 2, 1]):
        for cur, nxt in zip(window, window[1:]):  # the first token of each window is not predicted
            row = table[cur].tolist()
            nll -= row[nxt] - math.log(sum(math.exp(x) for x in row))
    r = perplexity(Bigram(table), ids, seq_len=4, batch_size=1)
    assert (r["windows"], r["tokens"]) == (2, 6)
    assert r["ppl"] == pytest.approx(math.exp(nll / 6), rel=1e-6)
    assert perplexity(Bigram(table), ids, seq_len=4, batch_size=2)["ppl"] == pytest.approx(r["ppl"], rel=1e-6)
    assert perplexity(Bigram(table), ids, seq_len=4, max_windows=1)["windows"] == 1
    with pytest.raises(InputError, match="fewer than one window of 10"):
        perplexity(Bigram(table), ids, seq_len=10)


def eval_argv(*extra):
    return [EMBEDDED_MODEL, "--seq_len", "128", "--max_windows", "6", *extra]


def test_rtn_at_32_bits_equals_fp_exactly_and_4_bits_differs():
    fp = evaluate_main(eval_argv())
    rtn32 = evaluate_main(eval_argv("--w_bits", "32", "--a_bits", "32", "--kv_bits", "32"))
    rtn4 = evaluate_main(eval_argv("--w_bits", "4", "--a_bits", "8", "--kv_bits", "4"))
    assert (fp["method"], rtn32["method"], rtn4["bits"]) == ("FP", "RTN", "4-8-4")
    assert rtn32["ppl"]["shakespeare_eval"]["ppl"] == fp["ppl"]["shakespeare_eval"]["ppl"]
    assert rtn4["ppl"]["shakespeare_eval"]["ppl"] > fp["ppl"]["shakespeare_eval"]["ppl"] * 1.001
    ids = torch.arange(3, 131)[None]
    m_fp = load_for_eval(EMBEDDED_MODEL)[0]
    m_32 = load_for_eval(EMBEDDED_MODEL, QuantSetting(32, 32, 32))[0]
    with torch.no_grad():
        assert torch.equal(m_fp(ids).logits, m_32(ids).logits)


def test_omitted_widths_stay_32_and_a_quantized_model_refuses_rtn(tmp_path):
    assert evaluate_main([EMBEDDED_MODEL, "--w_bits", "4", "--ppl_data"])["bits"] == "4-32-32"
    model, tokenizer, method, setting = load_for_eval(EMBEDDED_MODEL, QuantSetting(4, 8, 4))
    assert (method, setting.label) == ("RTN", "4-8-4")
    model.save_pretrained(tmp_path / "q")
    tokenizer.save_pretrained(tmp_path / "q")
    _, _, method, setting = load_for_eval(str(tmp_path / "q"))
    assert (method, setting) == ("QAT", QuantSetting(4, 8, 4))
    with pytest.raises(InputError, match="already quantized"):
        load_for_eval(str(tmp_path / "q"), QuantSetting(8))


@pytest.mark.parametrize("argv, message", [
    (["/nonexistent/model"], "error: model '/nonexistent/model': no such directory"),
    ([EMBEDDED_MODEL, "--w_bits", "5", "--kv_bits", "1"], "error: kv_bits=1 is not allowed"),
    ([EMBEDDED_MODEL, "--ppl_data", "/nonexistent.jsonl"], "error: data path '/nonexistent.jsonl': no such file"),
    ([EMBEDDED_MODEL, "--tasks", "no_such_task"], "no_such_task"),
    ([EMBEDDED_MODEL, "--smoothquant", "0.5"], "error: --smoothquant needs the bits to quantize to"),
    ([EMBEDDED_MODEL, "--smoothquant", "0", "--w_bits", "8"], "error: --smoothquant 0.0: the migration strength"),
    ([EMBEDDED_MODEL, "--smoothquant", "0.5", "--w_bits", "8", "--calib_data", "/nonexistent.jsonl"],
     "error: data path '/nonexistent.jsonl': no such file"),
    ([EMBEDDED_MODEL, "--gptq"], "error: --gptq needs the bits to quantize to"),
    ([EMBEDDED_MODEL, "--gptq", "--w_bits", "2"], "error: --gptq needs --w_bits 3-8"),
    ([EMBEDDED_MODEL, "--gptq", "--w_bits", "4", "--smoothquant", "0.5"], "error: --smoothquant and --gptq"),
])
def test_bad_input_one_error_line(tmp_path, monkeypatch, argv, message):
    """eval.py's main in this process (the CLI's one line is cli()'s SystemExit message; any other exception
    would fail the test with its traceback)."""
    import eval as eval_script
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["eval.py", *argv, "--output_json", str(out)])
    with pytest.raises(SystemExit) as e:
        eval_script.main()
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code) and "\n" not in str(e.value.code)
    assert not out.exists()


def test_cli_prints_and_writes_json(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "eval.py", *eval_argv("--output_json", str(out))], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert "perplexity shakespeare_eval:" in proc.stdout and "(6 windows of 128 tokens)" in proc.stdout
    import json
    r = json.load(open(out))
    assert r["method"] == "FP" and r["ppl"]["shakespeare_eval"]["windows"] == 6
