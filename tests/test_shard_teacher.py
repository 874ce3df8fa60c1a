"""The KD teacher sharded with FSDP2 (2 CPU processes): 1/N of its weights per rank, bit-identical logits,
also when rank 1 builds it without weights and gets rank 0's (cpu_ram_efficient_loading)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TIMEOUT

pytestmark = pytest.mark.slow  # end-to-end: pytest -m "not slow" skips it


def test_sharded_teacher_holds_half_and_gives_identical_logits(tmp_path):
    out = tmp_path / "seen.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "tests", "workers", "shard_teacher.py"), str(out), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.load(open(out))
    assert seen["no_fsdp"] is False  # no FSDP: the teacher is left whole
    for name in ("llama", "qwen2_tied"):
        for run in (name, name + "_efficient"):
            s = seen[run]
            assert s["sharded"] and s["equal"], (run, s)
            assert sum(s["held"]) == s["full"] and all(0.4 * s["full"] < h < 0.6 * s["full"] for h in s["held"]), s
            # FSDP modules: the root, the embedding, each decoder layer, the final norm and lm_head (one
            # group with the embedding when tied, as accelerate groups the student)
            layers = [f"model.layers.{i}" for i in range(s["layers"])]
            assert s["units"] == ["", "model.embed_tokens", *layers, "model.norm", "lm_head"], (run, s)
