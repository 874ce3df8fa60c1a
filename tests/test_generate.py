"""Data-free generation (generate_data.py, run_generate.sh) and the merge (merge_gen_data.py) on a tiny random model."""
import argparse
import glob
import inspect
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

import generate_data
import merge_gen_data
from utils.decode import Sampling, generate_batch
from utils.generate import load_generator as load_model, sequence_seed, shard_ids

from conftest import REPO, TIMEOUT  # noqa: E402
VOCAB, EOS = 384, 2
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in and out of process: same numerics


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer GQA LLaMA with its own sentencepiece BPE tokenizer (bos 1, eos 2)."""
    path = tmp_path_factory.mktemp("tiny_model")
    lines = [line for line in inspect.getsource(argparse).splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(path / "sp"), model_type="bpe", vocab_size=VOCAB,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=EOS, pad_id=-1, num_threads=1, minloglevel=2)
    kwargs = LlamaTokenizer.convert_to_native_format(vocab_file=str(path / "sp.model"))
    LlamaTokenizer(**kwargs, add_bos_token=True, add_eos_token=False).save_pretrained(path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=EOS))
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 2  # EOS now and then, so some sequences end early and leave their batch
    model.generation_config = GenerationConfig(do_sample=True, top_k=50, temperature=1.0, bos_token_id=1,
                                               eos_token_id=EOS)
    model.save_pretrained(path)
    return path


def shard_args(model, out_dir, *extra):
    """Shard 1 of 40 ids (40-79) x prefix lengths 3 4 5 = 120 sequences."""
    return ["1", "--model", str(model), "--out_dir", str(out_dir), "--n_vocab", "40", "--max_length", "48",
            "--batch_size", "16", *extra]


EXPECTED = {(i, j) for i in range(40, 80) for j in (3, 4, 5)}


def records(path):
    """{(start id, prefix length): text}; fails on a torn or repeated line."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    out = {}
    for line in data.splitlines():
        r = json.loads(line)
        key = (r["start_id"], r["prefix_length"])
        assert key not in out, f"duplicate {key}"
        out[key] = r["text"]
    return out


@pytest.fixture(scope="module")
def full_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    generate_data.main(shard_args(tiny_model, out))
    return out / "gen.chunk.01.jsonl"


def test_sampling_draws_from_the_tempered_top_k_top_p_softmax():
    n = 40000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]]).repeat(n, 1)
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(Sampling(temperature=2.0, top_k=3).sample(logits, u), minlength=6) / n
    expected = torch.zeros(6)
    expected[[5, 0, 1]] = (torch.tensor([3.0, 2.0, 1.0]) / 2).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.01), freq
    # top_p 0.85: the fewest most likely tokens holding 85% of the mass (here ids 5, 0, 1: 61%, 83%, 91%)
    freq = torch.bincount(Sampling(top_k=0, top_p=0.85).sample(logits, u), minlength=6) / n
    probs = logits[0].softmax(-1)
    expected = torch.zeros(6)
    expected[[5, 0, 1]] = probs[[5, 0, 1]] / probs[[5, 0, 1]].sum()
    assert torch.allclose(freq, expected, atol=0.01), freq


def test_prefix_is_greedy_then_sampled_until_eos_or_max_length(tiny_model):
    model = load_model(str(tiny_model), "float32")
    ids, max_length = list(range(3, 67)) * 2, 48
    prefix_lengths = [3] * 64 + [5] * 64  # one batch may mix prefix lengths
    seeds = [sequence_seed(0, i, j) for i, j in zip(ids, prefix_lengths)]
    seqs = dict(generate_batch(model, ids, prefix_lengths, max_length, Sampling(), seeds, [EOS]))
    assert sorted(seqs) == list(range(128))
    ended_early = full_length = sampled = 0
    for row, seq in seqs.items():
        i, j = ids[row], prefix_lengths[row]
        greedy = model.generate(torch.tensor([[i]]), do_sample=False, max_length=max_length)[0].tolist()
        assert seq[:j] == greedy[:j], (i, j)  # the argmax continuation (shorter only if it ends at EOS)
        assert EOS not in seq[1:-1]
        if seq[-1] == EOS:
            ended_early += 1
        else:
            assert len(seq) == max_length
            full_length += 1
        if len(seq) > j + 2:
            sampled += 1
            assert seq[j:j + 3] != greedy[j:j + 3], (i, j)  # then sampled: 3 argmax tokens in a row are rare
    assert ended_early > 10 and full_length > 10 and sampled > 80  # rows left their batch early, and at the end


