"""The KD teacher sharded with FSDP2 (2 CPU processes): 1/N of its weights per rank, bit-identical logits."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sharded_teacher_holds_half_and_gives_identical_logits(tmp_path):
    out = tmp_path / "seen.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "tests", "workers", "shard_teacher.py"), str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.load(open(out))
    assert seen["no_plugin"] is False  # no FSDP: the teacher is left whole
    for name, extra in (("llama", 2), ("qwen2_tied", 1)):  # one unit a layer, the root, the embedding unless tied
        s = seen[name]
        assert s["sharded"] and s["equal"], s
        assert sum(s["held"]) == s["full"] and all(0.4 * s["full"] < h < 0.6 * s["full"] for h in s["held"]), s
        assert s["units"] == s["layers"] + extra, s
