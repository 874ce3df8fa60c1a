"""Write a Hugging Face LLaMA-architecture model as a GGUF file, the format llama.cpp runs, with the `gguf`
package's GGUFWriter: float tensors, or (for a QAT model) its decoder linears as Q4_0 / Q8_0 blocks that hold
the QAT grid exactly up to the fp16 block scale. The inverse of models/from_gguf.py for float models.

Layout (the names and metadata llama.cpp and transformers read): `llama.*` architecture keys, the tokenizer
as `tokenizer.ggml.*` (byte-level BPE as model "gpt2", sentencepiece as model "llama"), tensors named
token_embd / blk.N.attn_q ... / output_norm / output (omitted when the embeddings are tied). The q and k
projections are stored with the row order GGUF's LLaMA uses for rotary pairs (interleaved halves per head).

Blocks (ggml's, 32 weights each, w = v * d with d an fp16 scale): Q4_0 stores v + 8 in 4 bits (v in -8..7;
byte j of a block holds weights j and j + 16), Q8_0 stores v as int8. The QAT grid fits them exactly:
>= 3 bits w = code * scale (v = code: Q4_0 up to 4 bits, Q8_0 for 5-8); 1 and 2 bits w = (code + 1/2) * scale
= (2 code + 1) * scale / 2 (v in {-1, 1} or {-3, -1, 1, 3}, d = scale / 2). A block needs one scale: per
channel, or groups of a multiple of 32 columns. A linear whose width is not a multiple of 32 is written as F32
(its fake-quant weight, exactly).
"""
import json
import re

import numpy as np
import torch

from models.utils_quant import has_codes


TENSOR_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
BLOCK = 32  # weights per Q4_0 / Q8_0 block
BYTE = re.compile(r"<0x[0-9A-F]{2}>")  # sentencepiece's byte-fallback pieces


