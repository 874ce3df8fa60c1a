"""utils/zeroshot.py: lm-eval scoring of an in-memory model, offline, on local tasks."""
import copy
import os

import datasets
import huggingface_hub.constants
import pytest
import torch
from transformers import AutoTokenizer

from models.quant_model import load_model
from utils.errors import InputError
from utils.zeroshot import PAPER_TASKS, evaluate_tasks, resolve_tasks

from conftest import FAMILIES, REPO as ROOT, TINY as TINY_CONFIG, tiny as tiny_family  # noqa: E402
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


def _requests(tokenizer, max_length):
    """(context, continuation) token requests as lm-eval builds them: three shared contexts whose choices differ in
    length, a one-token context, an unshared one, and one longer than the model takes (HFLM cuts it from the left)."""
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    docs = [("HAMLET.\nTo be, or not to be, that is the", [" question:", " sun.", " winter of our discontent"]),
            ("ROMEO.\nBut soft, what light through yonder window breaks?\n", ["It is the east.", " Juliet", "\n"]),
            ("KING RICHARD III.\nNow is the winter of our", [" discontent", " kingdom, and the rest"]),
            ("A", [" b", " c"]),
            ("FIRST CITIZEN.\nBefore we proceed any further, hear me speak.", [" All."]),
            ("CITIZEN.\nWe are accounted poor citizens, the patricians good.\n" * 30, [" Speak.", " Nay."])]
    requests = [((c, x), enc(c), enc(x)) for c, choices in docs for x in choices]
    assert len(requests[-1][1]) > max_length  # the long one is cut
    return requests


def test_shared_contexts_score_like_whole_sequences_and_run_each_context_once(tiny):
    """SharedContextLM against lm-eval's HFLM on the same FP model and requests: the same log-likelihoods (fp32
    rounding: measured 1.5e-5 at most over 800 questions) and greedy flags. Each shared context runs once (less
    its last token, which leads each choice's own run); the other requests take HFLM's path."""
    from lm_eval.models.huggingface import HFLM
    from utils.shared_context import SharedContextLM

    model, tokenizer = tiny
    calls = []  # (input shape, real context tokens of a pass without a cache, whether it continues a cache)
    hook = model.register_forward_pre_hook(lambda m, args, kw: calls.append((
        tuple((args[0] if args else kw["input_ids"]).shape), kw.get("cache") is not None,
        int(kw["attention_mask"].sum()) if kw.get("attention_mask") is not None else None)), with_kwargs=True)
    try:
        scores, runs = {}, {}
        for cls in (HFLM, SharedContextLM):
            lm = cls(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=2)
            requests = _requests(tokenizer, lm.max_length)
            calls.clear()
            with torch.inference_mode():
                scores[cls] = lm._loglikelihood_tokens(requests, disable_tqdm=True)
            runs[cls] = list(calls)
    finally:
        hook.remove()
    for (ll, greedy), (ll0, greedy0) in zip(scores[SharedContextLM], scores[HFLM], strict=True):
        assert abs(ll - ll0) < 2e-4 * max(1, abs(ll0)) and greedy == greedy0, (ll, ll0)
    # the three shared contexts, longest choice first (little padding), 2 to a batch: each batch one pass of its
    # contexts (less their last tokens) and one of all their choices, over a copy of the contexts' cache
    longest = lambda c: (max(len(r[2]) for r in requests if tuple(r[1]) == c), len(c))
    contexts = sorted({tuple(r[1]) for r in requests[:8]}, key=longest, reverse=True)
    choices = [sum(tuple(r[1]) in batch for r in requests) for batch in (contexts[:2], contexts[2:])]
    shared = [c for c in runs[SharedContextLM] if c[2] is not None]
    assert [(cached, real) for _, cached, real in shared[::2]] == [
        (False, sum(len(c) - 1 for c in batch)) for batch in (contexts[:2], contexts[2:])]
    assert [(shape[0], cached) for shape, cached, _ in shared[1::2]] == [(n, True) for n in choices]
    # fewer tokens (padding included) than the 8 requests' whole sequences, which HFLM would run
    assert sum(shape[0] * shape[1] for shape, _, _ in shared) < sum(len(r[1]) + len(r[2]) - 1 for r in requests[:8])


def test_shared_contexts_on_a_quantized_model_and_lm_evals_scoring_one_flag_away(tiny, monkeypatch):
    """W4-A8-KV4: each token still meets the same quantizers (per token, the KV cache's included), so only
    rounding differs, which a 4-bit model amplifies where a value sits near a rounding boundary (measured on
    800 questions: mean |difference| 0.0055 nats, against 0.034 for HF's eager attention in place of SDPA); the
    accuracy is the same here. shared_context=False is lm-eval's own scoring."""
    from lm_eval.models.huggingface import HFLM
    from models.setting import QuantSetting

    model = copy.deepcopy(tiny[0])
    QuantSetting(4, 8, 4).apply(model)
    scorers, original = [], HFLM._loglikelihood_tokens
    monkeypatch.setattr(HFLM, "_loglikelihood_tokens",
                        lambda self, *a, **k: scorers.append(type(self).__name__) or original(self, *a, **k))
    stock = evaluate_tasks(model, tiny[1], "shakespeare_nextline", limit=40, batch_size=8, shared_context=False)
    assert scorers == ["HFLM"]
    shared = evaluate_tasks(model, tiny[1], "shakespeare_nextline", limit=40, batch_size=8)
    assert scorers == ["HFLM"]  # every context shared by its 4 choices: HFLM's path not taken
    assert stock["shakespeare_nextline"]["acc"] == shared["shakespeare_nextline"]["acc"]


@pytest.mark.parametrize("family, window", [(FAMILIES[0], None), (FAMILIES[1], 4), (FAMILIES[2], None)],
                         ids=["llama", "mistral-window-4", "qwen2"])
def test_shared_contexts_across_families_and_sliding_windows(family, window):
    """The same scores as HFLM on random tiny LLaMA / Mistral / Qwen2 (grouped-query attention) models. A sliding
    window (Mistral's, here 4 tokens, shorter than the contexts) counts cache slots, padding included: such a
    model gets one context per batch (no context padding), and still its scores."""
    from lm_eval.models.huggingface import HFLM
    from utils.shared_context import SharedContextLM

    model = tiny_family(family)
    if window:
        model.config.sliding_window = window
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, TINY_CONFIG["vocab_size"], (n,), generator=g).tolist()
    contexts = [ids(int(n)) for n in torch.randint(5, 20, (6,), generator=g)]  # 3 choices each, 1-6 tokens
    requests = [(None, context, ids(int(k))) for context in contexts for k in torch.randint(1, 7, (3,), generator=g)]
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    scores = {}
    for cls in (HFLM, SharedContextLM):
        lm = cls(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=3)
        with torch.inference_mode():
            scores[cls] = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    for (ll, greedy), (ll0, greedy0) in zip(scores[SharedContextLM], scores[HFLM], strict=True):
        assert abs(ll - ll0) < 1e-4 * max(1, abs(ll0)) and greedy == greedy0, (ll, ll0)
