"""The fault sweep: each entry point killed with SIGKILL at a deterministic point (tests/workers/kill_at.py),
then the same command rerun: it finishes with the uninterrupted run's result and leaves no temporary files.
And the bad inputs of the fault issue, table-driven: one `error:` line each, exit 1, nothing written."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli
from utils.constants import EMBEDDED_EVAL, EMBEDDED_MODEL, EMBEDDED_TRAIN

pytestmark = pytest.mark.slow  # end-to-end: pytest -m "not slow" skips it
KILL = os.path.join(REPO, "tests", "workers", "kill_at.py")


def killed(point, *cmd, cwd=REPO):
    proc = run_cli([sys.executable, KILL, point, *cmd], cwd=cwd, check=False)
    assert proc.returncode == -9, proc.stderr[-3000:]


def hidden(directory):
    return sorted(p for p in os.listdir(directory) if p.startswith("."))


def test_merge_killed_before_its_rename_keeps_the_old_output_and_the_rerun_cleans_up(tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    for shard in range(2):
        (gen / f"gen.chunk.{shard:02d}.jsonl").write_text(
            "".join(json.dumps({"text": f"{shard}-{i}", "start_id": i, "prefix_length": 3}) + "\n" for i in range(50)))
    out = tmp_path / "all.jsonl"
    out.write_text('{"text": "old"}\n')
    cmd = ["merge_gen_data.py", "--gen_dir", str(gen), "--out", str(out), "--shuffle"]
    killed("replace", *cmd)
    assert out.read_text() == '{"text": "old"}\n' and len(hidden(tmp_path)) == 1  # the killed run's whole temp
    run_cli([sys.executable, *cmd])
    first = out.read_text()
    run_cli([sys.executable, *cmd])
    assert out.read_text() == first and first.count("\n") == 100 and hidden(tmp_path) == []


def test_eval_json_killed_before_its_rename_keeps_the_old_file(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old")
    cmd = ["eval.py", EMBEDDED_MODEL, "--seq_len", "64", "--max_windows", "2", "--output_json", str(out)]
    killed("replace", *cmd)
    assert out.read_text() == "old"
    run_cli([sys.executable, *cmd])
    assert json.loads(out.read_text())["ppl"]["shakespeare_eval"]["windows"] == 2 and hidden(tmp_path) == []


def test_export_killed_before_its_rename_leaves_nothing_trusted_and_the_rerun_exports(tmp_path):
    from transformers import AutoTokenizer
    from models.quant_model import QuantSetting, load_model
    qat = tmp_path / "qat"
    QuantSetting(4, 8, 4).apply(load_model(EMBEDDED_MODEL)).save_pretrained(qat)
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL).save_pretrained(qat)
    out = tmp_path / "out"
    killed("commit_dir", "export.py", str(qat), str(out))
    assert not out.exists() and len(hidden(tmp_path)) == 1  # a .out.tmp-<pid> of the killed run
    proc = run_cli([sys.executable, "export.py", str(qat), str(out)])
    assert "max_logit_diff 0" in proc.stdout and hidden(tmp_path) == []
    assert oct(os.stat(out / "model.safetensors").st_mode & 0o777) == "0o644"


def train_cmd(out, *extra):
    return [sys.executable, "train.py", "--input_model_filename", EMBEDDED_MODEL, "--train_data_local_path",
            EMBEDDED_TRAIN, "--local_dir", str(out), "--w_bits", "4", "--a_bits", "8", "--kv_bits", "4",
            "--model_max_length", "128", "--per_device_train_batch_size", "2", "--max_steps", "6", "--save_steps", "3",
            "--save_total_limit", "3", "--use_cpu", "True", "--report_to", "none", "--logging_steps", "1", *extra]


def weights(out):
    return load_file(os.path.join(out, "models", "W4A8KV4", "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The student of train_cmd run once without faults: what every killed-and-rerun training must save."""
    plain = tmp_path_factory.mktemp("plain")
    run_cli(train_cmd(plain))
    return weights(plain)


def same_student(a, out):
    b = weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoints(ckpts):
    return sorted(p for p in os.listdir(ckpts) if p.startswith("checkpoint"))


def test_training_killed_mid_run_resumes_from_its_last_checkpoint_bit_identically(tmp_path, uninterrupted):
    killed("training_step:5", *train_cmd(tmp_path)[1:])  # step 5: checkpoint-3 complete, steps 4-5 lost
    assert checkpoints(tmp_path / "checkpoints" / "W4A8KV4") == ["checkpoint-3"]
    proc = run_cli(train_cmd(tmp_path))
    assert "resuming from" in proc.stderr and "checkpoint-3" in proc.stderr
    same_student(uninterrupted, tmp_path)