def rotary_rows(weight, heads):
    """HF's rotate-half row order -> GGUF's interleaved row order, per head (any [out, ...] tensor)."""
    out = weight.shape[0]
    return weight.reshape(heads, 2, out // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def block_type(bits):
    """The GGUF block type that holds a b-bit weight grid."""
    from gguf import GGMLQuantizationType
    return GGMLQuantizationType.Q4_0 if bits <= 4 else GGMLQuantizationType.Q8_0


def fits_blocks(linear):
    """Whether a QuantizeLinear's grid has one scale per block of 32 weights (else it is written as F32)."""
    group = linear.w_group_size
    return has_codes(linear.w_bits) and linear.in_features % BLOCK == 0 and (not group or group % BLOCK == 0)


def grid_blocks(grid):
    """A WeightGrid [out, in] as ggml blocks: uint8 [out, in / 32 * block bytes] of its block_type."""
    codes, scale = grid.codes.long(), grid.scale  # scale float64 [out, 1 or in / G]
    if 1 <= grid.bits <= 2:  # half-integer levels: w = (2 code + 1) * scale / 2 (ternary: w = code * scale)
        codes, scale = 2 * codes + 1, scale / 2
    out, n = codes.shape
    d = scale.repeat_interleave(n // scale.shape[1], dim=1)[:, ::BLOCK]  # one scale per block
    d16 = d.numpy().astype(np.float16).view(np.uint8).reshape(out, n // BLOCK, 2)
    v = codes.view(out, n // BLOCK, BLOCK)
    if grid.bits <= 4:
        u = (v + 8).to(torch.uint8)
        qs = (u[..., :BLOCK // 2] | (u[..., BLOCK // 2:] << 4)).numpy()
    else:
        qs = v.to(torch.int8).numpy().view(np.uint8)
    return np.concatenate([d16, qs], axis=-1).reshape(out, -1)


def vocab_list(tokenizer):
    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    return tokens


def tokenizer_metadata(writer, tokenizer):
    """The tokenizer (its tokenizer.json) as tokenizer.ggml.* keys: byte-level BPE as model "gpt2"; a
    sentencepiece BPE (Metaspace, byte fallback: LLaMA-1/2's) as model "llama", whose piece scores are the merge
    order (sentencepiece's BPE scores are minus the piece's rank, llama.cpp merges the highest score first)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec["model"], json.dumps(spec.get("pre_tokenizer"))
    tokens = vocab_list(tokenizer)
    special = set(tokenizer.all_special_ids) | {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    if model["type"] == "BPE" and model.get("byte_fallback") and "Metaspace" in pre:
        # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 6 byte
        types = [2 if i == tokenizer.unk_token_id else 3 if i in special else 6 if BYTE.fullmatch(t) else 1
                 for i, t in enumerate(tokens)]
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores([-float(i) if kind == 1 else 0.0 for i, kind in enumerate(types)])
        writer.add_token_types(types)
        writer.add_add_space_prefix(True)
    elif model["type"] == "BPE" and "ByteLevel" in pre:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")  # llama.cpp: GPT-2's split regex, which ByteLevel(use_regex) applies
        writer.add_token_list(tokens)
        writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control, 1: normal
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    else:
        raise ValueError(f"tokenizer model {model['type']!r} (pre-tokenizer {pre[:60]}): GGUF export writes "
                         "byte-level BPE or sentencepiece BPE tokenizers")
    for name, i in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                    ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if i is not None:
            getattr(writer, f"add_{name}_token_id")(i)
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(False)


def write_gguf(model, tokenizer, path, dtype=np.float32):
    """Write `model` (LlamaForCausalLM) and `tokenizer` to `path`: 2-d float tensors in `dtype`, norms in F32,
    and the decoder linears of a QAT model (QuantizeLinear with w_bits 1-8) as blocks of block_type. Returns
    {tensor name: GGUF type name}."""
    from gguf import GGUFWriter
    from models.utils_quant import QuantizeLinear
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer = GGUFWriter(str(path), "llama")
    writer.add_name(getattr(cfg, "_name_or_path", "") or "llm-qat")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tokenizer_metadata(writer, tokenizer)
    types = {}

    def add(name, tensor, rotary_heads=None):
        if isinstance(tensor, QuantizeLinear) and fits_blocks(tensor):
            grid = tensor.weight_grid()  # absmax's grid, or the learned scale's
            if rotary_heads:
                grid.codes, grid.scale = rotary_rows(grid.codes, rotary_heads), rotary_rows(grid.scale, rotary_heads)
            qtype = block_type(tensor.w_bits)
            writer.add_tensor(name, grid_blocks(grid), raw_dtype=qtype)
            types[name] = qtype.name
            return
        exact = isinstance(tensor, QuantizeLinear)  # a QAT grid that does not fit the blocks: F32, exactly
        if isinstance(tensor, torch.nn.Linear):
            tensor = tensor.quantized_weight() if exact else tensor.weight
            if rotary_heads:
                tensor = rotary_rows(tensor, rotary_heads)
        array = tensor.detach().float().cpu().numpy()
        array = array.astype(dtype if array.ndim > 1 and not exact else np.float32)
        writer.add_tensor(name, array)
        types[name] = "F16" if array.dtype == np.float16 else "F32"

    with torch.no_grad():
        add("token_embd.weight", model.get_input_embeddings().weight)
        for n, layer in enumerate(model.model.layers):
            for hf_name, gguf_name in TENSOR_NAMES.items():
                module = layer.get_submodule(hf_name)
                rotary = heads if hf_name == "self_attn.q_proj" else kv_heads if hf_name == "self_attn.k_proj" else None
                add(f"blk.{n}.{gguf_name}.weight", module if isinstance(module, torch.nn.Linear) else module.weight,
                    rotary)
        add("output_norm.weight", model.model.norm.weight)
        if not cfg.tie_word_embeddings:
            add("output.weight", model.lm_head.weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types
