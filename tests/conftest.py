"""Shared test helpers: the repository, tiny models of each family (LLaMA, Mistral, Qwen2; and one of SmolLM2's
shape: byte-level BPE, tied embeddings, GQA 3:1), an offline environment and a CLI runner.

Markers: `slow` marks the end-to-end cases (launches, trainings, the reproduction): `pytest -m "not slow"` is
the quick inner loop; CI runs everything."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Two xdist workers on two cores (pytest.ini): one thread each, in every test process and every process a
# test launches (two 2-thread torch pools on 2 cores stall in each other's spin-waits).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

REPO_PATH = Path(__file__).resolve().parent.parent
REPO = str(REPO_PATH)
SMOLLM2_CACHED = os.path.isfile(os.path.expanduser("~/.cache/llm-qat/models/smollm2/model.safetensors"))
# no network: a test that would reach the Hugging Face hub fails at once instead of waiting on it
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
# families by name: conftest must not import transformers (it imports triton, which test_kernels.py must
# import first, in interpreter mode)
FAMILIES = [("LlamaConfig", "LlamaForCausalLM"), ("MistralConfig", "MistralForCausalLM"),
            ("Qwen2Config", "Qwen2ForCausalLM")]


def tiny(family, seed=0):
    """A randomly initialised tiny model of one family (names of its config and model classes)."""
    import transformers
    config_cls, model_cls = (getattr(transformers, name) for name in family)
    torch.manual_seed(seed)
    return model_cls(config_cls(**TINY)).eval()


def tokens():
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


# every subprocess's limit: CI's whole budget, so that a slow machine never fails a test (only a hung one would)
TIMEOUT = 5400


def run_cli(cmd, cwd=REPO, env=None, check=True, timeout=TIMEOUT):
    """Run a command as a user would (offline, this interpreter first on PATH); returns the CompletedProcess.
    check: fail the test with the command's output unless it exits 0."""
    full_env = {**os.environ, **OFFLINE, "PYTHON": sys.executable,
                "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# The longest files first (pytest.ini: --no-loadscope-reorder keeps this order): xdist hands whole files to its
# two workers in this order, and queues the next file on a worker with at most 2 tests pending, so the two
# single-fixture files start at once, each with a short file queued behind it, and the rest fill in around
# them (else one long file runs alone at the end).
LONGEST_FIRST = ("test_readme.py", "test_reproduce.py", "test_benchmarks.py", "test_io.py", "test_quantizers.py", "test_train.py",
                 "test_faults.py", "test_real_model.py", "test_generate.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


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


@pytest.fixture
def eager_attention_calls(monkeypatch):
    """A list that grows by one at every call of Hugging Face's eager attention (the Llama models')."""
    from transformers.models.llama import modeling_llama
    calls, eager = [], modeling_llama.eager_attention_forward
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", lambda *a, **k: calls.append(1) or eager(*a, **k))
    return calls


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    """Collection imports torch, the test modules and theirs, which live as long as the worker: imported as the
    scripts import (utils/startup.py), frozen after, the collector stops traversing them during every test (~8%
    of the in-process tests' time on one AMD EPYC core)."""
    from utils.startup import imports_without_gc
    with imports_without_gc():
        return (yield)
