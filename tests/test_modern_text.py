"""The modern texts (tools/get_modern_text.py), their split, the pydocs_nextsentence task, and the seeds that
change what the reproduction's replicas train on."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO as _REPO, run_cli
from pathlib import Path

REPO = Path(_REPO)

sys.path.insert(0, str(REPO / "tools"))
import get_modern_text as gmt  # noqa: E402

DATA = REPO / "assets" / "data"
TASK = REPO / "tasks" / "nextline" / "pydocs_nextsentence.jsonl"

PAGE = ('<html><head><title>t</title></head><body><div class="navheader">Prev Next navigation text here</div>'
        '<div class="section"><h2>{title}</h2><p>{body}</p><pre class="screen">$ apt-get install something else</pre>'
        '<p>A second paragraph of the page {title} with enough words.</p></div>'
        '<div class="navfooter">Up Home Next page of the book</div></body></html>')
INDEX = ('<html><body><div class="toc"><dl class="toc">'
         '<dt><span class="chapter"><a href="ch1.html">1. One</a></span></dt>'
         '<dd><dl><dt><span class="section"><a href="sect.a.html">1.1 A</a></span></dt>'
         '<dt><span class="section"><a href="sect.a.html#x">1.1.1 A again</a></span></dt></dl></dd>'
         '<dt><span class="chapter"><a href="solving-problems.html">2. Held out</a></span></dt>'
         '<dt><span class="appendix"><a href="app.html">A. Appendix</a></span></dt>'
         '</dl></div></body></html>')
RST = """.. _tut-x:

*****
Title
*****

This paragraph explains a thing in plain words, and it has more than eight words in it.

For example::

    print("code is left out")

Use :func:`abs` and ``len`` to compute the :ref:`size <tut-size>` of a *thing* in practice, as shown here.

