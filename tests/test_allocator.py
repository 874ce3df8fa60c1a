"""utils/allocator.py: after tune_cpu_allocator(), a freed 64 MiB block is reused (no fresh page faults) and fresh
large blocks fault once per 2 MiB huge page; LLMQAT_DEFAULT_ALLOCATOR=1 leaves glibc's default (every 4 KiB page
of every new block faults). Each case in a fresh interpreter: the settings are made once, at process start."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_PATH

SCRIPT = """
import json, torch
from utils.allocator import page_faults, tune_cpu_allocator
set_ = tune_cpu_allocator()
def faults():
    f = page_faults()
    x = torch.ones(64 << 20, dtype=torch.uint8)
    del x
    return page_faults() - f
print(json.dumps({"set": set_, "faults": [faults() for _ in range(4)]}))
"""


def thp_on():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


THP_ON = thp_on()


def run(default):
    env = {**os.environ, "LLMQAT_DEFAULT_ALLOCATOR": "1" if default else "0", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_PATH, env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and Linux page faults")
def test_tuned_allocator_reuses_freed_memory():
    tuned, default = run(default=False), run(default=True)
    assert tuned["set"] == {"THP_MEM_ALLOC_ENABLE": "1", "mallopt": True}
    assert default["set"] == {}
    pages = (64 << 20) // 4096
    assert all(f >= pages * 0.9 for f in default["faults"]), default  # every 4 KiB page of every block, each time
    assert tuned["faults"][-1] < pages // 20, tuned  # the freed block is reused
    if THP_ON:
        assert max(tuned["faults"]) < pages // 2, tuned  # even fresh memory faults per 2 MiB huge page