def test_shard_has_every_start_id_and_prefix_length_once(full_run, capsys):
    assert set(records(full_run)) == EXPECTED  # 3 prefix lengths x 40 ids, no more, no less
    assert json.load(open(full_run.with_name("gen.chunk.01.meta.json")))["num_sequences"] == 120


def test_rerun_of_a_finished_shard_writes_nothing(tiny_model, full_run, capsys):
    before = full_run.read_bytes(), os.stat(full_run).st_mtime_ns
    generate_data.main(shard_args(tiny_model, full_run.parent))
    assert (full_run.read_bytes(), os.stat(full_run).st_mtime_ns) == before
    assert "complete, all 120 sequences" in capsys.readouterr().out


def test_same_seed_same_texts_other_seed_other_texts(tiny_model, full_run, tmp_path, capsys):
    generate_data.main(shard_args(tiny_model, tmp_path / "seed1", "--seed", "1"))
    assert re.search(r"shard 01: 120 sequences, \d+ tokens in [\d.]+ s", capsys.readouterr().out)
    a, b = records(full_run), records(tmp_path / "seed1" / "gen.chunk.01.jsonl")
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a) > 0.6 * len(a)  # equal only where EOS came within the greedy prefix
    generate_data.main(shard_args(tiny_model, tmp_path / "seed0"))
    assert records(tmp_path / "seed0" / "gen.chunk.01.jsonl") == a


