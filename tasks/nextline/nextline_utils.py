"""Load a "which comes next" task's questions from the jsonl next to this file (tools/make_nextline_task.py).

lm-eval resolves `dataset_kwargs: data_files:` against the current directory; a `custom_dataset` knows
its own location, so the tasks work from any cwd, offline, and write nothing to the HF datasets cache.
"""
import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def questions(name):
    with open(os.path.join(HERE, f"{name}.jsonl"), encoding="utf-8") as f:
        return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(l) for l in f if l.strip()])})


def load_shakespeare(**kwargs):  # lm-eval passes the task metadata (version, ...) as kwargs: unused
    return questions("shakespeare_nextline")


def load_pydocs(**kwargs):
    return questions("pydocs_nextsentence")
