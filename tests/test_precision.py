"""The precision regimes (utils/precision.py): the same dtypes under 1 and 2 processes (real FSDP2 on CPU), the
original's pure-bf16 regime under both, and the contradictions refused before any work."""
import json
import math
import sys

import pytest
from safetensors import safe_open
from transformers import TrainerCallback

from conftest import run_cli

PROBE = "tests/workers/precision_probe.py"
SHORT = ["--qat", "True", "--w_bits", "4", "--a_bits", "8", "--kv_bits", "4", "--model_max_length", "64",
         "--max_train_samples", "4", "--max_steps", "3", "--shuffle", "False", "--use_cpu", "True",
         "--report_to", "none", "--save_strategy", "no", "--do_eval", "False", "--logging_steps", "1"]


def probe(tmp_path, nproc, *flags):
    """One 3-step W4A8KV4 run (global batch 4) with 1 or 2 processes; rank 0's probe record."""
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", "2"]
    fsdp = [] if nproc == 1 else ["--fsdp", "full_shard auto_wrap"]
    prefix = tmp_path / f"probe{nproc}"
    run_cli([*launch, PROBE, str(prefix), *SHORT, "--local_dir", str(tmp_path / f"out{nproc}"),
             "--per_device_train_batch_size", str(4 // nproc), *fsdp, *flags])
    records = [json.load(open(f"{prefix}.{rank}.json")) for rank in range(nproc)]
    assert all(r == records[0] for r in records)  # every rank saw the same
    return records[0]


def close(a, b, rel):
    return abs(a - b) <= rel * abs(b)


@pytest.mark.slow
def test_bf16_one_and_two_processes_quantize_the_same_dtypes(tmp_path):
    """--bf16 True: under FSDP the quantizers see what they see in one process (fp32 master weights, the fp32
    residual stream into q/k/v/gate/up, bf16 attention / MLP outputs into o/down), under bf16 autocast.
    accelerate's own FSDP2 policy would hand them bf16 weights and inputs and no autocast."""
    one, two = (probe(tmp_path, n, "--bf16", "True") for n in (1, 2))
    assert one["quantizer_inputs"] == two["quantizer_inputs"]
    seen = one["quantizer_inputs"]
    assert len(seen) == 28  # 4 layers x 7 linears
    assert {tuple(v) for k, v in seen.items() if k.endswith(("q_proj", "k_proj", "up_proj"))} == {
        ("float32", "float32", "bfloat16")}
    assert {tuple(v) for k, v in seen.items() if k.endswith(("o_proj", "down_proj"))} == {
        ("bfloat16", "float32", "bfloat16")}
    assert one["params"] == two["params"] == ["float32"] and one["optimizer_state"] == ["float32"]
    # bf16 GEMMs on CPU round differently with 1 and 2 threads per process (measured: 1.1e-3 apart); fp32 runs
    # agree exactly (tests/test_train.py)
    assert close(one["losses"][0], two["losses"][0], 5e-3), (one["losses"], two["losses"])


@pytest.mark.slow
def test_original_regime_trains_pure_bf16_under_one_and_two_processes(tmp_path):
    one, two = (probe(tmp_path, n, "--precision", "original") for n in (1, 2))
    for r in (one, two):
        assert r["params"] == ["bfloat16"] and r["optimizer_state"] == ["bfloat16"]  # pure bf16 AdamW
        assert r["attn_implementation"] == "eager"
        assert {tuple(v) for v in r["quantizer_inputs"].values()} == {("bfloat16", "bfloat16", "bfloat16")}
        assert all(math.isfinite(x) for x in r["losses"]) and len(r["losses"]) == 3
    assert close(one["losses"][0], two["losses"][0], 5e-3), (one["losses"], two["losses"])
    for nproc in (1, 2):  # the saved student is the bf16 weights it trained
        model_dir = tmp_path / f"out{nproc}" / "models" / "W4A8KV4"
        with safe_open(model_dir / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert json.load(open(model_dir / "config.json"))["dtype"] == "bfloat16"


@pytest.mark.parametrize("flags, message", [
    (["--load_dtype", "bfloat16"], "error: --load_dtype bfloat16: pure bf16 student weights are the original's "
                                   "regime; pass --precision original"),
    (["--load_dtype", "float32", "--precision", "original"],
     "error: --load_dtype float32: --precision original trains bfloat16 weights"),
    (["--precision", "fp8"], "error: argument --precision: invalid choice: 'fp8'"),
])
def test_precision_contradictions_are_one_line_before_any_work(tmp_path, flags, message):
    from utils.errors import cli
    from utils.process_args import process_args
    with pytest.raises(SystemExit) as e:  # train.py's own path: cli(process_args), in this process
        cli(lambda: process_args(["--local_dir", str(tmp_path / "out"), *flags]))
    assert str(e.value.code).startswith(message) and "\n" not in str(e.value.code), e.value.code
    assert not (tmp_path / "out").exists()


class LossLog(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def test_attn_implementation_eager_runs_the_student_and_the_teacher_eagerly_and_sdpa_wins_over_the_original(
        tmp_path, eager_attention_calls):
    """--attn_implementation eager: every attention of the student's and the teacher's forward is Hugging Face's
    eager one (the default runs none), and in fp32 the first KD loss is the default's; an explicit
    choice also overrides the original regime's eager attention; a bad value is one line."""
    from utils import precision
    from utils.errors import cli
    from utils.process_args import process_args
    from utils.train_qat import run
    calls, losses = eager_attention_calls, {}
    for attention, qat in (("sdpa", "True"), ("eager", "True"), ("sdpa", "False"), ("eager", "False")):
        calls.clear()
        out = tmp_path / f"{attention}{qat}"
        args = process_args([*SHORT, "--max_steps", "1", "--per_device_train_batch_size", "2", "--qat", qat,
                             "--local_dir", str(out), "--output_dir", str(out / "ckpt"),
                             *(["--attn_implementation", "eager"] if attention == "eager" else [])])
        logged = LossLog()
        run(*args, callbacks=[logged])
        losses[attention, qat] = logged.losses[0]
        # one step: the student's forward (4 layers; its backward reuses it) and the teacher's (4 layers)
        assert len(calls) == (8 if attention == "eager" else 0), (attention, len(calls))
        if qat == "True":  # the run's choice, not the model's: the saved config does not carry it
            assert "eager" not in (out / "models" / "W4A8KV4" / "config.json").read_text()
    # the same attention, in fp32: the unquantized student's loss agrees (the 4-bit student's roundings move with
    # any change of the attention's: 0.14% here)
    assert close(losses["eager", "False"], losses["sdpa", "False"], 1e-5), losses
    original = process_args(["--precision", "original", "--attn_implementation", "sdpa", "--local_dir", str(tmp_path)])
    assert precision.model_kwargs(original[2]) == {"attn_implementation": "sdpa"}
    assert precision.model_kwargs(process_args(["--local_dir", str(tmp_path)])[2]) == {}
    with pytest.raises(SystemExit) as e:
        cli(lambda: process_args(["--attn_implementation", "flash", "--local_dir", str(tmp_path / "bad")]))
    assert str(e.value.code).startswith(
        "error: argument --attn_implementation/--attn-implementation: invalid choice: 'flash' (choose from 'sdpa', "
        "'eager')")
    assert "\n" not in str(e.value.code) and not (tmp_path / "bad").exists()
