"""Model conversion on stock HF LLaMA / Mistral / Qwen2 (GQA), KV quantization, save and load."""
import json

import pytest
import torch
import torch.nn as nn
from transformers import LlamaConfig, Qwen2Config, Qwen2ForCausalLM

from models.errors import InputError
from models.kv_cache import quantize_kv
from models.quant_model import QuantSetting, load_model
from models.utils_quant import QuantizeLinear, SymQuantizer

from conftest import FAMILIES, REPO, REPO_PATH, TINY, tiny, tokens

@pytest.mark.parametrize("family", FAMILIES, ids=["llama", "mistral", "qwen2"])
def test_every_decoder_linear_becomes_quantize_linear(family):
    model = tiny(family)
    n_params = sum(p.numel() for p in model.parameters())
    QuantSetting(4, 8, 4).apply(model)
    linears = [m for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 7 * TINY["num_hidden_layers"] and all(type(m) is QuantizeLinear for m in linears)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert sum(p.numel() for p in model.parameters()) == n_params  # parameters shared, nothing added
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_bits == 4 and attn.v_proj.out_bits == 4 and attn.q_proj.out_bits == 32
    assert attn.k_proj.out_features == 16  # grouped-query attention: 2 KV heads of 8
    assert (model.config.w_bits, model.config.a_bits, model.config.kv_bits) == (4, 8, 4)
    assert "(q_proj): QuantizeLinear(in_features=32, out_features=32, bias=" in str(model)


@pytest.mark.parametrize("family", FAMILIES, ids=["llama", "mistral", "qwen2"])
def test_32_bits_gives_identical_logits_and_4_bits_differs(family):
    ref_model, x = tiny(family), tokens()
    ref = ref_model(x).logits
    assert torch.equal(QuantSetting(32, 32, 32).apply(tiny(family))(x).logits, ref)
    assert not torch.allclose(QuantSetting(4, 8, 4).apply(tiny(family))(x).logits, ref, atol=1e-3)


def kv_outputs(model, x):
    """k_proj and v_proj outputs of layer 0, as the attention receives them."""
    seen = {}
    attn = model.model.layers[0].self_attn
    hooks = [getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
             for n in ("k_proj", "v_proj")]
    model(x)
    for h in hooks:
        h.remove()
    return attn, seen


def test_kv_cache_quantized_per_token_before_rope():
    model, x = QuantSetting(32, 32, 4).apply(tiny(FAMILIES[0])), tokens()
    attn, seen = kv_outputs(model, x)
    for name in ("k_proj", "v_proj"):
        inp, out = seen[name]
        full = nn.functional.linear(inp, getattr(attn, name).weight)
        torch.testing.assert_close(out, SymQuantizer.apply(full, (-2.0, 2.0), 4, False))
        steps = out * ((7 / (full.abs().amax(-1, keepdim=True) + 1e-6)) + 1e-6)  # integers in [-7, 7]
        torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
        assert steps.abs().max() <= 7 + 1e-4


def test_kv_post_rope_quantizes_keys_after_rope(monkeypatch):
    import models.kv_cache as qm
    x = tokens()
    pre = QuantSetting(32, 32, 4).apply(tiny(FAMILIES[0]))
    post = QuantSetting(32, 32, 4, kv_post_rope=True).apply(tiny(FAMILIES[0]))
    assert post.model.layers[0].self_attn.k_proj.out_bits == 32
    assert post.config._attn_implementation.startswith("llmqat_kv_post_rope|")
    seen = []
    monkeypatch.setattr(qm, "quantize_kv", lambda states, bits: seen.append(states) or quantize_kv(states, bits))
    attn, raw = kv_outputs(post, x)
    key = seen[0]  # layer 0's keys as the attention function received them: [batch, kv_heads, seq, head_dim]
    raw_key = raw["k_proj"][1].view(2, 12, 2, 8).transpose(1, 2)
    torch.testing.assert_close(key[:, :, 0], raw_key[:, :, 0])  # RoPE is the identity at position 0 ...
    assert not torch.allclose(key[:, :, 1:], raw_key[:, :, 1:])  # ... and rotates the later positions
    assert len(seen) == 2 * TINY["num_hidden_layers"]  # K and V of every layer, one forward
    assert not torch.allclose(post(x).logits, pre(x).logits, atol=1e-4)


def test_quantize_kv_groups_all_heads_of_a_token():
    states = torch.randn(1, 2, 3, 4)
    states[:, 1, 0] *= 100  # one head of token 0 dominates token 0's scale only
    q = quantize_kv(states, 4)
    flat_q = q.transpose(1, 2).reshape(1, 3, 8)
    torch.testing.assert_close(flat_q, SymQuantizer.apply(states.transpose(1, 2).reshape(1, 3, 8), (-2.0, 2.0), 4, False))


@pytest.mark.parametrize("post_rope", [False, True])
def test_save_and_load_rebuilds_the_quantized_model(tmp_path, post_rope):
    model, x = QuantSetting(4, 8, 4, kv_post_rope=post_rope).apply(tiny(FAMILIES[0])), tokens()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["w_bits"], config["a_bits"], config["kv_bits"]) == (4, 8, 4)
    loaded = load_model(str(tmp_path)).eval()
    assert type(loaded.model.layers[1].mlp.down_proj) is QuantizeLinear
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_load_fp_model_stays_fp(tmp_path):
    model = tiny(FAMILIES[0])
    model.save_pretrained(tmp_path)
    assert type(load_model(str(tmp_path)).model.layers[0].self_attn.q_proj) is nn.Linear


