"""export.py --format gguf: the QAT grid in Q4_0 / Q8_0 blocks, read back with gguf's reader (types, shapes,
metadata, dequantized weights at every width 1-8 and with groups), the two tokenizers, bad input; and, when
llama-cpp-python is installed, llama.cpp itself (logits and tokens against ours)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from models.export_gguf import MAX_REL_WEIGHT_ERR, export_gguf, expected_weights
from models.gguf_writer import grid_blocks
from models.quant_model import QuantSetting, load_model
from models.utils_quant import weight_grid

from conftest import REPO_PATH, TIMEOUT, run_cli

SMALL = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
SPM = REPO_PATH / "assets" / "tiny_llama"


def qat_dir(path, setting, tokenizer_dir=SPM, tie=False, config=SMALL):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=tie))
    setting.apply(model).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def field(reader, key):
    return reader.fields[key].contents()


def test_q4_0_and_q8_0_blocks_by_hand():
    w = torch.zeros(1, 32)
    w[0, :16], w[0, 16:] = torch.linspace(-0.7, 0.7, 16), 0.35  # max 0.7: scale 0.1, codes -7..7 and 3
    grid = weight_grid(w, 4)
    blocks = grid_blocks(grid)
    assert blocks.shape == (1, 18)  # fp16 d, then 16 bytes: weight j in the low nibble, weight j + 16 in the high
    assert blocks[0, :2].view(np.float16)[0] == np.float16(grid.scale.item())
    low, high = blocks[0, 2:] & 0xF, blocks[0, 2:] >> 4
    assert (low.astype(int) - 8).tolist() == grid.codes[0, :16].tolist()
    assert (high.astype(int) - 8).tolist() == grid.codes[0, 16:].tolist() == [3] * 16  # 0.35 * s = 3.49998
    grid8 = weight_grid(w, 8)
    blocks8 = grid_blocks(grid8)
    assert blocks8.shape == (1, 34) and blocks8[0, 2:].view(np.int8).tolist() == grid8.codes[0].tolist()
    two = weight_grid(torch.tensor([[0.1, -0.1, 0.3, -0.3] * 8]), 2)  # levels (2 code + 1) * scale / 2
    v = (grid_blocks(two)[0, 2:] & 0xF).astype(int) - 8
    assert set(v.tolist()) <= {-3, -1, 1, 3} and grid_blocks(two)[0, :2].view(np.float16)[0] == np.float16(
        two.scale.item() / 2)


@pytest.mark.parametrize("bits,group", [(b, None) for b in range(1, 9)] + [(4, 32), (8, 64), (2, 32)])
def test_gguf_reads_back_as_the_qat_weights(tmp_path, bits, group):
    setting = QuantSetting(bits, 8, 4, w_group_size=group)
    src = qat_dir(tmp_path / "qat", setting)
    report = export_gguf(src, tmp_path / "out")
    assert report.path == tmp_path / "out" / f"{setting.name}.gguf" and report.max_rel_weight_err <= MAX_REL_WEIGHT_ERR
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [report.path.name]
    reader = GGUFReader(str(report.path))
    tensors = {t.name: t for t in reader.tensors}
    qtype = GGMLQuantizationType.Q4_0 if bits <= 4 else GGMLQuantizationType.Q8_0
    expected = expected_weights(load_model(str(src)))
    for name, ref in expected.items():
        t = tensors[name]
        assert t.tensor_type == qtype and list(t.shape) == list(ref.shape)[::-1], name  # ggml: fastest dim first
    assert tensors["token_embd.weight"].tensor_type == GGMLQuantizationType.F16
    assert tensors["output.weight"].tensor_type == GGMLQuantizationType.F16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    # the error is the fp16 rounding of each block's scale, no more: exactly codes * (fp16(d) - d)
    from gguf.quants import dequantize
    q = tensors["blk.1.ffn_down.weight"]
    got = torch.from_numpy(np.array(dequantize(q.data, q.tensor_type))).reshape(64, 128)
    ref = expected["blk.1.ffn_down.weight"]
    rel = ((got - ref).abs() / ref.abs().clamp_min(1e-30))[ref != 0]
    assert 0 < rel.max() <= 2 ** -11 * 1.01 and torch.equal(got == 0, ref == 0)
    assert field(reader, "general.architecture") == "llama" and field(reader, "llama.block_count") == 2
    assert (field(reader, "llama.attention.head_count"), field(reader, "llama.attention.head_count_kv")) == (4, 2)
    assert field(reader, "llama.context_length") == 128 and field(reader, "llama.rope.freq_base") == 10000.0
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)


def test_sentencepiece_tokenizer_is_written_as_llama_with_its_piece_order(tmp_path):
    import sentencepiece
    report = export_gguf(qat_dir(tmp_path / "qat", QuantSetting(4, 8, 4)), tmp_path / "out")
    reader = GGUFReader(str(report.path))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(SPM / "tokenizer.model"))
    tokens, scores = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.scores")
    types = field(reader, "tokenizer.ggml.token_type")
    assert field(reader, "tokenizer.ggml.model") == "llama" and len(tokens) == sp.get_piece_size() == 2048
    assert tokens == [sp.id_to_piece(i) for i in range(2048)]
    assert types[:4] == [2, 3, 3, 6] and types.count(6) == 256  # unk, <s>, </s>, bytes
    normal = [i for i in range(2048) if types[i] == 1]
    assert len({sp.get_score(i) - scores[i] for i in normal}) == 1  # sentencepiece's scores, shifted
    assert field(reader, "tokenizer.ggml.add_bos_token") is True and field(reader, "tokenizer.ggml.bos_token_id") == 1


def test_byte_level_bpe_tokenizer_and_tied_embeddings(tmp_path, bpe_model_dir):
    report = export_gguf(qat_dir(tmp_path / "qat", QuantSetting(4, 8, 4), tokenizer_dir=bpe_model_dir, tie=True,
                                 config={**SMALL, "vocab_size": AutoTokenizer.from_pretrained(bpe_model_dir).vocab_size}),
                         tmp_path / "out")
    reader = GGUFReader(str(report.path))
    assert "output.weight" not in {t.name for t in reader.tensors}  # llama.cpp uses token_embd for both
    assert (field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre")) == ("gpt2", "gpt-2")
    merges = json.loads((bpe_model_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert len(field(reader, "tokenizer.ggml.merges")) == len(merges)


def test_bad_inputs_one_error_line_no_file(tmp_path):
    export_py = [sys.executable, str(REPO_PATH / "export.py")]
    fp = tmp_path / "fp"
    LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(fp)
    qwen = tmp_path / "qwen"
    QuantSetting(4, 8, 4).apply(Qwen2ForCausalLM(Qwen2Config(**SMALL))).save_pretrained(qwen)
    AutoTokenizer.from_pretrained(SPM).save_pretrained(qwen)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    cases = [(fp, tmp_path / "o1", "is not a QAT checkpoint"), (qwen, tmp_path / "o2", "writes LLaMA-architecture"),
             (qat_dir(tmp_path / "qat", QuantSetting(4, 8, 4)), busy, "exists and is not empty")]
    import export as cli  # in-process: export.py's main exits with the one error line (SystemExit's message)
    for src, out, message in cases:
        with pytest.raises(SystemExit) as e:
            cli.main([str(src), str(out), "--format", "gguf"])
        assert str(e.value.code).startswith("error: ") and message in str(e.value.code) and "\n" not in str(e.value.code)
    proc = run_cli(export_py + [str(fp), str(tmp_path / "o1"), "--format", "gguf"], cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: ")  # exit 1 for real
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_cli_last_line(tmp_path):
    proc = run_cli([sys.executable, str(REPO_PATH / "export.py"), str(qat_dir(tmp_path / "qat", QuantSetting(3, 8, 8))),
                    str(tmp_path / "out"), "--format", "gguf"], cwd=tmp_path)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("max_rel_weight_err ") and float(last.split()[1]) <= MAX_REL_WEIGHT_ERR




def test_llama_cpp_runs_the_gguf_with_our_logits_and_tokens(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (a ~30 min source build: see "
                        "docs/export.md); this check runs where it is")
    out = subprocess.run([sys.executable, str(REPO_PATH / "benchmarks" / "llama_cpp_check.py"), "--quick",
                          "--work_dir", str(tmp_path)], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1].split(" ", 1)[1])
    assert result["tokens_equal"] and result["max_logit_diff_rel"] < 0.05
