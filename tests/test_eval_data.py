"""prepare_eval_data.py on tiny fake WikiText-2 / C4 files; never touches the network."""
import gzip
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare_eval_data
from utils import eval_data
from utils.data import load_blocks, read_texts

from conftest import REPO, TIMEOUT  # noqa: E402
SCRIPT = os.path.join(REPO, "prepare_eval_data.py")
# wiki.test.raw's shape: " = Title = " headings, blank lines " \n"; \u2028 must not split a row
RAW = " \n = Robert Boulter = \n \n Robert Boulter is an English actor .\u2028 He @-@ starred .\n \n = = Career = = \n"
ROWS = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English actor .\u2028 He @-@ starred .\n", "",
        " = = Career = = \n"]  # the rows the HF loader makes of RAW (its parquet on the hub holds these)
C4_DOCS = [f"Document {i}.\nSecond line of {i}." for i in range(1105)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def only_line(path):
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    assert len(lines) == 1 and lines[0].endswith("\n")
    return json.loads(lines[0])["text"]


def write_c4(path, docs, zipped=True):
    body = "".join(json.dumps({"text": d, "timestamp": "2019-04-25T12:57:54Z", "url": "https://x"}) + "\n" for d in docs)
    with (gzip.open(path, "wt", encoding="utf-8") if zipped else open(path, "w", encoding="utf-8")) as f:
        f.write(body)
    return str(path)


def run_script(*args, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def test_raw_rows_match_the_hf_loader(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_text(RAW, encoding="utf-8")
    assert eval_data.raw_rows(str(raw)) == ROWS


def test_script_writes_both_sets_to_the_current_dir_by_default(tmp_path):
    (tmp_path / "wiki.test.raw").write_text(RAW, encoding="utf-8")
    c4 = write_c4(tmp_path / "c4-validation.00000-of-00008.json.gz", C4_DOCS)
    r = run_script("--wikitext_file", "wiki.test.raw", "--c4_file", c4, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert only_line(tmp_path / "wiki2.jsonl") == "\n\n".join(ROWS)
    assert only_line(tmp_path / "c4.jsonl") == " ".join(C4_DOCS[:1100])  # GPTQ: ' '.join(valdata[:1100]['text'])
    joined_chars = len("\n\n".join(ROWS))
    assert f"wrote ./wiki2.jsonl: 1 line, {joined_chars} characters from 6 rows of wiki.test.raw" in r.stdout
    assert "from 1100 rows" in r.stdout
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


@pytest.mark.parametrize("kind", ["parquet", "arrow", "dir_raw", "dir_parquet"])
def test_hf_files_and_dirs_give_the_same_output_as_the_raw_file(tmp_path, kind):
    table = pa.table({"text": ROWS})
    if kind == "parquet":
        args = ["--wikitext_file", str(tmp_path / "test-00000-of-00001.parquet")]
        pq.write_table(table, args[1])
    elif kind == "arrow":  # what datasets keeps in its cache
        args = ["--wikitext_file", str(tmp_path / "wikitext-test.arrow")]
        with pa.OSFile(args[1], "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    elif kind == "dir_raw":  # the unzipped wikitext-2-raw-v1.zip
        (tmp_path / "wikitext-2-raw").mkdir()
        (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(RAW, encoding="utf-8")
        args = ["--wikitext_dir", str(tmp_path)]
    else:  # a snapshot of the hub dataset
        (tmp_path / "wikitext-2-raw-v1").mkdir()
        pq.write_table(table, tmp_path / "wikitext-2-raw-v1" / "test-00000-of-00001.parquet")
        args = ["--wikitext_dir", str(tmp_path)]
    prepare_eval_data.main([*args, "--which", "wiki2", "--out_dir", str(tmp_path / "out")])
    assert only_line(tmp_path / "out" / "wiki2.jsonl") == "\n\n".join(ROWS)
    assert not (tmp_path / "out" / "c4.jsonl").exists()


def test_c4_uncompressed_and_short(tmp_path, capsys):
    c4 = write_c4(tmp_path / "c4.json", C4_DOCS[:3], zipped=False)
    prepare_eval_data.main(["--which", "c4", "--c4_file", c4, "--out_dir", str(tmp_path)])
    assert only_line(tmp_path / "c4.jsonl") == " ".join(C4_DOCS[:3])
    assert "note: c4 has 3 documents, GPTQ uses the first 1100" in capsys.readouterr().out


def test_output_gives_the_gptq_token_windows(tmp_path):
    """One line -> BOS + tokens of the joined text, cut into the same consecutive windows as GPTQ's testenc."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(REPO, "assets", "tiny_llama"))
    (tmp_path / "wiki.test.raw").write_text(RAW * 20, encoding="utf-8")
    prepare_eval_data.main(["--which", "wiki2", "--wikitext_file", str(tmp_path / "wiki.test.raw"),
                            "--out_dir", str(tmp_path)])
    out = str(tmp_path / "wiki2.jsonl")
    assert read_texts(out) == ["\n\n".join(ROWS * 20)]
    testenc = tok("\n\n".join(ROWS * 20), return_tensors="pt").input_ids  # GPTQ, BOS included
    seqlen = 64
    blocks = load_blocks(out, tok, seqlen, what="eval").blocks
    n = testenc.numel() // seqlen
    assert n >= 2 and blocks.shape == (n, seqlen)
    assert blocks.tolist() == [testenc[0, i * seqlen:(i + 1) * seqlen].tolist() for i in range(n)]


def test_hub_path_rows(monkeypatch, tmp_path):
    """The hub branch with load_dataset stubbed by in-memory datasets (no network)."""
    import datasets
    calls = []

    def fake_load(*args, **kwargs):
        calls.append((args, kwargs))
        text = C4_DOCS if args[0] == "allenai/c4" else ROWS
        return datasets.Dataset.from_dict({"text": text})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(eval_data, "hub_unavailable", lambda ds: None)
    prepare_eval_data.main(["--out_dir", str(tmp_path)])
    assert only_line(tmp_path / "wiki2.jsonl") == "\n\n".join(ROWS)
    assert only_line(tmp_path / "c4.jsonl") == " ".join(C4_DOCS[:1100])
    assert calls == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"}),
                     (("allenai/c4",), {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                        "split": "validation"})]


def test_offline_without_files_is_one_quick_error_and_writes_nothing(tmp_path):
    r = run_script("--out_dir", "out", cwd=tmp_path)  # offline mode fails at once (no network wait)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: wiki2: no --wikitext_file/--wikitext_dir given")
    for what in ("OfflineModeIsEnabled", "c4: no --c4_file", "--wikitext_file PATH", "--c4_file PATH"):
        assert what in lines[0]
    assert os.listdir(tmp_path) == []  # not even --out_dir


def test_failure_keeps_existing_outputs(tmp_path):
    (tmp_path / "wiki2.jsonl").write_text('{"text": "old"}\n')
    (tmp_path / "wiki.test.raw").write_text(RAW, encoding="utf-8")
    # wiki2 is readable, c4 is not: nothing is written, the old wiki2.jsonl stays
    r = run_script("--wikitext_file", "wiki.test.raw", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: c4: no --c4_file given")
    assert sorted(os.listdir(tmp_path)) == ["wiki.test.raw", "wiki2.jsonl"]
    assert only_line(tmp_path / "wiki2.jsonl") == "old"


def test_failed_write_keeps_existing_output(tmp_path, monkeypatch):
    (tmp_path / "wiki2.jsonl").write_text('{"text": "old"}\n')
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        eval_data.write_texts(str(tmp_path / "wiki2.jsonl"), ["new"])
    assert os.listdir(tmp_path) == ["wiki2.jsonl"] and only_line(tmp_path / "wiki2.jsonl") == "old"


@pytest.mark.parametrize("args, message", [
    (["--wikitext_file", "missing.raw"], "wiki2: 'missing.raw': no such file"),
    (["--wikitext_dir", "."], "--wikitext_dir '.': none of wiki.test.raw"),
    (["--which", "c4", "--c4_file", "bad.json"], "c4: bad.json: cannot read it"),
    (["--wikitext_file", "a", "--wikitext_dir", "."], "not both"),
])
def test_bad_local_files(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.json").write_text("not json\n")
    with pytest.raises(SystemExit) as e:
        prepare_eval_data.main(args)
    assert str(e.value.code).startswith("error: ") and message in str(e.value.code)
    assert sorted(os.listdir(tmp_path)) == ["bad.json"]
