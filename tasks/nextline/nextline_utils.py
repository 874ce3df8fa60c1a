"""Load the task's questions from the jsonl next to this file.

lm-eval resolves `dataset_kwargs: data_files:` against the current directory; a `custom_dataset` knows
its own location, so the task works from any cwd, offline, and writes nothing to the HF datasets cache.
"""
import json
import os

import datasets

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare_nextline.jsonl")


def load(**kwargs):  # lm-eval passes the task metadata (version, ...) as kwargs: unused
    with open(DATA, encoding="utf-8") as f:
        return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(l) for l in f if l.strip()])})