def test_max_length_is_capped_to_the_model_context(tiny_model, tmp_path, caplog):
    with caplog.at_level("INFO"):
        generate_data.main(["0", "--model", str(tiny_model), "--out_dir", str(tmp_path), "--n_vocab", "8",
                            "--prefix_lengths", "3", "--max_length", "1000"])
    assert "--max_length 1000 capped to the model's max_position_embeddings 64" in caplog.text
    assert json.load(open(tmp_path / "gen.chunk.00.meta.json"))["max_length"] == 64
    assert len(records(tmp_path / "gen.chunk.00.jsonl")) == 8


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_shard(tiny_model, full_run, tmp_path):
    shard = tmp_path / "gen.chunk.01.jsonl"
    kill_at = os.path.join(REPO, "tests", "workers", "kill_at.py")  # SIGKILL before the 31st sequence is written
    proc = subprocess.run([sys.executable, kill_at, "append:31", "generate_data.py", *shard_args(tiny_model, tmp_path)],
                          cwd=REPO, env=ENV, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert shard.read_bytes().count(b"\n") == 30 < len(EXPECTED)  # really interrupted, mid-run
    generate_data.main(shard_args(tiny_model, tmp_path))
    assert records(shard) == records(full_run)  # same set, and even the same texts


def test_torn_last_line_is_dropped_and_its_sequences_regenerated(tiny_model, full_run, tmp_path, caplog):
    lines = full_run.read_bytes().splitlines(keepends=True)
    shard = tmp_path / "gen.chunk.01.jsonl"
    shard.write_bytes(b"".join(lines[:50]) + lines[50][:17])  # a write cut short by a kill
    shutil.copy(full_run.with_name("gen.chunk.01.meta.json"), tmp_path)
    with caplog.at_level("INFO"):
        generate_data.main(shard_args(tiny_model, tmp_path))
    assert "dropping a torn last line (17 bytes)" in caplog.text
    assert records(shard) == records(full_run)


def test_corrupt_line_inside_a_shard_is_an_error_naming_it(tiny_model, full_run, tmp_path):
    lines = full_run.read_bytes().splitlines(keepends=True)
    (tmp_path / "gen.chunk.01.jsonl").write_bytes(b"".join(lines[:5]) + b"{oops\n" + b"".join(lines[6:10]))
    with pytest.raises(SystemExit) as e:
        generate_data.main(shard_args(tiny_model, tmp_path))
    assert str(e.value.code).startswith(f"error: {tmp_path / 'gen.chunk.01.jsonl'}:6: ")


def test_prefix_1_is_pure_sampling_and_prefix_max_length_pure_greedy(tiny_model):
    """The paper's generation ablation: j = max_length never samples, j = 1 samples from the first new token."""
    model = load_model(str(tiny_model), "float32")
    ids, max_length = list(range(3, 35)), 24
    greedy = dict(generate_batch(model, ids, [max_length] * 32, max_length, Sampling(), range(32), [EOS]))
    sampled = dict(generate_batch(model, ids, [1] * 32, max_length, Sampling(), range(32), [EOS]))
    ref = model.generate(torch.tensor(ids)[:, None], do_sample=False, max_length=max_length).tolist()
    for row, i in enumerate(ids):
        assert greedy[row] == ref[row][:len(greedy[row])]  # generate() pads a finished row after its EOS
        assert len(greedy[row]) == max_length or greedy[row][-1] == EOS
    assert sum(sampled[row][1] != ref[row][1] for row in range(32)) > 8  # argmax of the 2nd token is often not drawn


@pytest.mark.parametrize("argv, names", [
    (["10", "--n_vocab", "40"], "shard 10: must be 0-9"),
    (["0", "--n_vocab", "0"], "--n_vocab 0"),
    (["4", "--num_shards", "4"], "shard 4: must be 0-3"),
    (["0", "--max_length", "32", "--prefix_lengths", "3", "33"], "--prefix_lengths 33: must be 1 <= j <= max_length 32"),
    (["0", "--max_length", "100", "--prefix_lengths", "65"], "--prefix_lengths 65: must be 1 <= j <= max_length 64"),
    (["0", "--batch_size", "0"], "--batch_size 0"),
])
def test_bad_arguments_one_error_line_nothing_written(tiny_model, tmp_path, argv, names):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        generate_data.main([argv[0], "--model", str(tiny_model), "--out_dir", str(out), *argv[1:]])
    message = str(e.value.code)
    assert message.startswith("error: ") and names in message and "\n" not in message
    assert not out.exists()


def test_missing_model_exits_1_with_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "generate_data.py", "0", "--model", str(tmp_path / "nope"), "--out_dir",
                           str(tmp_path / "out")], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: model {str(tmp_path / 'nope')!r}: no such directory (a model is a local " \
                                  "Hugging Face directory with config.json, or a packaged name: smollm2)"
    assert not (tmp_path / "out").exists()


def test_shard_slices_cover_the_vocabulary_once():
    assert list(shard_ids(63, 32000)) == list(range(31500, 32000))  # the original's 64 x 500
    assert list(shard_ids(2, 1000, n_vocab=400)) == list(range(800, 1000))  # clipped
    slices = [list(shard_ids(i, 2048, num_shards=3)) for i in range(3)]
    assert sum(slices, []) == list(range(2048)) and {len(s) for s in slices} == {682, 683}