def test_training_killed_mid_checkpoint_resumes_from_the_last_complete_one_bit_identically(tmp_path, uninterrupted):
    killed("trainer_state:2", *train_cmd(tmp_path)[1:])  # checkpoint-6 torn: model and optimizer, no trainer_state
    ckpts = tmp_path / "checkpoints" / "W4A8KV4"
    assert checkpoints(ckpts) == ["checkpoint-3", "checkpoint-6"]
    proc = run_cli(train_cmd(tmp_path))
    assert "checkpoint-6 is incomplete" in proc.stderr and "resuming from" in proc.stderr
    assert os.path.isdir(ckpts / "torn-checkpoint-6")
    same_student(uninterrupted, tmp_path)
    # a different run never resumes these checkpoints: one line, nothing trained
    shutil.rmtree(tmp_path / "models" / "W4A8KV4")  # as the "exists" error says
    proc = run_cli(train_cmd(tmp_path, "--learning_rate", "1e-4"), check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "written by another run (learning_rate differ)" in proc.stderr and "Traceback" not in proc.stderr


def test_training_killed_during_the_final_save_resumes_and_saves_the_same_student(tmp_path, uninterrupted):
    # the student's temporary directory about to be renamed into place
    killed("commit_dir", *train_cmd(tmp_path)[1:])
    assert not (tmp_path / "models" / "W4A8KV4").exists() and hidden(tmp_path / "models") == [".W4A8KV4.tmp-save"]
    proc = run_cli(train_cmd(tmp_path))
    assert "resuming from" in proc.stderr and hidden(tmp_path / "models") == []
    same_student(uninterrupted, tmp_path)


def test_evaluation_alone_does_not_overwrite_the_trained_models_results(tmp_path):
    out = tmp_path / "out"
    run_cli(train_cmd(out, "--max_steps", "2", "--save_strategy", "no", "--do_eval", "True",
                      "--eval_data_local_path", EMBEDDED_EVAL, "--max_eval_samples", "4", "--report_to", "tensorboard"))
    saved = out / "models" / "W4A8KV4" / "eval_results.json"
    before = saved.read_text()
    run_cli(train_cmd(out, "--do_train", "False", "--do_eval", "True", "--eval_data_local_path", EMBEDDED_EVAL,
                      "--max_eval_samples", "4", "--output_model_filename", "rtn"))
    assert saved.read_text() == before and (out / "checkpoints" / "rtn" / "eval_results.json").is_file()
    # the README's `python eval.py output/models/W4A8KV4`: a student of the embedded model gets its held-out text
    proc = run_cli([sys.executable, "eval.py", str(out / "models" / "W4A8KV4"), "--seq_len", "64", "--max_windows", "2"])
    assert "perplexity shakespeare_eval:" in proc.stdout
    # each run its own TensorBoard directory, <local_dir>/runs/<name>/<start time>
    assert os.listdir(out / "runs") == ["W4A8KV4"] and len(os.listdir(out / "runs" / "W4A8KV4")) == 1


def bad_model(tmp_path):
    bad = tmp_path / "badmodel"
    bad.mkdir(exist_ok=True)
    (bad / "config.json").write_text("{ not json")
    return str(bad)


def binary_file(tmp_path):
    path = tmp_path / "binary.jsonl"
    path.write_bytes(b'{"text": "ok"}\n\xff\xfe\x00garbage\n')
    return str(path)


def train_argv(out, *extra):
    return train_cmd(out, *extra)[1:]


# (entry point, argv) -> the one line's text; entry points run in this process (cli()'s SystemExit)
BAD = {
    "eval-broken-config": (lambda t: ["eval.py", bad_model(t)], "cannot read its config.json"),
    "generate-broken-config": (lambda t: ["generate_data.py", "0", "--model", bad_model(t)], "cannot read its config.json"),
    "export-broken-config": (lambda t: ["export.py", bad_model(t), str(t / "x")], "cannot read its config.json"),
    "train-binary-data": (lambda t: train_argv(t / "o", "--train_data_local_path", binary_file(t)),
                          "binary.jsonl:2: not a JSON"),
    "eval-binary-data": (lambda t: ["eval.py", EMBEDDED_MODEL, "--ppl_data", binary_file(t)], "binary.jsonl:2"),
    "max_length-0": (lambda t: train_argv(t / "o", "--model_max_length", "0"), "--model_max_length 0: must be >= 2"),
    "max_length-negative": (lambda t: train_argv(t / "o", "--model_max_length", "-3"),
                            "--model_max_length -3: must be >= 2"),
    "generate-out_dir-file": (lambda t: ["generate_data.py", "0", "--out_dir", "README.md"], "is a file, not a directory"),
    "max_steps-negative": (lambda t: train_argv(t / "o", "--max_steps", "-5"), "--max_steps -5: use >= 1, or -1"),
    "max_steps-0": (lambda t: train_argv(t / "o", "--max_steps", "0"), "--max_steps 0: use >= 1, or -1"),
    "w_bits-abc": (lambda t: train_argv(t / "o", "--w_bits", "abc"), "invalid int value: 'abc'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, monkeypatch, case):
    import runpy
    argv, message = BAD[case]
    argv = argv(tmp_path)
    before = set(os.listdir(REPO))
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(REPO, argv[0]), run_name="__main__")
    line = str(e.value.code)
    assert line.startswith("error: ") and message in line and "\n" not in line, line
    assert not (tmp_path / "o").exists() and not (tmp_path / "x").exists() and set(os.listdir(REPO)) == before


def test_run_train_with_a_broken_config_is_one_line(tmp_path):
    proc = run_cli(["sh", "run_train.sh", "4", "8", "4"], env={"MODEL": bad_model(tmp_path)}, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "cannot read its config.json" in proc.stderr and "Traceback" not in proc.stderr


# ---- full disks: a tmpfs of a few KB / MB (needs root to mount; skipped with the reason otherwise) ----

@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a directory on a fresh tmpfs of that size; resize(size) grows it, as freeing space would."""
    disk = tmp_path / "disk"
    disk.mkdir()

    def mount(size):
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}): the full-disk cases "
                        "need one (root)")
        return disk

    def resize(size):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)

    yield mount, resize
    subprocess.run(["umount", str(disk)], capture_output=True)


def disk_full_line(proc):
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]  # the last line: open progress bars are closed before it
    assert line.startswith("error: ") and "no space left on device" in line and "rerun the same command" in line, line


def fill(path, leave=0):
    """Fill the disk holding path until at most `leave` bytes are free (a file that can be deleted later)."""
    with open(path, "wb") as f:
        try:
            while os.statvfs(path).f_bavail * os.statvfs(path).f_frsize > leave:
                f.write(b"\0" * 1024)
                f.flush()
        except OSError:
            pass


def files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def test_full_disk_merge_export_eval_and_generation_one_line_nothing_trusted_and_the_rerun_completes(
        small_disk, tmp_path):
    from transformers import AutoTokenizer
    from models.quant_model import QuantSetting, load_model
    mount, resize = small_disk
    disk = mount("64k")
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "gen.chunk.00.jsonl").write_text("".join(json.dumps({"text": f"{i} " + "x" * 1000}) + "\n"
                                                    for i in range(200)))
    merge = [sys.executable, "merge_gen_data.py", "--gen_dir", str(gen), "--out", str(disk / "all.jsonl")]
    disk_full_line(run_cli(merge, check=False))
    assert files(disk) == []  # no torn output, no temporary file
    qat = tmp_path / "qat"
    QuantSetting(4, 8, 4).apply(load_model(EMBEDDED_MODEL)).save_pretrained(qat)
    AutoTokenizer.from_pretrained(EMBEDDED_MODEL).save_pretrained(qat)
    export = [sys.executable, "export.py", str(qat), str(disk / "exported")]
    disk_full_line(run_cli(export, check=False))
    assert files(disk) == [] and hidden(disk) == []
    fill(disk / "filler")
    evaluate = [sys.executable, "eval.py", EMBEDDED_MODEL, "--seq_len", "64", "--max_windows", "2", "--output_json",
                str(disk / "r.json")]
    disk_full_line(run_cli(evaluate, check=False))
    assert files(disk) == ["filler"]
    (disk / "filler").unlink()
    # generation: a shard torn by the full disk is completed by the rerun, the same as an uninterrupted run
    generate = [sys.executable, "generate_data.py", "0", "--n_vocab", "48", "--max_length", "96", "--prefix_lengths",
                "3", "4"]
    run_cli([*generate, "--out_dir", str(tmp_path / "plain")])
    fill(disk / "filler", leave=24 * 1024)
    disk_full_line(run_cli([*generate, "--out_dir", str(disk / "gen")], check=False))
    (disk / "filler").unlink()
    resize("8m")  # space freed: every command reruns as it was
    run_cli([*generate, "--out_dir", str(disk / "gen")])
    shard = (disk / "gen" / "gen.chunk.00.jsonl").read_text()
    assert shard == (tmp_path / "plain" / "gen.chunk.00.jsonl").read_text() and shard.count("\n") == 96
    run_cli(merge)
    assert (disk / "all.jsonl").read_text().count("\n") == 200
    assert "max_logit_diff 0" in run_cli(export).stdout
    run_cli(evaluate)
    assert json.loads((disk / "r.json").read_text())["ppl"]["shakespeare_eval"]["windows"] == 2
    assert hidden(disk) == []


def test_full_disk_during_a_checkpoint_is_one_line_and_the_rerun_trains_the_same_student(small_disk, tmp_path,
                                                                                          uninterrupted):
    mount, resize = small_disk
    disk = mount("40m")  # the fp32 student (16 MB) fits, its checkpoint with the optimizer state (48 MB) does not
    disk_full_line(run_cli(train_cmd(disk), check=False))
    assert not (disk / "models" / "W4A8KV4").exists()
    resize("400m")
    proc = run_cli(train_cmd(disk))
    assert "checkpoint-3 is incomplete" in proc.stderr  # set aside, not resumed
    same_student(uninterrupted, disk)