>>> 1 + 1
2
"""


def stand_in_tree(root):
    """A tiny debian-handbook and python3.11-doc file tree (the packages' layouts)."""
    hb = root / "hb" / gmt.HANDBOOK
    hb.mkdir(parents=True)
    (hb / "index.html").write_text(INDEX)
    for name in ("ch1", "sect.a", "solving-problems", "app"):
        (hb / f"{name}.html").write_text(PAGE.format(title=name, body=f"The text of {name} says something useful."))
    for part in ("tutorial", "howto"):
        d = root / "py" / gmt.PYDOCS / part
        d.mkdir(parents=True)
        (d / f"{part}1.rst.txt").write_text(RST)
    return root / "hb", root / "py"


def test_handbook_split_by_chapter_and_prose_only(tmp_path):
    hb, py = stand_in_tree(tmp_path)
    chapters = gmt.handbook_chapters(hb / gmt.HANDBOOK)
    assert [c[0] for c in chapters] == ["ch1.html", "solving-problems.html", "app.html"]
    assert "The text of sect.a says something useful." in chapters[0][2]  # a chapter's section pages join it
    texts = gmt.make_texts(hb / gmt.HANDBOOK, py / gmt.PYDOCS)
    train, held = "\n".join(texts["handbook_train.jsonl"]), "\n".join(texts["handbook_heldout.jsonl"])
    assert "solving-problems" in held and "solving-problems" not in train and "ch1" in train
    assert "apt-get install" not in train + held and "navigation" not in train + held  # <pre>, nav dropped
    prose = texts["pydocs_heldout.jsonl"][0]
    assert prose == ("This paragraph explains a thing in plain words, and it has more than eight words in it.\n\n"
                     "Use abs and len to compute the size of a thing in practice, as shown here.")


def build_deb(src, name, version, out):
    (src / "DEBIAN").mkdir()
    (src / "DEBIAN" / "control").write_text(f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
                                            "Maintainer: test <t@example.org>\nDescription: stand-in\n")
    subprocess.run(["dpkg-deb", "-b", str(src), str(out / f"{name}_{version}_all.deb")], check=True,
                   capture_output=True)


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian)")
def test_prepare_from_local_debs_is_atomic_and_idempotent(tmp_path, monkeypatch):
    hb, py = stand_in_tree(tmp_path / "tree")
    debs = tmp_path / "debs"
    debs.mkdir()
    build_deb(hb, "debian-handbook", "1.0", debs)
    build_deb(py, "python3.11-doc", "2.0", debs)
    monkeypatch.setattr(gmt, "PACKAGES", {"debian-handbook": ("1.0", gmt.sha256_of(debs / "debian-handbook_1.0_all.deb")),
                                          "python3.11-doc": ("2.0", None)})
    out = tmp_path / "out"
    gmt.prepare(str(debs), str(out))
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["handbook_heldout.jsonl", "handbook_train.jsonl", "pydocs_heldout.jsonl",
                             "pydocs_howto.jsonl"]
    gmt.prepare(str(debs), str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    # a .deb that is not the recorded one: one error, nothing written
    monkeypatch.setattr(gmt, "PACKAGES", {**gmt.PACKAGES, "debian-handbook": ("1.0", "0" * 64)})
    with pytest.raises(gmt.InputError, match="sha256 is not the recorded"):
        gmt.prepare(str(debs), str(tmp_path / "out2"))
    assert not (tmp_path / "out2").exists()


def test_unreachable_source_is_one_error_line(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # no apt-get on the PATH
    (tmp_path / "python").symlink_to(sys.executable)
    proc = subprocess.run([sys.executable, "tools/get_modern_text.py", "--out_dir", str(tmp_path / "o")], cwd=REPO,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        proc.stderr.strip()] and proc.stderr.startswith("error: apt-get not found"), proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli([sys.executable, "tools/get_modern_text.py", "--deb_dir", str(empty), "--out_dir",
                    str(tmp_path / "o")], check=False)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: --deb_dir") and "debian-handbook" in proc.stderr
    assert not (tmp_path / "o").exists()


def paragraphs(path):
    with open(path, encoding="utf-8") as f:
        return {hashlib.sha256(p.encode()).hexdigest() for line in f for p in json.loads(line)["text"].split("\n\n")}


def test_no_held_out_paragraph_is_in_the_training_text():
    train = paragraphs(DATA / "handbook_train.jsonl")
    assert len(train) > 3000
    for held in ("handbook_heldout.jsonl", "pydocs_heldout.jsonl", "pydocs_howto.jsonl"):
        assert not train & paragraphs(DATA / held), held
    assert not paragraphs(DATA / "pydocs_heldout.jsonl") & paragraphs(DATA / "pydocs_howto.jsonl")


def test_pydocs_task_is_well_formed_and_from_the_howtos():
    questions = [json.loads(l) for l in open(TASK, encoding="utf-8")]
    howtos = [json.loads(l)["text"] for l in open(DATA / "pydocs_howto.jsonl", encoding="utf-8")]
    assert len(questions) == 800 and len({q["id"] for q in questions}) == 800
    for q in questions:
        assert len(q["choices"]) == 4 == len(set(q["choices"])) and q["label"] in range(4)
        doc = int(q["id"].split(":")[0])
        true = q["choices"][q["label"]]
        assert q["context"].endswith((" ", "\n\n")) and true in howtos[doc]
        last = q["context"].strip().split("\n\n")[-1]
        assert last + (" " if q["context"].endswith(" ") else "\n\n") + true in howtos[doc]
        assert all(c not in howtos[doc] for k, c in enumerate(q["choices"]) if k != q["label"])  # other HOWTOs
    # context-free rules score chance
    longest = sum(max(range(4), key=lambda k: len(q["choices"][k])) == q["label"] for q in questions) / 800
    assert 0.2 < longest < 0.3


def test_pydocs_task_runs_through_lm_eval_on_the_embedded_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from utils.zeroshot import evaluate_tasks, resolve_tasks
    model = AutoModelForCausalLM.from_pretrained(REPO / "assets" / "tiny_llama")
    tok = AutoTokenizer.from_pretrained(REPO / "assets" / "tiny_llama")
    r = evaluate_tasks(model, tok, resolve_tasks("pydocs_nextsentence"), batch_size=8, limit=8)
    assert r["pydocs_nextsentence"]["n"] == 8 and 0 <= r["pydocs_nextsentence"]["acc"] <= 1


def test_seeds_change_the_data_order_and_the_samples(tmp_path):
    from utils.data import read_texts
    from utils.reproduce import SMOLLM2, TINY, generated_text, real_text
    orders = [read_texts(real_text(str(tmp_path), "real_modern", SMOLLM2, seed)) for seed in (0, 1)]
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0][:4] != orders[1][:4]
    s = dict(TINY.settings["quick"], start_ids=(320, 328), gen_length=24)
    texts = [read_texts(generated_text("hybrid", s, str(tmp_path), TINY, seed)) for seed in (0, 1)]
    assert len(texts[0]) == len(texts[1]) == 8 and sorted(texts[0]) != sorted(texts[1])
    assert os.path.exists(tmp_path / "gen_hybrid.jsonl") and os.path.exists(tmp_path / "gen_hybrid_seed1.jsonl")


def test_quick_smollm2_shaped_reproduction_writes_the_new_columns(bpe_model_dir, tmp_path, monkeypatch):
    """The SmolLM2 profile on a SmolLM2-shaped model: every held-out text and task is a column, seeded replicas
    carry their seed, the seeds' spread is reported; a row saved before a text existed is scored on it alone."""
    from dataclasses import replace
    import utils.reproduce as rp
    monkeypatch.setitem(rp.PROFILES, "smollm2", replace(rp.SMOLLM2, model=str(bpe_model_dir)))
    out, work = tmp_path / "out", tmp_path / "work"
    settings = json.dumps({"start_ids": [0, 320, 40], "gen_length": 24, "blocks": 4, "tune_blocks": 2,
                           "eval_windows": 2, "limit": 4, "save_steps": 0})
    argv = ["--model", "smollm2", "--quick", "--settings", settings, "--out_dir", str(out), "--work_dir", str(work)]
    rows = ["FP_32-32-32", "RTN_4-8-4", "QAT-real_modern_4-8-4", "QAT-real_modern_4-8-4_seed1"]
    rp.main([*argv, "--rows", ",".join(rows)])
    table = {rp.Row(r["method"], r["bits"], seed=r.get("seed", 0)).slug: r
             for r in json.load(open(out / "smollm2_table.json"))}
    assert sorted(table) == sorted(rows)
    for r in table.values():
        assert set(r["ppl_by_text"]) == set(rp.SMOLLM2.ppl_texts) and set(r["acc_by_task"]) == set(rp.SMOLLM2.tasks)
        assert r["cpu"] and all(v > 1 for v in r["ppl_by_text"].values())
    assert table["QAT-real_modern_4-8-4_seed1"]["seed"] == 1 and table["QAT-real_modern_4-8-4"]["data"] == \
        "real text (modern)"
    assert table["QAT-real_modern_4-8-4"]["ppl_by_text"] != table["QAT-real_modern_4-8-4_seed1"]["ppl_by_text"]
    md = (out / "smollm2_table.md").read_text()
    assert "ppl handbook_heldout ↓ | ppl pydocs_heldout ↓ | acc shakespeare_nextline ↑ | acc pydocs_nextsentence ↑" in md
    assert "| QAT-real (modern) | " in md and ", 2 seeds) |" in md
    # a row saved before pydocs_heldout existed: rescored on that text alone, the rest kept
    kept = out / "smollm2_table_rows" / "RTN_4-8-4.json"
    old = json.loads(kept.read_text())
    del old["ppl_by_text"]["pydocs_heldout"]
    kept.write_text(json.dumps({**old, "ppl_by_text": {**old["ppl_by_text"], "shakespeare_eval": 1234.5}}))
    (work / "rows" / "RTN_4-8-4.json").unlink()
    rp.main([*argv, "--rows", "RTN_4-8-4"])
    new = json.loads(kept.read_text())
    assert new["ppl_by_text"]["shakespeare_eval"] == 1234.5  # kept, not recomputed
    assert new["ppl_by_text"]["pydocs_heldout"] == table["RTN_4-8-4"]["ppl_by_text"]["pydocs_heldout"]
    assert "pydocs_heldout" in new["scored_later"]
    with pytest.raises(rp.InputError, match="--rows 'RTN_9-9-9': no row named 'RTN_9-9-9'; rows: FP_32-32-32, "):
        rp.main([*argv, "--rows", "RTN_9-9-9"])


def test_quick_learned_scale_row_tunes_its_range_lr_on_validation_text(bpe_model_dir, tmp_path, monkeypatch):
    """Issue 24's rows: a learned-scale row (bits ending -lsq) trains with w_quantizer lsq at a range learning rate
    chosen on milton_valid (x0.01 to x10 the weights' chosen lr, at the first learned setting below 4 bits), kept
    in range_lr_choice.json and in the row; a choice saved from a smaller grid trains only the new candidates; the
    low-bit rows come after the paper's table in the run order."""
    from dataclasses import replace
    import utils.reproduce as rp
    monkeypatch.setitem(rp.PROFILES, "smollm2", replace(rp.SMOLLM2, model=str(bpe_model_dir)))
    out, work = tmp_path / "out", tmp_path / "work"
    settings = json.dumps({"start_ids": [0, 320, 40], "gen_length": 24, "blocks": 4, "tune_blocks": 2,
                           "eval_windows": 2, "limit": 4, "save_steps": 0})
    lr, kept = 1e-4, out / "smollm2_table_rows"
    kept.mkdir(parents=True)  # an earlier session's choices: the lr, and the range lr's grid without x0.01
    (kept / "lr_choice.json").write_text(json.dumps({"tried": {"2e-05": 9.0, "0.0001": 8.0}, "blocks": 2, "lr": lr,
                                                     "text": "milton_valid"}))
    earlier = {f"{lr * 0.1:g}": 1.5, f"{lr:g}": 2.0, f"{lr * 10:g}": 3.0}
    (kept / "range_lr_choice.json").write_text(json.dumps({"tried": earlier, "blocks": 2, "range_lr": lr * 0.1,
                                                           "text": "milton_valid", "bits": "3-16-16-lsq"}))
    rp.main(["--model", "smollm2", "--quick", "--settings", settings, "--out_dir", str(out), "--work_dir", str(work),
             "--rows", "LLM-QAT_3-16-16-lsq"])
    choice = json.load(open(kept / "range_lr_choice.json"))
    assert choice["bits"] == "3-16-16-lsq" and choice["text"] == "milton_valid"
    assert sorted(float(k) for k in choice["tried"]) == pytest.approx([lr * 0.01, lr * 0.1, lr, lr * 10])
    assert {k: choice["tried"][k] for k in earlier} == earlier  # kept, not retrained
    tuned = sorted(p.name for p in (work / "models").iterdir() if p.name.startswith("tune_"))
    assert tuned == [f"tune_LLM-QAT_3-16-16-lsq_lr{lr:g}_rangelr{lr * 0.01:g}"], tuned
    new = choice["tried"][f"{lr * 0.01:g}"]
    assert choice["range_lr"] == pytest.approx(lr * 0.1 if new > 1.5 else lr * 0.01)  # the lowest ppl wins
    (row,) = json.load(open(out / "smollm2_table.json"))
    assert row["bits"] == "3-16-16-lsq" and row["w_range_lr"] == choice["range_lr"]
    config = json.load(open(work / "models" / f"LLM-QAT_3-16-16-lsq_lr{lr:g}" / "config.json"))
    assert (config["w_bits"], config["a_bits"], config["w_quantizer"]) == (3, 16, "lsq")
    assert "learned weight ranges (bits ending -lsq) at lr" in (out / "smollm2_table.md").read_text()
    order = [r.slug for r in rp.run_order(rp.rows_to_run(rp.SMOLLM2))]
    first_low = min(order.index(r) for r in ("RTN_3-16-16", "LLM-QAT_4-8-4-lsq", "LLM-QAT_2-16-16"))
    assert first_low > max(order.index(r) for r in ("QAT-real_8-8-8", "LLM-QAT_4-8-4_seed2", "LLM-QAT_8-8-8"))