def test_launcher_runs_every_shard_and_reports_failures(tiny_model, tmp_path):
    def launch(*args):
        return subprocess.run(["sh", "run_generate.sh", *args, "--model", str(tiny_model), "--max_length", "8",
                               "--prefix_lengths", "3"], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT,
                              env={**ENV, "PYTHON": sys.executable, "LOG_DIR": str(tmp_path / "logs")})
    ok = launch("2", "--out_dir", str(tmp_path / "ok"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    ids = [r["start_id"] for s in (0, 1) for r in map(json.loads, open(tmp_path / "ok" / f"gen.chunk.{s:02d}.jsonl"))]
    assert sorted(ids) == list(range(VOCAB))  # --num_shards 2: the whole vocabulary, once
    bad = launch("2", "--out_dir", str(tmp_path / "bad"), "--n_vocab", str(VOCAB))  # shard 1 owns no ids
    assert bad.returncode == 1
    assert "error: shard(s) 1 failed" in bad.stderr and "shard 1 FAILED: error: shard 1: must be 0-0" in bad.stdout
    assert len(open(tmp_path / "bad" / "gen.chunk.00.jsonl").readlines()) == VOCAB


def test_nodes_run_their_slice_of_the_shards_and_the_merge_takes_the_union(tiny_model, tmp_path, capsys):
    """SHARDS=A-B, or each node's block from NNODES / NODE_RANK: two "machines" cover 4 shards once; the merge of
    both directories holds every start id; a shard in two places is refused; a missing block is named."""
    def launch(out, **env):
        return subprocess.run(["sh", "run_generate.sh", "4", "--model", str(tiny_model), "--max_length", "6",
                               "--prefix_lengths", "3", "--out_dir", str(out)], cwd=REPO, capture_output=True,
                              text=True, timeout=TIMEOUT, env={**ENV, "PYTHON": sys.executable,
                                                           "LOG_DIR": str(out / "logs"), **env})
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    a, b = launch(node0, SHARDS="0-1"), launch(node1, NNODES="2", NODE_RANK="1")
    assert a.returncode == b.returncode == 0, a.stdout + a.stderr + b.stdout + b.stderr
    assert "shard(s) 2-3 of 4 on CPU" in b.stdout and "shard(s) 2-3 of 4 done" in b.stdout
    assert sorted(os.path.basename(p) for p in glob.glob(f"{node0}/gen.chunk.*.jsonl")) == [
        "gen.chunk.00.jsonl", "gen.chunk.01.jsonl"]
    assert sorted(os.path.basename(p) for p in glob.glob(f"{node1}/gen.chunk.*.jsonl")) == [
        "gen.chunk.02.jsonl", "gen.chunk.03.jsonl"]
    ids = [r["start_id"] for d in (node0, node1) for p in sorted(glob.glob(f"{d}/gen.chunk.*.jsonl"))
           for r in map(json.loads, open(p))]
    assert sorted(ids) == list(range(VOCAB))
    out = tmp_path / "all.jsonl"
    assert len(merge(f"{node0},{node1}", out=out)) == VOCAB
    assert f"wrote {VOCAB} lines from 4 shards" in capsys.readouterr().out
    merge(str(node1), out=out)
    assert f"note: start ids 0-{VOCAB // 2 - 1} are in no shard" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        merge(f"{node0},{node0}", out=out)
    assert str(e.value.code).startswith(f"error: shard 0 is in two places: {node0}/gen.chunk.00.jsonl")
    for env, message in (({"SHARDS": "3-9"}, "error: SHARDS=3-9 is not allowed; use A-B or A with 0 <= A <= B < "
                                             "NUM_SHARDS=4"),
                         ({"NNODES": "2", "NODE_RANK": "x"}, "error: NODE_RANK=x is not allowed; use 0..1")):
        bad = launch(tmp_path / "bad", **env)
        assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [bad.stderr.strip()], bad.stderr
        assert bad.stderr.startswith(message), bad.stderr
    assert not glob.glob(f"{tmp_path}/bad/gen.chunk.*")


def write_shards(gen_dir, shards):
    gen_dir.mkdir(exist_ok=True)
    for shard, lines in shards.items():
        (gen_dir / f"gen.chunk.{shard:02d}.jsonl").write_text(
            "".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines))


def merge(gen_dir, *extra, out=None):
    out = out or os.path.join(gen_dir, "all_gen.jsonl")
    merge_gen_data.main(["--gen_dir", str(gen_dir), "--out", str(out), *extra])
    return [json.loads(line) for line in open(out)]


def test_merge_in_shard_order_idempotent_text_only(tmp_path, capsys):
    gen = tmp_path / "gen_data"
    write_shards(gen, {10: [{"text": "k", "start_id": 9}], 2: [{"text": "c"}, {"text": "a"}], 0: [{"text": "a"}]})
    assert merge(gen) == [{"text": "a"}, {"text": "c"}, {"text": "a"}, {"text": "k"}]  # shards 00, 02, 10
    assert "wrote 4 lines from 3 shards" in capsys.readouterr().out
    first = (gen / "all_gen.jsonl").read_bytes()
    merge(gen)  # the output sits in gen_dir, and is neither read as a shard nor appended to
    assert (gen / "all_gen.jsonl").read_bytes() == first
    assert merge(gen, "--dedup") == [{"text": "a"}, {"text": "c"}, {"text": "k"}]
    assert "1 duplicates dropped" in capsys.readouterr().out
    shuffled = merge(gen, "--shuffle", "--seed", "3")
    assert sorted(r["text"] for r in shuffled) == ["a", "a", "c", "k"]
    assert merge(gen, "--shuffle", "--seed", "3") == shuffled  # the seed decides the order
    assert sorted(os.listdir(gen)) == ["all_gen.jsonl", *(f"gen.chunk.{s}.jsonl" for s in ("00", "02", "10"))]


@pytest.mark.parametrize("bad_line, line_no", [("{not json\n", 2), ('{"text": 5}\n', 2), ('{"text": 5}', 3)])
def test_merge_bad_line_names_file_and_line_and_leaves_no_output(tmp_path, capsys, bad_line, line_no):
    gen = tmp_path / "gen_data"
    lines = [{"text": "a"}, bad_line, {"text": "b"}] if line_no == 2 else [{"text": "a"}, {"text": "b"}, bad_line]
    write_shards(gen, {0: [{"text": "x"}], 1: lines})
    out = tmp_path / "all.jsonl"
    with pytest.raises(SystemExit) as e:
        merge(gen, out=out)
    assert str(e.value.code).startswith(f"error: {gen / 'gen.chunk.01.jsonl'}:{line_no}: bad line")
    assert os.listdir(tmp_path) == ["gen_data"] and len(os.listdir(gen)) == 2  # no output, no temp file
    assert [r["text"] for r in merge(gen, "--skip_bad", out=out)] == ["x", "a", "b"]
    assert "1 bad lines skipped" in capsys.readouterr().out


def test_merge_skips_a_torn_last_line_and_keeps_a_whole_one_without_newline(tmp_path, caplog):
    gen = tmp_path / "gen_data"
    write_shards(gen, {0: [{"text": "a"}, '{"text": "torn'], 1: [{"text": "b"}, '{"text": "c"}']})
    assert merge(gen) == [{"text": "a"}, {"text": "b"}, {"text": "c"}]
    assert f"{gen / 'gen.chunk.00.jsonl'}:2: skipping an unfinished last line" in caplog.text


def test_merge_failure_keeps_the_previous_output(tmp_path):
    gen = tmp_path / "gen_data"
    write_shards(gen, {0: [{"text": "x"}]})
    merge(gen)
    write_shards(gen, {1: ["oops\n"]})
    proc = subprocess.run([sys.executable, "merge_gen_data.py", "--gen_dir", str(gen), "--out",
                           str(gen / "all_gen.jsonl")], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and f"{gen / 'gen.chunk.01.jsonl'}:1" in proc.stderr
    assert (gen / "all_gen.jsonl").read_text() == '{"text": "x"}\n'


def test_refilled_rows_decode_as_fresh_sequences(tiny_model):
    """Fewer rows than sequences: every ended row is refilled at once, the cache fills and is compacted
    (32 sequences of up to 24 tokens through 6 rows, a cache of 48 slots), and each sequence is still what
    it would be alone: pure greedy equals generate(do_sample=False); sampled texts equal the all-at-once run
    (fp32; in bf16 the rounding of a masked attention can differ and flip a draw)."""
    model = load_model(str(tiny_model), "float32")
    ids, max_length = list(range(3, 35)), 24
    ref = model.generate(torch.tensor(ids)[:, None], do_sample=False, max_length=max_length).tolist()
    greedy = dict(generate_batch(model, ids, [max_length] * 32, max_length, Sampling(), range(32), [EOS], 6))
    assert sorted(greedy) == list(range(32))
    for k in range(32):
        assert greedy[k] == ref[k][:len(greedy[k])]
    prefixes = [3, 4, 5, 1] * 8
    alone = dict(generate_batch(model, ids, prefixes, max_length, Sampling(), range(32), [EOS]))
    refilled = dict(generate_batch(model, ids, prefixes, max_length, Sampling(), range(32), [EOS], 5))
    assert all(alone[k] == refilled[k] for k in range(32))  # fp32: bit for bit here
