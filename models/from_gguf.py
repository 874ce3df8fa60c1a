"""A GGUF checkpoint -> a Hugging Face model directory (safetensors, tokenizer, generation_config).

transformers reads GGUF itself (`from_pretrained(dir, gguf_file=...)`, dequantized to float), but the object
it returns refuses `save_pretrained` ("quantized with gguf"); a model built from the same config without the
GGUF marker, given the same state dict, saves normally. Tied embeddings stay tied (one tensor on disk).
"""
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig


def gguf_to_hf(gguf_path, out_dir):
    """Write the HF directory of the model in `gguf_path` (float32 weights) into `out_dir` (must not exist)."""
    directory, name = os.path.split(os.path.abspath(gguf_path))
    source = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    config = source.config
    if hasattr(config, "quantization_config"):  # the GGUF marker; the weights are already float
        del config.quantization_config
    config._name_or_path = ""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(source.state_dict(), assign=True)
    model.tie_weights()
    if config.tie_word_embeddings and model.lm_head.weight is not model.get_input_embeddings().weight:
        raise RuntimeError(f"{gguf_path}: tied embeddings came out untied")
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(out_dir)
    return out_dir
