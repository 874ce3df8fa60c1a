"""Turn a stock HF causal LM into its LLM-QAT fake-quantized form, and load one back.

No model file is forked: every nn.Linear inside the decoder layers is swapped for a QuantizeLinear
sharing the same parameters, so LLaMA-1/2/3, Mistral and Qwen2 (grouped-query attention) all work.
Embeddings and lm_head stay full precision; the attention matmuls are not quantized.

KV cache: by default the outputs of k_proj / v_proj are quantized per token across all heads,
before rotary embedding (the paper). `kv_post_rope=True` quantizes keys after RoPE instead, as
serving engines cache them, through a registered attention function.
"""
import logging
import sys

import torch
import torch.nn as nn
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from models.utils_quant import CLIP_VAL, QuantizeLinear, SymQuantizer

logger = logging.getLogger(__name__)

ALLOWED_BITS = tuple(range(1, 9)) + (16, 32)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KV_MODULES = ("k_proj", "v_proj")
POST_ROPE_PREFIX = "llmqat_kv_post_rope|"


def check_bits(w_bits, a_bits, kv_bits):
    """Raise one clear error for a bit width the method does not define."""
    for name, bits in (("w_bits", w_bits), ("a_bits", a_bits), ("kv_bits", kv_bits)):
        if bits not in ALLOWED_BITS:
            raise ValueError(f"{name}={bits} is not allowed; use 1-8, 16 or 32")
    if kv_bits == 1:
        raise ValueError("kv_bits=1 is not allowed: symmetric 1-bit quantization has no nonzero level; use 2-8, 16 or 32")
    if a_bits <= 2:
        logger.warning("a_bits=%d: activations are not quantized below 3 bits (as in the paper)", a_bits)


def decoder_layers(model):
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder `layers`; only LLaMA-style decoders are supported")
    return layers


def _to_quantize_linear(linear, **bits):
    q = QuantizeLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                       device="meta", **bits)
    q.weight, q.bias = linear.weight, linear.bias  # share parameters: no copy, same state_dict keys
    return q


def quantize_model(model, w_bits=32, a_bits=32, kv_bits=32, kv_post_rope=False):
    """Replace every decoder nn.Linear with QuantizeLinear in place; record the bits in model.config."""
    check_bits(w_bits, a_bits, kv_bits)
    for layer in decoder_layers(model):
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    out_bits = kv_bits if name in KV_MODULES and not kv_post_rope else 32
                    setattr(parent, name, _to_quantize_linear(child, w_bits=w_bits, a_bits=a_bits, out_bits=out_bits))
    model.config.w_bits, model.config.a_bits, model.config.kv_bits = w_bits, a_bits, kv_bits
    model.config.kv_post_rope = kv_post_rope
    if kv_post_rope and kv_bits < 32:
        _use_post_rope_kv_attention(model)
    return model


def quantize_kv(states, kv_bits):
    """Quantize [batch, heads, seq, head_dim] keys/values per token across all heads together."""
    b, h, s, d = states.shape
    flat = states.transpose(1, 2).reshape(b, s, h * d)
    return SymQuantizer.apply(flat, CLIP_VAL, kv_bits, False).reshape(b, s, h, d).transpose(1, 2)


def _post_rope_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention that sees keys after RoPE: quantize K and V, then run the model's own attention."""
    impl = module.config._attn_implementation.removeprefix(POST_ROPE_PREFIX)
    if impl == "eager":  # eager attention lives in each model's own modeling file
        attention = sys.modules[type(module).__module__].eager_attention_forward
    else:
        attention = AttentionInterface._global_mapping[impl]
    bits = module.config.kv_bits
    return attention(module, query, quantize_kv(key, bits), quantize_kv(value, bits), attention_mask, **kwargs)


def _use_post_rope_kv_attention(model):
    base = model.config._attn_implementation or "sdpa"
    if base.startswith(POST_ROPE_PREFIX):
        return
    if base != "eager" and base not in AttentionInterface._global_mapping:
        raise ValueError(f"kv_post_rope cannot wrap attention implementation {base!r}; use 'sdpa' or 'eager'")
    name = POST_ROPE_PREFIX + base
    AttentionInterface.register(name, _post_rope_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.config._attn_implementation_internal = name


def cpu_has_bf16():
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16): there bf16 matmuls run ~4x fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# On CPU, bf16 pays only where the matmuls are large: bf16/fp32 QAT step time measured on this 2-core CPU,
# 1.7x faster on SmolLM2 (hidden 576), 3.5x slower on the embedded model (hidden 256).
CPU_BF16_MIN_HIDDEN = 512


def bf16_pays(config=None):
    """Whether bf16 compute is the better default: a GPU with bf16, or a CPU with native bf16 matmuls and a
    model at least CPU_BF16_MIN_HIDDEN wide (config None: any model)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    hidden = getattr(config.get_text_config(), "hidden_size", 0) if config is not None else CPU_BF16_MIN_HIDDEN
    return cpu_has_bf16() and hidden >= CPU_BF16_MIN_HIDDEN


def resolve_dtype(name, config=None):
    """A --dtype choice: "auto" is bfloat16 where bf16_pays(config) (a GPU; on CPU, generation only: pass the
    model's config), else float32. Any other name stays."""
    if name == "auto":
        if torch.cuda.is_available():
            return "bfloat16"
        return "bfloat16" if config is not None and bf16_pays(config) else "float32"
    return name


def _allocate_parameters(model):
    """Give meta parameters uninitialized CPU storage: no RAM is used until written (untouched pages), but
    each has its own data_ptr, by which accelerate maps the optimizer onto FSDP's sharded parameters."""
    allocated = {}  # id -> new parameter, so tied weights stay tied
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in allocated:
                    allocated[id(p)] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
                module._parameters[name] = allocated[id(p)]


def is_quantized_config(config):
    return all(hasattr(config, k) for k in ("w_bits", "a_bits", "kv_bits"))


def load_model(path, dtype=torch.float32, empty=False, **kwargs):
    """Load an HF causal LM; if its config carries w_bits/a_bits/kv_bits, rebuild the quantized model.

    empty=True builds the same model without reading its weights (uninitialized parameters, real buffers):
    for FSDP ranks whose weights are broadcast from rank 0."""
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise FileNotFoundError(f"model path {path!r} is not a Hugging Face model directory (no config.json)") from e
    if hasattr(config, "llmqat_export"):  # packed integer weights written by export.py
        from models.export import load_exported
        return load_exported(path)
    if empty:
        from accelerate import init_empty_weights
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
        model.tie_weights()  # as from_pretrained does; _allocate_parameters keeps tied weights tied
        _allocate_parameters(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **kwargs)
    if is_quantized_config(config):
        quantize_model(model, config.w_bits, config.a_bits, config.kv_bits, getattr(config, "kv_post_rope", False))
    return model
