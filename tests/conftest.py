"""Shared fixtures: a tiny model of SmolLM2's shape family (byte-level BPE, tied embeddings, GQA 3:1)."""
import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2_CACHED = os.path.isfile(os.path.expanduser("~/.cache/llm-qat/models/smollm2/model.safetensors"))


def make_bpe_tokenizer(vocab_size=320):
    """A byte-level BPE tokenizer trained on the embedded Shakespeare, special tokens as SmolLM2's (0-2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from utils.data import read_texts
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = read_texts(os.path.join(REPO, "assets", "data", "shakespeare_train_small.jsonl"))
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")


def make_bpe_llama(tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the init, so quantization and training visibly matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(scope="session")
def bpe_model_dir(tmp_path_factory):
    """A saved tiny LLaMA with SmolLM2's traits: byte-level BPE, tied embeddings, 6 query / 2 key-value heads."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    path = tmp_path_factory.mktemp("bpe_llama") / "model"
    tokenizer = make_bpe_tokenizer()
    model = make_bpe_llama(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
