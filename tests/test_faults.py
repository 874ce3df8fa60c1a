"""The fault sweep: each entry point killed with SIGKILL at a deterministic point (tests/workers/kill_at.py),
then the same command rerun: it finishes with the uninterrupted run's result and leaves no temporary files.
And the bad inputs of the fault issue, table-driven: one `error:` line each, exit 1, nothing written."""
import json
import os
import shutil
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


def test_training_killed_mid_checkpoint_resumes_from_the_last_complete_one_bit_identically(tmp_path):
    plain, broken = tmp_path / "plain", tmp_path / "broken"
    run_cli(train_cmd(plain))
    killed("trainer_state:2", *train_cmd(broken)[1:])  # checkpoint-6 torn: model and optimizer, no trainer_state
    ckpts = broken / "checkpoints" / "W4A8KV4"
    assert sorted(p for p in os.listdir(ckpts) if p.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-6"]
    proc = run_cli(train_cmd(broken))
    assert "checkpoint-6 is incomplete" in proc.stderr and "resuming from" in proc.stderr
    assert os.path.isdir(ckpts / "torn-checkpoint-6")
    a, b = weights(plain), weights(broken)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a different run never resumes these checkpoints: one line, nothing trained
    shutil.rmtree(broken / "models" / "W4A8KV4")  # as the "exists" error says
    proc = run_cli(train_cmd(broken, "--learning_rate", "1e-4"), check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "written by another run (learning_rate differ)" in proc.stderr and "Traceback" not in proc.stderr


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
