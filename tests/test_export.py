"""Export of QAT checkpoints as packed low-bit ones (compressed-tensors pack-quantized): packing, exactness of the
weights and logits, size, the format's own library, generation, and bad input."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationConfig
from safetensors import safe_open
from transformers import (AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

import models.export as export_lib
from models.export import export
from models.packed import PackedQuantizeLinear
from models.packing import pack, unpack
from models.quant_model import QuantSetting, load_exported, load_model
from models.utils_quant import QuantizeLinear, quantize_weight, weight_grid

from conftest import REPO, TIMEOUT, REPO_PATH as ROOT  # noqa: E402
# 343: odd row length for the down projection (4-bit rows end mid-byte, 3-bit rows mid-word)
TINY = dict(vocab_size=2048, hidden_size=128, intermediate_size=343, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = [(128, 128), (64, 128), (64, 128), (128, 128), (343, 128), (343, 128), (128, 343)]  # (out, in) of LINEARS


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / "assets" / "tiny_llama")


def save_model(path, tokenizer, bits=None, kv_post_rope=False):
    """A tiny random LLaMA saved as train.py saves the student: QAT config (bits), weights, tokenizer."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    if bits:
        QuantSetting(*bits, kv_post_rope=kv_post_rope).apply(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def packed_bytes(bits):
    """Bytes the format takes for TINY's decoder linears: packed rows, a float64 scale a row, an int64 shape."""
    return TINY["num_hidden_layers"] * sum(out * (-(-n * bits // 32) * 4 + 8) + 16 for out, n in SHAPES)


def bf16_bytes():
    return TINY["num_hidden_layers"] * sum(2 * out * n for out, n in SHAPES)


def error_of(argv):
    """Run export.py's main in-process; return the message it exits with (exit code 1: see the test below)."""
    import export as cli
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    return str(e.value.code)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 33, 343])
def test_pack_unpack_round_trip_every_value_and_the_format_spec(bits, n):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    every = torch.arange(lo, hi + 1, dtype=torch.int8)
    values = torch.cat([every.repeat(n // len(every) + 1)[:n].view(1, n),
                        torch.randint(lo, hi + 1, (5, n), dtype=torch.int8)])
    if n >= len(every):
        assert set(values[0].tolist()) == set(range(lo, hi + 1))
    packed = pack(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (6, -(-n * bits // 32))
    assert torch.equal(unpack(packed, bits, n), values)
    # compressed-tensors' own packer writes the same words, and its unpacker reads ours
    assert torch.equal(packed, pack_to_int32(values, bits))
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size(values.shape)), values)


def test_int4_is_two_per_byte_low_nibble_first_and_out_of_range_values_are_refused():
    # -8, 7, 0 -> unsigned 0, 15, 8: bytes 0xF0, 0x08 of a little-endian word
    assert pack(torch.tensor([[-8, 7, 0]], dtype=torch.int8), 4).tolist() == [[0x08F0]]
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack(torch.tensor([[8]], dtype=torch.int8), 4)


def grid_levels(w, bits):
    """The paper's weight grids, written out: what the packed weights must dequantize to."""
    w = w.detach()
    if bits >= 3:
        s = (2 ** (bits - 1) - 1) / (w.abs().amax(-1, keepdim=True) + 1e-6)
        return torch.round(w * s) / (s + 1e-6)
    mean_abs = w.abs().mean(-1, keepdim=True)
    if bits == 1:
        return torch.sign(w) * mean_abs
    a = 2 * mean_abs
    return a * (torch.round(torch.clamp(w / a, -0.99, 0.99) * 2 - 0.5) + 0.5) / 2


@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_weights_dequantize_to_the_paper_grid_bit_exactly(bits):
    torch.manual_seed(bits)
    linear = QuantizeLinear(343, 37, w_bits=bits, a_bits=8)
    grid = weight_grid(linear.weight, bits)
    q, scale = grid.codes, grid.scale
    lo = -(1 << (bits - 1)) + (bits >= 3)  # the symmetric grids do not use the most negative integer
    assert lo <= q.min() and q.max() <= (1 << (bits - 1)) - 1 and scale.dtype == torch.float64
    packed = PackedQuantizeLinear.from_linear(linear)
    assert torch.equal(packed.dequantized_weight(), grid_levels(linear.weight, bits))
    x = torch.randn(2, 5, 343)
    if bits >= 3:  # the QAT forward is the same fp32 computation
        assert torch.equal(quantize_weight(linear.weight, bits), packed.dequantized_weight())
        assert torch.equal(packed(x), linear(x))
    else:  # the QAT forward's straight-through w + (q - w) is on the grid only up to fp32 rounding
        torch.testing.assert_close(quantize_weight(linear.weight, bits), packed.dequantized_weight(), rtol=0, atol=1e-8)
        torch.testing.assert_close(packed(x), linear(x), rtol=0, atol=1e-5)


def test_export_cli_w4_bit_exact_logits_size_and_generation(tmp_path, tokenizer, capsys):
    import export as cli
    qat = save_model(tmp_path / "qat", tokenizer, (4, 8, 4))
    out = tmp_path / "out"
    cli.main([str(qat), str(out)])
    stdout = capsys.readouterr().out
    last = stdout.strip().splitlines()[-1]
    diff, ratio = map(float, re.fullmatch(r"max_logit_diff (\S+) size_ratio (\S+)", last).groups())
    assert diff == 0 and 3.5 < ratio < 4  # 16/4 bits, less the scales (8 bytes a row)
    assert "weights: bit-exact" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "qat"]  # no temporary directory left

    # the size ratio is what the file holds: bf16 bytes of the decoder linears over their packed tensors
    with safe_open(out / "model.safetensors", "pt") as f:
        written = sum(f.get_tensor(k).nbytes for k in f.keys() if k.endswith(("_packed", "_scale", "_shape")))
        assert all(".layers." in k for k in f.keys() if k.endswith("_packed"))
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight_packed").shape == (128, 43)  # 343 * 4 / 32
    with safe_open(qat / "model.safetensors", "pt") as f:
        as_bf16 = 2 * sum(f.get_tensor(k).numel() for k in f.keys() if k.split(".")[-2] in LINEARS)
    assert ratio == pytest.approx(as_bf16 / written, abs=0.01)

    config = json.loads((out / "config.json").read_text())
    assert (config["w_bits"], config["a_bits"], config["kv_bits"], config["kv_post_rope"]) == (4, 8, 4, False)
    assert config["llmqat_export"] == {"format": "pack-quantized", "num_bits": 4, "zero_point": 0.0, "group_size": None}

    # greedy generation with the KV cache: the same tokens as the QAT model
    qat_model, exported = load_model(qat).eval(), load_exported(out)
    attn = exported.model.layers[0].self_attn
    assert (attn.k_proj.out_bits, attn.v_proj.out_bits, attn.q_proj.out_bits, attn.q_proj.a_bits) == (4, 4, 32, 8)
    ids = tokenizer("ROMEO:", return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(exported.generate(ids, **kwargs), qat_model.generate(ids, **kwargs))

    # docs/export.md's loading snippet, as written, from another directory
    doc = (ROOT / "docs" / "export.md").read_text()
    snippet = re.search(r'PYTHONPATH=/path/to/LLM-QAT python -c "\n(.*?)"\n```', doc, re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", snippet.replace("output/exported/W4A8KV4", str(out))],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO}, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0 and "ROMEO:" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("bits,kv_post_rope", [((8, 8, 8), False), ((3, 8, 4), False), ((2, 8, 4), False),
                                               ((1, 16, 8), False), ((4, 4, 4), True)],
                         ids=["W8A8KV8", "W3A8KV4", "W2A8KV4", "W1A16KV8", "W4A4KV4-post-rope"])
def test_export_every_width_matches_the_qat_model(tmp_path, tokenizer, bits, kv_post_rope):
    qat = save_model(tmp_path / "qat", tokenizer, bits, kv_post_rope)
    (tmp_path / "out").mkdir()  # an existing empty OUT_DIR is fine
    report = export(qat, tmp_path / "out")
    if bits[0] >= 3:
        assert report.max_logit_diff == 0 and report.max_weight_diff == 0
    else:  # see test_packed_weights_dequantize_to_the_paper_grid_bit_exactly
        assert report.max_logit_diff < 1e-4 and report.max_weight_diff < 1e-8
    assert report.size_ratio == pytest.approx(bf16_bytes() / packed_bytes(bits[0]))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["kv_post_rope"] == kv_post_rope and config["a_bits"] == bits[1]
    # compressed-tensors has no zero-free 1- and 2-bit grid: only >= 3 bits carry its config
    assert ("quantization_config" in config) == (bits[0] >= 3)

    # the match is not trivial: without activation and KV quantization the logits move
    exported = load_exported(tmp_path / "out")
    assert type(load_model(str(tmp_path / "out")).model.layers[0].mlp.up_proj) is PackedQuantizeLinear
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        reference = exported(ids).logits
        for m in exported.modules():
            if isinstance(m, PackedQuantizeLinear):
                m.a_bits = m.out_bits = 32
        assert (exported(ids).logits - reference).abs().max() > 1e-4


def test_export_qwen2_with_biases_and_tied_embeddings(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=2048, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    QuantSetting(4, 8, 4).apply(Qwen2ForCausalLM(config)).save_pretrained(tmp_path / "qat")
    tokenizer.save_pretrained(tmp_path / "qat")
    assert export(tmp_path / "qat", tmp_path / "out").max_logit_diff == 0
    exported = load_exported(tmp_path / "out")
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    assert exported.model.layers[0].self_attn.q_proj.bias is not None


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")  # the checkpoint's own config is kept
@pytest.mark.parametrize("bits", [3, 4])
def test_transformers_with_compressed_tensors_reads_the_same_weights(tmp_path, tokenizer, bits):
    export(save_model(tmp_path / "qat", tokenizer, (bits, 8, 8)), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert QuantizationConfig.model_validate(config).format == "pack-quantized"
    assert_library_reads_our_weights(tmp_path / "out", load_exported(tmp_path / "out"))


def assert_library_reads_our_weights(out_dir, ours):
    """transformers + compressed-tensors loads the export with exactly our dequantized decoder weights."""
    theirs = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32,
                                                  quantization_config=CompressedTensorsConfig(dequantize=True))
    for layer, their_layer in zip(ours.model.layers, theirs.model.layers):
        for name, module in layer.named_modules():
            if isinstance(module, PackedQuantizeLinear):
                assert torch.equal(their_layer.get_submodule(name).weight, module.dequantized_weight()), name


def test_not_a_qat_checkpoint_is_one_error_line_exit_1_nothing_written(tmp_path, tokenizer):
    plain = save_model(tmp_path / "plain", tokenizer)
    run = subprocess.run([sys.executable, "export.py", plain, tmp_path / "out"], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [f"error: {plain} is not a QAT checkpoint: its config.json has no "
                                               "w_bits/a_bits/kv_bits"]
    assert not (tmp_path / "out").exists()


def test_incomplete_checkpoint_existing_output_and_failed_check_write_nothing(tmp_path, tokenizer, monkeypatch):
    qat = save_model(tmp_path / "qat", tokenizer, (4, 8, 4))
    (qat / "model.safetensors").rename(tmp_path / "weights")
    assert error_of([qat, tmp_path / "out"]) == f"error: {qat} is incomplete: no weights (model.safetensors or " \
                                                "model.safetensors.index.json)"
    assert not (tmp_path / "out").exists()
    (tmp_path / "weights").rename(qat / "model.safetensors")

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert error_of([qat, out]) == f"error: {out} exists and is not empty; not overwriting it"
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    assert "w_bits=16" in error_of([save_model(tmp_path / "w16", tokenizer, (16, 8, 8)), tmp_path / "out16"])

    monkeypatch.setattr(export_lib, "MAX_LOGIT_DIFF", -1.0)  # a check that fails after everything was written
    assert "logits differ" in error_of([qat, tmp_path / "out2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "qat", "w16"]  # no out2, no temporary directory
