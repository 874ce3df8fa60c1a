"""reproduce_tiny.sh --quick: every row, the three files, LLM-QAT 4-8-4 beating RTN 4-8-4; resume."""
import json

import pytest

from utils.reproduce import BITS, rows_to_run

from conftest import run_cli  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end: pytest -m "not slow" skips it


def reproduce(out, work, *flags, check=True):
    return run_cli(["sh", "reproduce_tiny.sh", *flags, "--out_dir", str(out), "--work_dir", str(work)], check=check)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("results"), tmp_path_factory.mktemp("work")
    return out, work, reproduce(out, work, "--quick")


def test_quick_run_writes_every_row_and_llm_qat_beats_rtn(quick):
    out, _, _ = quick
    rows = json.load(open(out / "tiny_table.json"))
    assert [(r["method"], r["bits"]) for r in rows] == [(r.method, r.bits) for r in rows_to_run()]
    assert {r["method"] for r in rows} >= {"FP", "RTN", "SmoothQuant", "GPTQ", "LLM-QAT", "QAT-real"}
    assert {r["bits"] for r in rows} > set(BITS)
    for r in rows:
        assert r["ppl"] > 1 and 0 < r["acc"] < 1 and r["task_docs"] == 30
    ppl = {(r["method"], r["bits"]): r["ppl"] for r in rows}
    assert ppl[("LLM-QAT", "4-8-4")] < ppl[("RTN", "4-8-4")]
    assert ppl[("RTN", "4-8-4")] > ppl[("FP", "32-32-32")]
    trained = [r["train_tokens"] for r in rows if r["train_tokens"] is not None]
    assert len(trained) == 12 and len(set(trained)) == 1  # generated and real rows see the same token count
    calibrated = [r for r in rows if r["method"] in ("SmoothQuant", "GPTQ")]  # training-free, generated text
    assert len(calibrated) == 2 * len(BITS) and all(r["data"].startswith("calibration: generated") for r in calibrated)
    md = (out / "tiny_table.md").read_text()
    assert "| LLM-QAT (pure greedy) | 4-8-4 |" in md and "| SmoothQuant | 4-8-4 |" in md and "recovers" in md
    assert (out / "tiny_table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_resumes_from_saved_rows_and_refuses_other_settings(quick):
    out, work, _ = quick
    before = (out / "tiny_table.json").read_text()
    proc = reproduce(out, work, "--quick")
    assert (out / "tiny_table.json").read_text() == before
    assert proc.stdout.count("(done before)") == len(rows_to_run())
    full = reproduce(out, work, check=False)
    assert full.returncode == 1 and "holds a run with other settings" in full.stderr


def test_report_only_without_rows_writes_nothing(tmp_path):
    """A report of no finished rows (a fresh work directory) is one error line, and the table already in
    --out_dir is left as it was (it once became an empty list)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny_table.json").write_text("[1]")
    proc = reproduce(out, tmp_path / "empty_work", "--report_only", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no finished rows under ")
    assert (out / "tiny_table.json").read_text() == "[1]" and sorted(p.name for p in out.iterdir()) == ["tiny_table.json"]


def test_gptq_rows_only_where_the_baseline_takes_the_width():
    """GPTQ refuses 2-bit weights (models/baselines.py): the SmolLM2 plan has GPTQ at 3 bits, none at 2."""
    from utils.reproduce import SMOLLM2, rows_to_run
    slugs = {r.slug for r in rows_to_run(SMOLLM2)}
    assert {"GPTQ_3-16-16", "GPTQ_3-8-8", "RTN_2-16-16", "LLM-QAT_2-16-16"} <= slugs and "GPTQ_2-16-16" not in slugs
