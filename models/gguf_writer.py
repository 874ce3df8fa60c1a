"""Write a Hugging Face LLaMA-architecture model as a GGUF file (float tensors), with its byte-level BPE
tokenizer: the inverse of models/from_gguf.py, written with the `gguf` package's GGUFWriter.

Layout (the names and metadata llama.cpp and transformers read): `llama.*` architecture keys, the
tokenizer as `tokenizer.ggml.*` (model "gpt2": tokens, token types, merges, special ids), tensors named
token_embd / blk.N.attn_q ... / output_norm / output (omitted when the embeddings are tied). The q and k
projections are stored with the row order GGUF's LLaMA uses for rotary pairs (interleaved halves per head).
"""
import json

import numpy as np
import torch

TENSOR_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def rotary_rows(weight, heads):
    """HF's rotate-half row order -> GGUF's interleaved row order, per head."""
    out, cols = weight.shape
    return weight.reshape(heads, 2, out // heads // 2, cols).swapaxes(1, 2).reshape(out, cols)


def tokenizer_metadata(writer, tokenizer):
    """A byte-level BPE tokenizer (tokenizer.json) as tokenizer.ggml.* keys."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"tokenizer model {spec['model']['type']!r}: only byte-level BPE is written here")
    vocab = tokenizer.get_vocab()
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    special = set(tokenizer.all_special_ids) | {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control, 1: normal
    writer.add_token_merges(merges)
    for name, i in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                    ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if i is not None:
            getattr(writer, f"add_{name}_token_id")(i)
    writer.add_add_bos_token(False)


def write_gguf(model, tokenizer, path, dtype=np.float32):
    """Write `model` (LlamaForCausalLM) and `tokenizer` to `path` with float tensors of `dtype`."""
    from gguf import GGUFWriter
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
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tokenizer_metadata(writer, tokenizer)

    def add(name, tensor):
        writer.add_tensor(name, tensor.detach().float().cpu().numpy().astype(dtype if tensor.dim() > 1 else np.float32))

    with torch.no_grad():
        add("token_embd.weight", model.get_input_embeddings().weight)
        for n, layer in enumerate(model.model.layers):
            for hf_name, gguf_name in TENSOR_NAMES.items():
                weight = layer.get_submodule(hf_name).weight
                if hf_name == "self_attn.q_proj":
                    weight = rotary_rows(weight, heads)
                elif hf_name == "self_attn.k_proj":
                    weight = rotary_rows(weight, kv_heads)
                add(f"blk.{n}.{gguf_name}.weight", weight)
        add("output_norm.weight", model.model.norm.weight)
        if not cfg.tie_word_embeddings:
            add("output.weight", model.lm_head.weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
