"""KV-cache quantization after RoPE (kv_post_rope=True), as serving engines cache keys.

The paper quantizes the outputs of k_proj / v_proj (before RoPE: QuantizeLinear's out_bits). After RoPE there
is no module to swap: a registered attention function quantizes K and V, then runs the model's own attention.
"""
import sys

from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from models.utils_quant import CLIP_VAL, SymQuantizer

POST_ROPE_PREFIX = "llmqat_kv_post_rope|"


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
        attention = ALL_ATTENTION_FUNCTIONS[impl]
    bits = module.config.kv_bits
    return attention(module, query, quantize_kv(key, bits), quantize_kv(value, bits), attention_mask, **kwargs)


def use_post_rope_kv_attention(model):
    """Route the model's attention through _post_rope_attention (keys and values quantized after RoPE)."""
    base = model.config._attn_implementation or "sdpa"
    if base.startswith(POST_ROPE_PREFIX):
        return
    if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"kv_post_rope cannot wrap attention implementation {base!r}; use 'sdpa' or 'eager'")
    name = POST_ROPE_PREFIX + base
    AttentionInterface.register(name, _post_rope_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.set_attn_implementation(name)
