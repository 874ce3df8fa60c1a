"""Zero-shot multiple-choice accuracy of an already-loaded (possibly fake-quantized) model, via lm-eval.

The model is scored in-process through lm-eval's HFLM wrapper, so a QAT model never has to be saved
and reloaded first. Local tasks live in <repo>/tasks and work offline; hub tasks (the paper's eight)
need their datasets from the Hugging Face hub or its local cache.
"""
import copy
import functools
import logging
import os
import random
from unittest import mock

import numpy as np
import torch

from utils.errors import InputError

TASKS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks")
PAPER_TASKS = ["boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]

# Warnings lm-eval always gives for our (intended) way of calling it; anything else still shows.
_EXPECTED = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model",
             "Custom kwargs can be passed to `--metadata`", "Overwriting default num_fewshot")


def _drop_expected(record):
    return not any(s in record.getMessage() for s in _EXPECTED)


def _quiet_lm_eval():
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # A logger's filters see only records logged on it, not its children's: filter where they come from.
    for name in ("lm_eval.models.huggingface", "lm_eval.api.task", "lm_eval.evaluator"):
        logger = logging.getLogger(name)
        if _drop_expected not in logger.filters:
            logger.addFilter(_drop_expected)


@functools.cache
def _index(with_lm_eval_tasks):
    _quiet_lm_eval()
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=TASKS_DIR, include_defaults=with_lm_eval_tasks)


def task_manager(names=()):
    """lm-eval's task index for these task names: the local tasks alone (tasks/, a millisecond) when they hold
    every name, else with lm-eval's built-in tasks (it scans ~15k yaml files: 6 s on an AMD EPYC core). Each
    index is built once per process. Inline task configs (dicts) must be self-contained."""
    local = _index(False)
    return local if all(name in local.all_tasks for name in names) else _index(True)


def resolve_tasks(spec):
    """'paper' -> the paper's eight tasks; otherwise a comma-separated list of lm-eval task names."""
    names = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        names += PAPER_TASKS if part == "paper" else [part]
    if not names:
        raise InputError("no tasks given")
    known = task_manager(names).all_tasks
    for name in names:
        if name not in known:
            raise InputError(f"unknown task {name!r}: not an lm-eval task, nor a local task in {TASKS_DIR}/")
    return list(dict.fromkeys(names))


def _hub_error(e):
    """Is `e` a failure to reach (or find offline) a dataset on the Hugging Face hub?"""
    chain = [e]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    # datasets raises the builtin ConnectionError ("Couldn't reach ... on the Hub"), also when offline.
    return any(isinstance(x, ConnectionError) or type(x).__module__.split(".")[0] in
               ("huggingface_hub", "requests", "httpx", "urllib3") for x in chain)


def _load_task(index, spec):
    name = spec if isinstance(spec, str) else spec.get("task")
    try:
        return index.load(spec)["tasks"]
    except Exception as e:
        if _hub_error(e):
            raise InputError(f"task {name!r} needs its dataset from the Hugging Face hub, which could not be "
                             f"reached and has no local cache ({type(e).__name__}); run once online, or use a "
                             f"local task from {TASKS_DIR}/") from e
        raise


def evaluate_tasks(model, tokenizer, tasks, batch_size=16, limit=None, num_fewshot=0, shared_context=True):
    """Score `model` on lm-eval tasks -> {task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}.

    `tasks`: a spec for resolve_tasks, or a list of task names and/or inline lm-eval task configs (dicts,
    as a task yaml would hold). The model stays on its device; contexts longer than its
    max_position_embeddings are left-truncated by lm-eval. acc_norm is None for tasks without it.
    shared_context: a question's context runs once for all its choices (utils/shared_context.py; the same scores
    up to float rounding, and batch_size counts contexts); False: lm-eval's HFLM, one sequence per choice.
    """
    import lm_eval.evaluator
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from utils.shared_context import SharedContextLM

    if isinstance(tasks, str):
        tasks = [tasks]
    specs = [t for item in tasks for t in (resolve_tasks(item) if isinstance(item, str) else [item])]
    index = task_manager([s for s in specs if isinstance(s, str)])
    loaded = {}
    for spec in specs:  # one at a time so that a hub failure names its task
        loaded.update(_load_task(index, spec))
    was_training, py_rng, np_rng = model.training, random.getstate(), np.random.get_state()
    try:
        # HFLM sets a pad token on the tokenizer it gets: give it a copy. It puts the model in eval mode.
        scorer = SharedContextLM if shared_context else HFLM
        lm = scorer(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        # simple_evaluate reseeds python/numpy/torch for reproducibility: keep the caller's streams. It ends by
        # adding torch's environment report to its results (pip list, lscpu and more in subprocesses: ~2 s a
        # call, every row of a table); only the scores are kept here, so that step is skipped.
        no_env_report = mock.patch.object(lm_eval.evaluator, "add_env_info", lambda results: None)
        with torch.random.fork_rng(), torch.inference_mode(), no_env_report:
            out = simple_evaluate(model=lm, tasks=list(loaded.values()), task_manager=index,
                                  num_fewshot=num_fewshot, limit=limit, log_samples=False,
                                  bootstrap_iters=1000)
    finally:
        model.train(was_training)
        random.setstate(py_rng)
        np.random.set_state(np_rng)
    results = {}
    for name in loaded:
        r = out["results"][name]
        get = lambda k: r.get(f"{k},none") if isinstance(r.get(f"{k},none"), float) else None  # "N/A" -> None
        results[name] = {"acc": get("acc"), "acc_stderr": get("acc_stderr"), "acc_norm": get("acc_norm"),
                         "acc_norm_stderr": get("acc_norm_stderr"), "n": out["n-samples"][name]["effective"]}
    return results