@pytest.mark.parametrize("bits,msg", [((4, 8, 9), "kv_bits=9 is not allowed; use 1-8, 16 or 32"),
                                      ((0, 8, 8), r"w_bits=0 \(ternary\) with w_quantizer=absmax"), ((-1, 8, 8), "w_bits=-1 is not allowed; use 1-8, 16 or 32"),
                                      ((4, 8, 1), "kv_bits=1 is not allowed"), ((4, 12, 8), "a_bits=12"),
                                      ((4.0, 8, 8), "w_bits=4.0")])
def test_bad_bits_are_rejected_once_with_one_message(bits, msg):
    with pytest.raises(InputError, match=msg):
        QuantSetting(*bits)
    with pytest.raises(InputError, match="kv_bits=x is not allowed"):
        QuantSetting.of("4", "8", "x")
    assert QuantSetting.of("4", "8", "4") == QuantSetting(4, 8, 4)


def test_quant_setting_names_labels_and_config_round_trip():
    s = QuantSetting(4, 8, 4)
    assert (s.name, s.label, s.bits, s.is_float) == ("W4A8KV4", "4-8-4", (4, 8, 4), False)
    assert QuantSetting.parse("4-8-4") == QuantSetting.parse("W4A8KV4") == s and QuantSetting().is_float
    with pytest.raises(InputError, match="'4-8': write W-A-KV as 4-8-4 or W4A8KV4"):
        QuantSetting.parse("4-8")
    config = LlamaConfig(**TINY)
    assert QuantSetting.from_config(config) is None
    QuantSetting(4, 8, 4, kv_post_rope=True).write_config(config)
    assert QuantSetting.from_config(config) == QuantSetting(4, 8, 4, True)
    model = s.apply(tiny(FAMILIES[0]))
    assert QuantSetting.from_config(model.config) == s
    q = model.model.layers[0].self_attn
    assert (q.k_proj.out_bits, q.v_proj.out_bits, q.q_proj.out_bits, q.q_proj.w_bits, q.q_proj.a_bits) == (4, 4, 32, 4, 8)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="not a local Hugging Face model directory"):
        load_model(str(tmp_path / "nope"))


def test_config_json_reads_widths_and_names_the_unreadable_file(tmp_path):
    """run_train.sh's check reads config.json as JSON (no transformers): the text model's width, nested or not,
    and the same one-line errors as read_config."""
    from models.config_file import config_json, text_hidden_size
    from models.quant_model import read_config
    from utils.constants import EMBEDDED_MODEL
    assert text_hidden_size(config_json(EMBEDDED_MODEL)) == read_config(EMBEDDED_MODEL).hidden_size == 256
    assert text_hidden_size({"text_config": {"hidden_size": 576}, "vision_config": {"hidden_size": 32}}) == 576
    assert text_hidden_size({"model_type": "x"}) == 0
    (tmp_path / "config.json").write_text("{ not json")
    for read in (config_json, read_config):
        with pytest.raises(InputError, match=r"cannot read its config.json \(Expecting property name"):
            read(tmp_path)
        with pytest.raises(InputError, match="not a local Hugging Face model directory"):
            read(tmp_path / "nope")


def test_the_launch_check_imports_torch_but_not_transformers():
    """run_train.sh checks the bits and the model's width before it launches train.py; that check stays at
    torch's import time (transformers and accelerate add seconds per launch)."""
    import subprocess
    import sys
    code = ("import sys, models.setting, models.config_file, models.dtypes, utils.errors; "
            "print(sorted(m for m in ('transformers', 'accelerate', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
    assert "models.setting import QuantSetting" in (REPO_PATH / "run_train.sh").read_text()


@pytest.mark.parametrize("tied", [False, True])
def test_empty_load_has_the_structure_and_buffers_but_reads_no_weights(tmp_path, tied):
    """FSDP ranks != 0 (load_model(empty=True)): same names, shapes, quantized layers and buffers as a real
    load, real CPU storage for every parameter (accelerate maps the optimizer by data_ptr), ties kept."""
    torch.manual_seed(0)
    QuantSetting(4, 8, 4).apply(Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=tied))).save_pretrained(tmp_path)
    real, empty = load_model(str(tmp_path)), load_model(str(tmp_path), empty=True)
    assert [(n, p.shape, p.dtype) for n, p in real.named_parameters()] == \
           [(n, p.shape, p.dtype) for n, p in empty.named_parameters()]
    assert all(p.device.type == "cpu" for p in empty.parameters())
    assert len({p.data_ptr() for p in empty.parameters()}) == len(list(empty.parameters()))
    assert type(empty.model.layers[0].mlp.down_proj) is QuantizeLinear and empty.config.kv_bits == 4
    assert (empty.lm_head.weight is empty.model.embed_tokens.weight) == tied
    real_buffers = dict(real.named_buffers())
    assert all(torch.equal(b, real_buffers[n]) for n, b in empty.named_buffers())  # e.g. RoPE inv_freq
