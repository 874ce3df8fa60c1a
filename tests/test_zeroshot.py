"""utils/zeroshot.py: lm-eval scoring of an in-memory model, offline, on local tasks."""
import os

import datasets
import huggingface_hub.constants
import pytest
from transformers import AutoTokenizer

from models.quant_model import load_model
from utils.errors import InputError
from utils.zeroshot import PAPER_TASKS, evaluate_tasks, resolve_tasks

from conftest import REPO as ROOT  # noqa: E402
TINY = os.path.join(ROOT, "assets", "tiny_llama")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    # The env vars alone act only on a fresh import; the config constants make it true in this process.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # local tasks must not depend on the current directory


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY), AutoTokenizer.from_pretrained(TINY)


def test_local_task_offline_from_any_cwd(tiny):
    r = evaluate_tasks(*tiny, ["shakespeare_nextline"], limit=12)["shakespeare_nextline"]
    assert r["n"] == 12
    assert 0 < r["acc"] < 1 and 0 < r["acc_norm"] < 1


def test_certain_answers_score_one(tiny):
    # The true continuation vs letter salad the model has never seen; the answer sits at a different
    # position each time, so a label or scoring mix-up cannot pass. The last context is longer than the
    # model's 512 positions: lm-eval must cut it from the left, keeping the end that decides.
    long = "FIRST CITIZEN.\nWe are accounted poor citizens, the patricians good.\n\n" * 40
    docs = [
        {"context": "HAMLET.\nTo be, or not to be, that is the", "choices": [" question:", " xqzkjvwq:"], "label": 0},
        {"context": "ROMEO.\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the",
         "choices": [" zqxv.", " sun.", " kjwq."], "label": 1},
        {"context": "KING RICHARD III.\nNow is the winter of our", "choices": [" qvzx", " jxqk", " discontent"],
         "label": 2},
        {"context": long + "HAMLET.\nTo be, or not to be, that is the", "choices": [" xqzkjvwq:", " question:"],
         "label": 1},
    ]
    task = {"task": "certain_toy", "custom_dataset": lambda **_: datasets.DatasetDict(
                {"test": datasets.Dataset.from_list(docs)}),
            "dataset_path": "", "test_split": "test", "output_type": "multiple_choice",
            "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
            "target_delimiter": "",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")]}
    r = evaluate_tasks(*tiny, [task])["certain_toy"]
    assert (r["acc"], r["acc_norm"], r["n"]) == (1.0, 1.0, 4)


def test_fp_model_beats_chance(tiny):
    # Chance is 0.25 with no length or prior shortcut; FP scores 0.385 on all 800, 0.42 on these 120.
    r = evaluate_tasks(*tiny, "shakespeare_nextline", limit=120, batch_size=32)["shakespeare_nextline"]
    assert r["n"] == 120
    assert r["acc"] > 0.35


def test_resolve_tasks():
    assert resolve_tasks("paper") == PAPER_TASKS
    assert resolve_tasks(" shakespeare_nextline ,boolq") == ["shakespeare_nextline", "boolq"]
    with pytest.raises(InputError, match="unknown task 'no_such_task'.*tasks/"):
        resolve_tasks("piqa,no_such_task")


def test_hub_task_offline_is_one_line_error(tiny):
    with pytest.raises(InputError, match="'boolq' needs its dataset from the Hugging Face hub"):
        evaluate_tasks(*tiny, "boolq", limit=1)


def test_local_tasks_are_found_without_lm_evals_index_of_its_own_tasks():
    """Local task names resolve against tasks/ alone (lm-eval's full index scans ~15k yaml files, seconds);
    any other name builds the full index, which knows the local tasks too."""
    from utils.zeroshot import task_manager
    assert sorted(task_manager(["shakespeare_nextline", "pydocs_nextsentence"]).all_tasks) == [
        "pydocs_nextsentence", "shakespeare_nextline"]
    full = task_manager(["shakespeare_nextline", "boolq"]).all_tasks
    assert {"boolq", "piqa", "shakespeare_nextline"} <= set(full) and len(full) > 1000


def test_scoring_skips_torchs_environment_report(tiny, monkeypatch):
    """simple_evaluate would run torch's collect_env (pip list, lscpu... in subprocesses, ~2 s) for every call."""
    import torch.utils.collect_env
    calls = []
    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", lambda: calls.append(1) or "")
    assert evaluate_tasks(*tiny, "shakespeare_nextline", limit=4)["shakespeare_nextline"]["n"] == 4
    assert calls == []
