"""The one atomic-write helper: files and directories appear whole or not at all, leftovers of killed runs go."""
import os
import subprocess
import sys

import pytest

from models.io import atomic_dir, atomic_write


def dead_pid():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_atomic_write_replaces_whole_and_cleans_a_killed_runs_temp(tmp_path):
    path = tmp_path / "all.jsonl"
    path.write_text("old\n")
    leftover = tmp_path / f".all.jsonl.abc.tmp-{dead_pid()}"  # a writer killed mid-file
    leftover.write_text("half")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write("new, half")
            raise RuntimeError
    assert path.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["all.jsonl"]
    with atomic_write(path) as f:
        f.write("new\n")
    assert path.read_text() == "new\n" and os.stat(path).st_mode & 0o777 == 0o644


def test_atomic_dir_never_overwrites_and_commits_0644_files(tmp_path):
    out = tmp_path / "out"
    (tmp_path / f".out.tmp-{dead_pid()}").mkdir()  # an export killed mid-write
    with atomic_dir(out) as tmp:
        with open(os.path.join(tmp, "model.safetensors"), "w") as f:
            f.write("x")
        os.chmod(os.path.join(tmp, "model.safetensors"), 0o600)
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert os.stat(out / "model.safetensors").st_mode & 0o777 == 0o644
    with pytest.raises(FileExistsError, match="not overwriting"):
        with atomic_dir(out) as tmp:
            open(os.path.join(tmp, "other"), "w").close()
    assert os.listdir(out) == ["model.safetensors"] and sorted(os.listdir(tmp_path)) == ["out"]
