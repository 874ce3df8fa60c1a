"""End-to-end: run_train.sh / train.py on the embedded model, 1 and 2 processes (real FSDP on CPU)."""
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from models.quant_model import load_model
from models.utils_quant import QuantizeLinear, quantize_weight

from conftest import REPO, TIMEOUT  # noqa: E402

pytestmark = pytest.mark.slow  # end-to-end: pytest -m "not slow" skips it

# 64-token blocks; 4 training blocks = one global batch, repeated every step, so the loss must fall
SHORT = ["--model_max_length", "64", "--max_train_samples", "4", "--max_eval_samples", "8", "--learning_rate", "1e-4"]


def run(cmd, out, env=None, check=True):
    env = {**os.environ, "PYTHON": sys.executable, "OUTPUT": str(out), **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def losses(out, name):
    (state,) = glob.glob(f"{out}/checkpoints/{name}/checkpoint-*/trainer_state.json")
    return [h["loss"] for h in json.load(open(state))["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def one_proc(tmp_path_factory):
    """W4-A8-KV4 with KD, 1 process, file order (comparable with the 2-process run below)."""
    out = tmp_path_factory.mktemp("one")
    proc = run(["sh", "run_train.sh", "4", "8", "4", *SHORT, "--shuffle", "False", "--per_device_train_batch_size",
                "4", "--max_steps", "12"], out)
    return out, proc


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    proc = run(["sh", "run_train.sh", "4", "8", "4", *SHORT, "--shuffle", "False", "--per_device_train_batch_size",
                "2", "--max_steps", "12"], out, env={"NPROC": "2"})
    return out, proc


def test_qat_kd_run_saves_a_quantized_student_and_loss_drops(one_proc):
    out, proc = one_proc
    model_dir = out / "models" / "W4A8KV4"
    config = json.load(open(model_dir / "config.json"))
    assert (config["w_bits"], config["a_bits"], config["kv_bits"]) == (4, 8, 4)
    assert (model_dir / "model.safetensors").exists() and (model_dir / "tokenizer_config.json").exists()
    assert not any("teacher" in k for k in load_file(model_dir / "model.safetensors"))
    model = load_model(str(model_dir))
    assert type(model.model.layers[0].self_attn.k_proj) is QuantizeLinear
    assert model.model.layers[0].self_attn.k_proj.out_bits == 4
    loss = losses(out, "W4A8KV4")
    assert len(loss) == 12 and max(loss[-3:]) < 0.6 * loss[0], loss
    assert glob.glob(f"{out}/runs/W4A8KV4/*/events.out.tfevents.*")  # one directory per run
    ppl = json.load(open(model_dir / "eval_results.json"))["perplexity"]
    assert 1 < ppl < 200, ppl
    assert "perplexity" in proc.stderr + proc.stdout
    assert "***** Running training *****" in proc.stderr + proc.stdout
    assert "Model config LlamaConfig" not in proc.stderr + proc.stdout  # once printed for every from_pretrained


def test_fsdp_two_processes_really_shard_and_match_one_process(one_proc, two_proc):
    (out1, proc1), (out2, proc2) = one_proc, two_proc
    for role in ("student", "teacher"):  # the frozen teacher is sharded too (--shard_teacher True, the default)
        held = [tuple(map(int, m)) for m in re.findall(rf"rank \d/2 holds (\d+) of (\d+) {role} ",
                                                       proc2.stdout + proc2.stderr)]
        assert len(held) == 2, proc2.stdout[-2000:]
        full = held[0][1]
        assert sum(local for local, _ in held) == full
        assert all(0.4 * full < local < 0.6 * full for local, _ in held)
        assert "holds %d of %d %s" % (full, full, role) in proc1.stdout + proc1.stderr  # 1 process holds all
    loss = losses(out2, "W4A8KV4")
    assert max(loss[-3:]) < 0.6 * loss[0], loss
    w1 = load_file(out1 / "models" / "W4A8KV4" / "model.safetensors")
    w2 = load_file(out2 / "models" / "W4A8KV4" / "model.safetensors")
    assert w1.keys() == w2.keys()
    # Same global batches (4 blocks a step, file order); FSDP reduces gradients in a different order, and a
    # 1e-7 difference can move a weight across a 4-bit rounding boundary, so the match is close, not exact.
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff < 2e-3, diff
    # before any update the two launches compute the same loss (fp32: the same dtypes, utils/precision.py)
    assert losses(out1, "W4A8KV4")[0] == pytest.approx(loss[0], rel=1e-6)


def test_original_memory_layout_trains_the_identical_student(two_proc, tmp_path):
    """The default 2-process run builds rank 1's models without weights (rank 0 broadcasts them) and shards
    the teacher; the original's layout (every rank loads both, a whole teacher per rank) only costs memory:
    the same losses and the same bits out."""
    out2, proc2 = two_proc
    log2 = proc2.stdout + proc2.stderr
    assert "rank 1: building the models without weights" in log2 and "rank 0: building" not in log2
    assert len(re.findall(r"rank \d/2 host memory peak so far: \d+ MiB", log2)) == 2
    proc = run(["sh", "run_train.sh", "4", "8", "4", *SHORT, "--shuffle", "False", "--per_device_train_batch_size",
                "2", "--max_steps", "12", "--shard_teacher", "False", "--do_eval", "False",
                "--fsdp_config", '{"cpu_ram_efficient_loading": false}'], tmp_path, env={"NPROC": "2"})
    log = proc.stdout + proc.stderr
    assert "without weights" not in log
    assert len(re.findall(r"rank \d/2 holds (\d+) of \1 teacher ", log)) == 2, log[-2000:]
    assert losses(tmp_path, "W4A8KV4") == losses(out2, "W4A8KV4")
    w_sharded = load_file(out2 / "models" / "W4A8KV4" / "model.safetensors")
    w_full = load_file(tmp_path / "models" / "W4A8KV4" / "model.safetensors")
    assert all(torch.equal(w_sharded[k], w_full[k]) for k in w_sharded)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_two_nodes_on_localhost_save_the_weights_of_two_processes_on_one(two_proc, tmp_path):
    """NNODES=2: two launches of run_train.sh (node ranks 0 and 1, one process each, torchrun's static
    rendezvous on 127.0.0.1) train bit for bit what NPROC=2 trains on one node. One thread per process, as
    torchrun gives NPROC=2 (a CPU's GEMM sums in another order with another thread count)."""
    out2, _ = two_proc
    cmd = ["sh", "run_train.sh", "4", "8", "4", *SHORT, "--shuffle", "False", "--per_device_train_batch_size", "2",
           "--max_steps", "12"]
    env = {**os.environ, "PYTHON": sys.executable, "OUTPUT": str(tmp_path), "NNODES": "2", "NPROC": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, cwd=REPO, env={**env, "NODE_RANK": rank}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in ("0", "1")]
    logs = [node.communicate(timeout=TIMEOUT)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "on each of 2 nodes (this is node 1" in logs[1]
    assert losses(tmp_path, "W4A8KV4") == losses(out2, "W4A8KV4")
    w_nodes = load_file(tmp_path / "models" / "W4A8KV4" / "model.safetensors")
    w_one = load_file(out2 / "models" / "W4A8KV4" / "model.safetensors")
    assert w_nodes.keys() == w_one.keys() and all(torch.equal(w_nodes[k], w_one[k]) for k in w_one)


def test_slurm_script_starts_one_torchrun_per_node(tmp_path):
    """run_train_slurm.sh under a stand-in SLURM (srun runs its command once per node, here on localhost):
    NNODES from the allocation, MASTER_ADDR its first host, NODE_RANK each task's node id."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\necho 127.0.0.2\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'
                                  'for n in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do SLURM_NODEID=$n "$@" &\n'
                                  'pids="$pids $!"; done\nfor p in $pids; do wait $p || exit 1; done\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": REPO, "NPROC": "1"}
    proc = run(["sh", "run_train_slurm.sh", "4", "8", "4", *SHORT, "--max_steps", "2", "--do_eval", "False"],
               tmp_path / "out", env=env)
    assert "2 node(s), rendezvous 127.0.0.1:24242" in proc.stdout
    assert all(f"on each of 2 nodes (this is node {r}" in proc.stdout for r in (0, 1)), proc.stdout[-2000:]
    assert (tmp_path / "out" / "models" / "W4A8KV4" / "model.safetensors").exists()
    proc = run(["sh", "run_train_slurm.sh", "4", "8", "4"], tmp_path / "out2", env={"SLURM_JOB_NODELIST": ""},
               check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: no SLURM allocation")


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "two"}, "error: NNODES=two is not allowed; use a positive integer"),
    ({"NNODES": "2", "MASTER_ADDR": "h"}, "error: NODE_RANK=(unset) is not allowed; use 0..1"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "error: NODE_RANK=2 is not allowed; use 0..1"),
    ({"NNODES": "2", "NODE_RANK": "0"}, "error: MASTER_ADDR is unset"),
    ({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "70000"},
     "error: MASTER_PORT=70000 is not allowed; use 1-65535"),
    ({"NPROC": "0"}, "error: NPROC=0 is not allowed; use a positive integer"),
])
def test_bad_node_values_are_one_line_before_anything_starts(tmp_path, env, message):
    proc = run(["sh", "run_train.sh", "4", "8", "4"], tmp_path / "out", env=env, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(message), proc.stderr
    assert not (tmp_path / "out").exists()


def test_evaluation_alone_under_fsdp_matches_one_process(tmp_path):
    """--do_train False (the RTN baseline through train.py) with 2 processes: the Trainer's own FSDP2 prepare
    refuses a model without an optimizer; the student is sharded like the teacher instead."""
    ppl = {}
    for nproc in ("1", "2"):
        proc = run(["sh", "run_train.sh", "4", "8", "4", *SHORT, "--do_train", "False"], tmp_path / nproc,
                   env={"NPROC": nproc})
        (ppl[nproc],) = re.findall(r"perplexity (\d+\.\d+) on ", proc.stderr)
    assert ppl["1"] == ppl["2"] and 1 < float(ppl["1"]) < 200, ppl


def test_use_kd_false_trains_on_next_token_loss(tmp_path):
    run(["sh", "run_train.sh", "8", "8", "8", *SHORT, "--use_kd", "False", "--max_steps", "6"], tmp_path)
    loss = losses(tmp_path, "W8A8KV8")
    # a next-token cross-entropy (ln of a perplexity ~30 at the start), as the original's plain Trainer trained
    assert 2 < loss[0] < 5 and 0.5 < loss[-1] < loss[0], loss
    ppl = json.load(open(tmp_path / "models" / "W8A8KV8" / "eval_results.json"))["perplexity"]
    assert 1 < ppl < 200, ppl


@pytest.mark.parametrize("bits,bad", [(("4", "9", "4"), "a_bits=9"), (("0", "8", "8"), "w_bits=0"),
                                      (("4", "8", "x"), "kv_bits=x"), (("4", "8", "1"), "kv_bits=1")])
def test_run_train_rejects_bad_bits_before_anything_starts(tmp_path, bits, bad):
    proc = run(["sh", "run_train.sh", *bits], tmp_path / "out", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and bad in proc.stderr
    assert not (tmp_path / "out").exists()


def test_help_shows_the_papers_recipe_defaults_once():
    out = run([sys.executable, "train.py", "--help"], REPO).stdout
    flat = " ".join(out.split())
    for flag, default in (("learning_rate", "2e-05"), ("lr_scheduler_type", "cosine"), ("num_train_epochs", "1.0"),
                          ("per_device_train_batch_size", "1"), ("weight_decay", "0.0"), ("save_steps", "2000")):
        assert re.search(rf"--{flag} \S+, --\S+ \S+ [^(]*\(the paper's recipe\) \(default: {re.escape(default)}\)",
                         flat), flag
    assert not re.search(r"\(default: [^)]*\) \(default:", flat)


def test_run_train_usage(tmp_path):
    proc = run(["sh", "run_train.sh", "4", "8"], tmp_path, check=False)
    assert proc.returncode == 1 and "usage:" in proc.stderr


def test_missing_model_path_is_one_error_line(tmp_path):
    proc = run(["sh", "run_train.sh", "4", "8", "4"], tmp_path / "out", env={"MODEL": str(tmp_path / "nope")},
               check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: MODEL={tmp_path}/nope is not a local Hugging " \
        "Face model directory (no config.json)"
    proc = run([sys.executable, "train.py", "--input_model_filename", str(tmp_path / "nope"), "--local_dir",
                str(tmp_path / "out")], tmp_path, check=False)
    assert proc.returncode == 1 and "error: --input_model_filename" in proc.stderr
    assert "no such directory" in proc.stderr
    assert not (tmp_path / "out" / "models").exists()


def test_bad_data_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    proc = run(["sh", "run_train.sh", "4", "8", "4"], tmp_path / "out", env={"TRAIN_DATA": str(bad)}, check=False)
    assert proc.returncode == 1 and f"error: {bad}:2:" in proc.stderr
    assert not (tmp_path / "out" / "models").exists()


def test_existing_model_is_not_overwritten(tmp_path):
    target = tmp_path / "models" / "W4A8KV4"
    target.mkdir(parents=True)
    (target / "keep").write_text("x")
    proc = run(["sh", "run_train.sh", "4", "8", "4"], tmp_path, check=False)
    assert proc.returncode == 1 and "exists" in proc.stderr
    assert os.listdir(target) == ["keep"]


def test_run_train_chunk_reads_live_shards(tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    lines = [json.loads(x) for x in open(os.path.join(REPO, "assets/data/shakespeare_train_small.jsonl"))][:40]
    for shard in range(2):
        with open(gen / f"gen.chunk.{shard:02d}.jsonl", "w") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines[shard::2])
    with open(gen / "gen.chunk.01.jsonl", "a") as f:
        f.write('{"text": "a line still being wri')  # shard 1 is still being written
    run(["sh", "run_train_chunk.sh", "4", "8", "4", *SHORT, "--max_steps", "3"], tmp_path / "out",
        env={"GEN_DIR": str(gen)})
    assert (tmp_path / "out" / "models" / "W4A8KV4" / "model.safetensors").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run(["sh", "run_train_chunk.sh", "4", "8", "4"], tmp_path / "out2", env={"GEN_DIR": str(empty)},
               check=False)
    assert proc.returncode == 1 and "no shards" in proc.stderr


def test_qat_false_is_the_unquantized_control(tmp_path):
    run(["sh", "run_train.sh", "4", "8", "4", *SHORT, "--qat", "False", "--max_steps", "2", "--do_eval", "False"],
        tmp_path)
    model_dir = tmp_path / "models" / "W32A32KV32"
    assert "w_bits" not in json.load(open(model_dir / "config.json"))
    assert type(load_model(str(model_dir)).model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_group_wise_weights_pass_through_to_the_saved_model(tmp_path):
    run(["sh", "run_train.sh", "4", "8", "4", *SHORT, "--w_group_size", "16", "--max_steps", "2", "--do_eval", "False"],
        tmp_path)
    model_dir = tmp_path / "models" / "W4A8KV4-g16"
    assert json.load(open(model_dir / "config.json"))["w_group_size"] == 16
    model = load_model(str(model_dir))
    down = model.model.layers[0].mlp.down_proj
    assert down.w_group_size == 16 and torch.equal(
        down.quantized_weight(), quantize_weight(down.weight, 4, group_size=16))


def test_interrupted_run_resumes_from_its_last_checkpoint_under_fsdp(tmp_path):
    """Under 2-process FSDP (sharded optimizer state, rank 1 built without weights): the resumed run logs the
    same losses as the uninterrupted one (one process, killed with SIGKILL: tests/test_faults.py)."""
    args = ["sh", "run_train.sh", "4", "8", "4", *SHORT, "--max_steps", "4", "--save_steps", "2",
            "--save_total_limit", "2", "--do_eval", "False", "--shuffle", "False",
            "--per_device_train_batch_size", "2"]  # 2 per process: batches of 4
    run(args, tmp_path, env={"NPROC": "2"})
    ckpts = tmp_path / "checkpoints" / "W4A8KV4"
    uninterrupted = json.load(open(ckpts / "checkpoint-4" / "trainer_state.json"))["log_history"]
    shutil.rmtree(ckpts / "checkpoint-4")  # as if killed between step 2 and the end
    shutil.rmtree(tmp_path / "models")
    proc = run(args, tmp_path, env={"NPROC": "2"})
    assert f"resuming from {ckpts}/checkpoint-2" in proc.stderr
    state = json.load(open(ckpts / "checkpoint-4" / "trainer_state.json"))
    assert state["global_step"] == 4 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    assert [h["loss"] for h in state["log_history"] if "loss" in h] == [h["loss"] for h in uninterrupted if "loss" in h]
    assert (tmp_path / "models" / "W4A8KV4" / "model.safetensors").exists()
