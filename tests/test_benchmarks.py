"""Benchmarks cannot rot: every script under benchmarks/ runs here in seconds (the embedded model, small arguments
or a smoke mode), and its last line(s) have the exact format its docstring promises, with finite positive numbers.
A refactor that breaks a benchmark fails the suite; a new script without a test here fails test_every_benchmark_
is_tested.

Most run as a user runs them (a subprocess through conftest.run_cli: offline, this interpreter); gpu_check.py's
exactness part and llama_cpp_check.py's missing-llama.cpp line run in-process (no CUDA / no llama-cpp-python here).
Nothing here imports transformers at module level (test_kernels.py must import triton first)."""
import importlib.util
import json
import math
import re
import statistics
import subprocess
import sys

import pytest
import torch

from conftest import REPO_PATH, SMOLLM2_CACHED, run_cli

BENCH = REPO_PATH / "benchmarks"
TINY_MODEL = str(REPO_PATH / "assets" / "tiny_llama")
NUM = r"([-+]?\d+\.\d+)"  # a fixed-point number as the scripts print them (nan / inf never match)


def bench(name, *args, **kwargs):
    return run_cli([sys.executable, str(BENCH / name), *map(str, args)], **kwargs)


def lines(proc):
    out = [line for line in proc.stdout.splitlines() if line.strip()]
    assert out, f"no output on stdout\n{proc.stderr[-3000:]}"
    return out


def fields(pattern, line):
    """The numbers of `line`, which must match `pattern` exactly."""
    m = re.fullmatch(pattern, line)
    assert m, f"{line!r} does not match {pattern!r}"
    return [float(g) for g in m.groups()]


def json_line(name, line):
    """The object of a `<name> <json>` last line."""
    assert re.fullmatch(re.escape(name) + r" \{.*\}", line), line
    return json.loads(line.split(" ", 1)[1])


def positive(*values):
    assert all(math.isfinite(v) and v > 0 for v in values), values


def load(name):
    """benchmarks/<name> as a module, in-process."""
    spec = importlib.util.spec_from_file_location(f"bench_{name[:-3]}", BENCH / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_bench_bf16():
    out = lines(bench("bench_bf16.py", "--model", TINY_MODEL, "--steps", 3, "--max_windows", 4, "--seeds", 0, 1,
                      "--grad_check"))
    checks = [line for line in out if line.startswith("grad_check ")]
    assert len(checks) == 3 and checks[0].startswith("grad_check bf16: ")
    for line in checks:  # bf16 and two perturbed fp32 steps: near the fp32 step's gradient, not equal to it
        loss, loss0, cos, rel = fields(r"grad_check [^:]+: kd loss " + NUM + r" \(fp32 " + NUM + r"\), gradient cosine "
                                       + NUM + r", relative error " + NUM, line)
        positive(loss, loss0)
        assert 0.5 < cos < 1 and 0 < rel < 1
    seeds = [line for line in out if line.startswith("seed ")]
    assert len(seeds) == 2
    for seed, line in zip((0, 1), seeds):
        fp32, bf16, diff = fields(rf"seed {seed}: validation ppl fp32 {NUM}, bf16 {NUM} \(([-+]\d\.\d{{4}})\)", line)
        positive(fp32, bf16)
        assert abs(bf16 / fp32 - 1 - diff) < 1e-4
    for name, line in zip(("fp32", "bf16"), out[-5:-3]):
        positive(*fields(name + r": median step " + NUM + r" s, validation ppl " + NUM
                         + r" after 3 steps \(mean of 2 seeds\)", line))
    assert fields(r"ppl_pair_sd " + NUM, out[-3])[0] >= 0
    assert re.fullmatch(r"ppl_rel_diff [-+]\d\.\d{4}", out[-2])
    positive(*fields(r"bf16_step_speedup (\d+\.\d{2})", out[-1]))


def test_bench_generate():
    out = lines(bench("bench_generate.py", "--num_ids", 4, "--prefix_lengths", 3, "--max_length", 24,
                      "--threads", 1))
    assert out[0].startswith("model ") and "4 start ids x prefix lengths [3] = 4 sequences, max_length 24" in out[0]
    for line in out[-5:-2]:  # original, peer, ours
        tokens, seconds, rate = fields(r".{36} 4 sequences, (\d+) tokens in (\d+\.\d) s: (\d+) tokens/s", line)
        assert tokens > 0 and rate > 0
    positive(*fields(r"speedup_vs_hf_generate (\d+\.\d{2})x", out[-2]))
    positive(*fields(r"speedup (\d+\.\d)x", out[-1]))


def test_bench_generate_rounds_without_the_original_loop():
    out = lines(bench("bench_generate.py", "--num_ids", 2, "--prefix_lengths", 3, "--max_length", 16,
                      "--threads", 1, "--rounds", 2, "--skip_original"))
    assert out[0].endswith("HF generate and ours 2 times each")
    assert out[-3].startswith("HF generate") and out[-2].startswith("ours")  # no original line
    positive(*fields(r"speedup_vs_hf_generate (\d+\.\d{2})x", out[-1]))


def test_bench_generate_defaults_as_documented():
    module = load("bench_generate.py")
    args = module.parse_args([])
    assert (args.num_ids, args.prefix_lengths, args.max_length) == (16, [3, 4, 5], 96)
    assert "16 start ids x prefix lengths 3 4 5 = 48 sequences, max_length 96" in module.__doc__


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2_CACHED, reason="SmolLM2 is not cached (python tools/get_model.py smollm2)")
def test_bench_generate_resolves_a_packaged_name_offline():
    out = lines(bench("bench_generate.py", "--model", "smollm2", "--num_ids", 2, "--prefix_lengths", 3,
                      "--max_length", 8, "--threads", 1))
    assert out[0].startswith("model smollm2 (") and "2 sequences, max_length 8" in out[0]
    positive(*fields(r"speedup (\d+\.\d)x", out[-1]))


def test_bench_export():
    out = lines(bench("bench_export.py", "--new_tokens", 8, "--repeats", 1, "--threads", 1))
    rows = out[-6:-2]
    for name, line in zip(("float fp32", "float bf16", "QAT fake-quant (fp32)", "exported packed"), rows):
        positive(*fields(re.escape(f"{name:24s}") + r" +(\d+\.\d{2}) MB +(\d+\.\d) tokens/s", line))
    assert out[-2].startswith("exported model says: ")
    smaller, ratio = fields(r"exported vs float bf16: disk (\d+\.\d{2})x smaller, tokens/s ratio (\d+\.\d{2})", out[-1])
    assert smaller > 1 and ratio > 0


@pytest.mark.slow
def test_bench_host_memory():
    out = lines(bench("bench_host_memory.py", "--model", TINY_MODEL, "--nproc", 2))
    assert re.fullmatch(r"plain +rank0 \d+  rank1 \d+", out[-4]) and re.fullmatch(r"efficient +rank0 \d+  rank1 \d+",
                                                                                    out[-3]), out[-4:]
    positive(*fields(r"rank0_ratio (\d+\.\d{3})", out[-2]))
    positive(*fields(r"rank1_ratio (\d+\.\d{3})", out[-1]))


def test_bench_qat():
    out = lines(bench("bench_qat.py", "--reps", 1, "--tokens", 16, "--width_div", 64, "--hidden", 64,
                      "--intermediate", 128, "--layers", 1, "--heads", 2, "--vocab", 256, "--seq", 16,
                      "--threads", 1))
    text = "\n".join(out)
    assert "(a) linear forward+backward" in text and "(b) training step" in text and "(c) peak memory" in text
    assert len(re.findall(r"nn\.Linear \d+\.\d{2} ms  QuantizeLinear \d+\.\d{2} ms  ratio \d+\.\d{3}", text)) == 3
    positive(*fields(r"step_ratio (\d+\.\d{3})", out[-2]))
    positive(*fields(r"mem_ratio (\d+\.\d{3})", out[-1]))


def test_gen_dtype():
    out = lines(bench("gen_dtype.py", "--id_step", 256, "--max_length", 16, "--batch_size", 8))
    result = json_line("gen_dtype", out[-1])
    assert result["sequences"] == 8 and result["max_length"] == 16  # ids 0, 256, ..., 1792 of the 2048
    for key in ("identical_greedy_prefix", "identical_sequence"):
        assert 0 <= result[key] <= 1
    for dtype in ("float32", "bfloat16"):
        positive(result[dtype]["mean_length"], result[dtype]["tokens"], result[dtype]["distinct_tokens"])
        assert out[-4 if dtype == "float32" else -3].startswith(f"{dtype}: {{'mean_length': ")
    assert re.fullmatch(r"identical greedy prefixes \d+\.\d%, identical sequences \d+\.\d%, first difference at "
                        r"token \d+\.\d on average", out[-2]), out[-2]


@pytest.mark.slow
def test_token_curve_smoke():
    committed = REPO_PATH / "results" / "smollm2_token_curve.json"
    before = committed.read_bytes() if committed.exists() else None
    out = lines(bench("token_curve.py", "--smoke"))
    curve = json_line("token_curve", out[-1])
    assert set(curve) == {"LLM-QAT", "QAT-real", "QAT-real (modern)"}
    for method, points in curve.items():
        assert set(points) == {"2", "4"}, points
        for ppl in points.values():
            assert set(ppl) == {"shakespeare_eval", "milton_valid"}
            positive(*ppl.values())
        assert f"{method} 512 tokens: " in "\n".join(out) and f"{method} 1024 tokens: " in "\n".join(out)
    assert re.fullmatch(r"shakespeare_eval: ppl change per doubling of tokens LLM-QAT [-+]\d+\.\d{2}, "
                        r"QAT-real [-+]\d+\.\d{2}, QAT-real \(modern\) [-+]\d+\.\d{2}", out[-2]), out[-2]
    assert (committed.read_bytes() if committed.exists() else None) == before  # never the committed points


@pytest.mark.slow
def test_token_curve_methods_and_stale_points(tmp_path):
    """--methods limits the curve; a point scored before a text was added is trained and scored again; --bits
    trains the points at that setting (here learned 2-bit scales); a bad --bits is one error line."""
    (tmp_path / "token_curve.json").write_text(json.dumps({"LLM-QAT": {"2": {"milton_valid": 1.0}}}))
    out = lines(bench("token_curve.py", "--smoke", "--methods", "LLM-QAT", "--blocks", 2, "--work_dir", tmp_path,
                      "--bits", "2-16-16-lsq"))
    curve = json_line("token_curve", out[-1])
    assert set(curve) == {"LLM-QAT"}
    assert set(curve["LLM-QAT"]["2"]) == {"shakespeare_eval", "milton_valid"} and curve["LLM-QAT"]["2"]["milton_valid"] != 1.0
    (student,) = (tmp_path / "models").iterdir()
    config = json.loads((student / "config.json").read_text())
    assert student.name.startswith("curve2_LLM-QAT_2-16-16-lsq")
    assert (config["w_bits"], config["a_bits"], config["w_quantizer"]) == (2, 16, "lsq"), config
    bad = subprocess.run([sys.executable, str(BENCH / "token_curve.py"), "--smoke", "--bits", "5-8"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--bits: '5-8': quantization setting '5-8'" in bad.stderr.strip().splitlines()[-1]


def test_gpu_check_exactness_part_on_cpu(monkeypatch, capsys):
    """Without CUDA the Triton path is the reference too: this runs the harness (cases, ties, the count)."""
    gpu_check = load("gpu_check.py")
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_check.utils_quant, "USE_TRITON", gpu_check.utils_quant.USE_TRITON)  # restored after
    monkeypatch.setattr(gpu_check, "SHAPES", [s for s in gpu_check.SHAPES if math.prod(s) <= 1 << 16])
    assert gpu_check.check_exactness() == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("(i) Triton vs PyTorch reference")
    cases = [line for line in out if re.fullmatch(r" {4}\(.*\) +\w+ +\d+ bits -> \w+ +q \S+  grad \S+", line)]
    assert len(cases) >= 30 and all("MISMATCH" not in line for line in out)
    assert len([line for line in out if line.startswith("    exact ties, ")]) == 4
    assert out[-1] == "    0 mismatching case(s)"


def test_gpu_check_without_cuda_says_so(monkeypatch):
    gpu_check = load("gpu_check.py")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        gpu_check.main([])
    assert e.value.code == "gpu_check.py needs a CUDA GPU"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu_check.py's real run needs a CUDA GPU (none here)")
def test_gpu_check_on_the_gpu():
    out = lines(bench("gpu_check.py", "--skip_bench"))
    assert "    0 mismatching case(s)" in out
    for line in out[-3:]:
        positive(*fields(r" {4}.{36} forward +(\d+)  backward +(\d+)  copy +(\d+)", line))


def test_llama_cpp_check_without_llama_cpp_says_so(monkeypatch, tmp_path):
    """One clear line when llama-cpp-python is missing (simulated, so that this runs where it is installed too)."""
    check = load("llama_cpp_check.py")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else
                        find_spec(name, *a))
    with pytest.raises(SystemExit) as e:
        check.main(["--quick", "--work_dir", str(tmp_path)])
    assert str(e.value.code).startswith("error: llama_cpp_check.py needs llama-cpp-python (pip install ")
    assert "\n" not in str(e.value.code) and not list(tmp_path.iterdir())  # at once, nothing written


def test_llama_cpp_check_ours_only(tmp_path):
    """The parts that need no llama.cpp (the full check: tests/test_gguf.py, where llama-cpp-python is installed)."""
    out = lines(bench("llama_cpp_check.py", "--quick", "--ours_only", "--threads", 1, "--work_dir", tmp_path))
    result = json_line("llama_cpp_check", out[-1])
    assert set(result) == {"model", "setting", "gguf_mb", "fp16_gguf_mb", "ppl_ours_w_only", "ppl_windows",
                           "tok_s_pytorch_export", "threads", "cpu"}
    assert result["setting"] == "W4A8KV4" and result["ppl_windows"] == 4 and result["threads"] == 1
    positive(result["gguf_mb"], result["fp16_gguf_mb"], result["ppl_ours_w_only"], result["tok_s_pytorch_export"])
    assert result["gguf_mb"] < result["fp16_gguf_mb"]
    assert (tmp_path / "gguf" / "W4A8KV4.gguf").is_file() and (tmp_path / "fp16.gguf").is_file()


@pytest.mark.slow
def test_roofline():
    """benchmarks/roofline.py's own smoke run (its docstring's second command), with the QAT runs paired."""
    out = lines(bench("roofline.py", "--model", TINY_MODEL, "--steps", 2, "--rounds", 1, "--gen_ids", 8, "--paired",
                      "--paired_precision"))
    assert any(re.fullmatch(r"    quantizers +\d+\.\d{3} s +\d+\.\d%", line) for line in out), out  # the breakdown
    paired = next(line for line in out if "every other step unquantized" in line)
    positive(*fields(r".*QAT bf16 (\d+\.\d{3}) s, unquantized (\d+\.\d{3}) s: qat_over_kd_step_paired (\d+\.\d{3})",
                     paired))
    ratios = next(line for line in out if "the pairs' own ratios" in line)  # 2 pairs: no interval
    positive(*fields(r"  the pairs' own ratios: median (\d+\.\d{3}), 2 pairs \(an interval of the median needs 5\+\)",
                     ratios))
    precision = next(line for line in out if "every other step in bf16" in line)
    positive(*fields(r".*QAT fp32 (\d+\.\d{3}) s, bf16 (\d+\.\d{3}) s: bf16_over_fp32_speedup_paired (\d+\.\d{2})",
                     precision))
    positive(*fields(r"bf16_over_fp32_speedup (\d+\.\d{2})", next(line for line in out if line.startswith("bf16_over"))))
    positive(*fields(r"gen_gemm_fraction (\d+\.\d+)", next(line for line in out if line.startswith("gen_gemm"))))
    beside = next(line for line in out if "each bf16 QAT step beside" in line)  # 2 steps: no interval
    positive(*fields(r"  each bf16 QAT step beside its matmuls timed alone right after it, the fraction: median "
                     r"(\d+\.\d{3}), 2 steps \(an interval of the median needs 5\+\)", beside))
    positive(*fields(r"step_gemm_fraction_beside (\d+\.\d{3})", out[-2]))
    positive(*fields(r"step_gemm_fraction (\d+\.\d{3})", out[-1]))


def test_roofline_paired_attention():
    """--paired_attention's line and pairs (the step part alone); it excludes --paired."""
    out = lines(bench("roofline.py", "--model", TINY_MODEL, "--steps", 2, "--rounds", 1, "--parts", "step",
                      "--paired_attention"))
    paired = next(line for line in out if "every other step with eager attention" in line)
    positive(*fields(r".*QAT bf16 (\d+\.\d{3}) s \(sdpa\), (\d+\.\d{3}) s \(eager\): eager_attention_speedup_paired "
                     r"(\d+\.\d{3})", paired))
    assert any(line.startswith("  the pairs in order (sdpa / eager, s): ") for line in out), out
    positive(*fields(r"step_gemm_fraction (\d+\.\d{3})", out[-1]))
    with pytest.raises(SystemExit):
        load("roofline.py").parse_args(["--paired", "--paired_attention"])


def test_roofline_attention_pairs_alternate_sdpa_and_eager_steps(tmp_path, monkeypatch, eager_attention_calls):
    """--paired_attention: in the bf16 QAT run every other step (not the profiled one) runs the student's and the
    teacher's attention eagerly, the others with the attention they were loaded with; the trainer is restored."""
    from utils import kd_trainer
    from utils.constants import EMBEDDED_MODEL
    roofline, calls = load("roofline.py"), eager_attention_calls
    per_step, real = [], kd_trainer.KDTrainer.compute_loss

    def counted(self, *args, **kwargs):
        calls.clear()
        loss = real(self, *args, **kwargs)
        per_step.append(len(calls))
        return loss
    monkeypatch.setattr(kd_trainer.KDTrainer, "compute_loss", counted)
    timer = roofline.AttentionPairedTimer(profile_step=5)
    with roofline.alternating_attention(timer):
        roofline.timed_training(EMBEDDED_MODEL, str(roofline.DATA / "shakespeare_train.jsonl"), str(tmp_path), "a",
                                "4-8-4", True, 5, batch=2, seq=32, profile_step=5, timer=timer)
    assert per_step == [0, 8, 0, 8, 0]  # 4 layers of the student and 4 of the teacher; step 5 profiled: sdpa
    assert len(timer.times) == 3 and len(timer.other) == 2
    assert kd_trainer.KDTrainer.compute_loss is counted


def test_roofline_matmul_timings_make_their_operands_once(monkeypatch):
    """The step-by-step timings (step_gemm_fraction_beside) pass one dict: a shape's operands are drawn once."""
    roofline, drawn, randn = load("roofline.py"), [], torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: drawn.append(a) or randn(*a, **k))
    operands = {}
    for _ in range(3):
        flops, seconds = roofline.gemm_time({(8, 4, 6): 2, (3, 5, 7): 1}, torch.float32, 1, operands=operands)
    assert flops == 2 * (2 * 8 * 4 * 6) + 2 * 3 * 5 * 7 and seconds > 0
    assert sorted(drawn) == [(3, 5), (4, 6), (5, 7), (8, 4)] and len(operands) == 2
    roofline.gemm_time({(8, 4, 6): 1}, torch.float32, 1)  # no dict: fresh operands each call, nothing kept
    assert len(drawn) == 6


def test_roofline_median_interval():
    """The order-statistics interval: n = 12 gives the 3rd smallest and 3rd largest value, coverage 1 - 2 x 79/4096;
    too few values give none; the interval always holds the sample median."""
    median_interval = load("roofline.py").median_interval
    values = [1.0 + 0.1 * i for i in (7, 2, 11, 0, 5, 9, 1, 3, 10, 4, 8, 6)]  # 1.0 .. 2.1, shuffled
    low, high, coverage = median_interval(values)
    assert (round(low, 6), round(high, 6)) == (1.2, 1.9) and coverage == 1 - 2 * 79 / 4096  # P(B <= 2) = 79/4096
    assert median_interval(values, confidence=0.99)[:2] == (min(values) + 0.1, max(values) - 0.1)  # k = 2: 0.9937
    assert median_interval([1.0, 2.0, 3.0, 4.0]) is None  # coverage 1 - 2/16 = 0.875 < 0.9 even at k = 1
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0])[:2] == (1.0, 5.0)  # n = 5: k = 1, coverage 0.9375
    assert (load("roofline.py").median_with_interval([3.0, 1.0, 2.0, 5.0, 4.0], "pairs")
            == "median 3.000, 94% interval of the median [1.000, 5.000] over 5 pairs")
    for n in range(5, 40):
        sample = [((i * 7919) % 101) / 10 for i in range(n)]
        low, high, coverage = median_interval(sample)
        assert low <= statistics.median(sample) <= high and coverage >= 0.9


def test_roofline_paired_timer_runs_every_other_step_unquantized(monkeypatch):
    """PairedTimer: odd steps with every linear at 32 bits (no quantizer call at all), even steps and the profiled
    one with the run's own bits, restored as they were."""
    import types

    from models import utils_quant
    from models.quant_model import QuantSetting, load_model
    from utils.constants import EMBEDDED_MODEL
    roofline = load("roofline.py")
    model = QuantSetting(4, 8, 4).apply(load_model(EMBEDDED_MODEL))
    calls = []
    real = utils_quant.sym_quant
    monkeypatch.setattr(utils_quant, "sym_quant", lambda *a, **k: calls.append(1) or real(*a, **k))
    timer, ids = roofline.PairedTimer(profile_step=4, beside=lambda: len(calls)), torch.randint(0, 100, (1, 8))
    quantized = []
    for step in range(4):
        calls.clear()
        timer.on_step_begin(None, types.SimpleNamespace(global_step=step), None, model=model)
        with torch.no_grad():
            model(input_ids=ids)
        timer.on_step_end(None, types.SimpleNamespace(global_step=step + 1), None)
        quantized.append(len(calls) > 0)
    assert quantized == [True, False, True, True]  # step 4 is the profiled one: quantized
    assert len(timer.times) == 3 and len(timer.other) == 1
    assert len(timer.besides) == 3 and all(timer.besides)  # called after the quantized steps only
    q = model.model.layers[0].self_attn.k_proj
    assert (q.w_bits, q.a_bits, q.out_bits) == (4, 8, 4)


def test_roofline_precision_pairs_alternate_fp32_and_bf16_steps(tmp_path, monkeypatch):
    """--paired_precision: in the fp32 QAT run every other step (not the profiled one) runs the student under bf16
    autocast against a bf16 teacher, as --bf16 trains; the trainer is restored afterwards."""
    from utils import kd_trainer
    from utils.constants import EMBEDDED_MODEL
    roofline = load("roofline.py")
    seen, real = [], kd_trainer.kd_loss
    monkeypatch.setattr(kd_trainer, "kd_loss", lambda s, t, **k: seen.append((s.dtype, t.dtype)) or real(s, t, **k))
    timer = roofline.PrecisionPairedTimer(profile_step=5)
    methods = (kd_trainer.KDTrainer.autocast_smart_context_manager, kd_trainer.KDTrainer.compute_loss)
    with roofline.alternating_precision(timer, EMBEDDED_MODEL, compiled=False):
        roofline.timed_training(EMBEDDED_MODEL, str(roofline.DATA / "shakespeare_train.jsonl"), str(tmp_path), "p",
                                "4-8-4", False, 5, batch=2, seq=32, profile_step=5, timer=timer)
    fp32, bf16 = (torch.float32,) * 2, (torch.bfloat16,) * 2
    assert seen == [fp32, bf16, fp32, bf16, fp32]  # step 5 is the profiled one: fp32
    assert len(timer.times) == 3 and len(timer.other) == 2
    assert (kd_trainer.KDTrainer.autocast_smart_context_manager, kd_trainer.KDTrainer.compute_loss) == methods


@pytest.mark.slow
def test_bench_allocator():
    """Both allocators train and report. Not asserted here: which faults less. On the embedded model every block is
    below glibc's adaptive mmap threshold, so the default may fault nothing per step (CI saw tuned 214, default 0);
    the reuse itself is tested in tests/test_allocator.py, on a 64 MiB block."""
    out = lines(bench("bench_allocator.py", "--model", TINY_MODEL, "--seq", 64, "--steps", 2, "--rounds", 1))
    per_step = r"  (\w+) +step (\d+\.\d{3}) s   page faults/step (\d+)   system CPU/step (\d+\.\d{3}) s   peak RSS (\d+) MiB"
    found = {m.group(1): int(m.group(3)) for m in map(lambda line: re.fullmatch(per_step, line), out) if m}
    assert set(found) == {"tuned", "default"}, out
    positive(*fields(r"allocator_step_speedup (\d+\.\d{2})", out[-1]))


def test_bench_startup():
    out = lines(bench("bench_startup.py", "--scripts", "merge_gen_data.py", "--rounds", 1))
    assert out[0] == "python SCRIPT --help, 1 round(s), threads 1", out
    positive(*fields(r"  merge_gen_data\.py +gc off (\d+\.\d\d) s \(CPU (\d+\.\d\d)\)   "
                     r"gc on (\d+\.\d\d) s \(CPU (\d+\.\d\d)\)", out[1]))
    positive(*fields(r"startup_speedup (\d+\.\d\d)", out[-1]))
    assert len(out) == 3


def test_bench_zeroshot():
    out = lines(bench("bench_zeroshot.py", "--limit", 4, "--rounds", 2, "--threads", 1, "--compare_attention"))
    assert out[0].startswith("model assets/tiny_llama, RTN W-A-KV 4-8-4") and "4 docs each" in out[0]
    rounds = [line for line in out if line.startswith("  round ")]
    assert [line.split()[2] for line in rounds] == ["stock", "shared", "shared", "stock"], rounds
    assert out[-4].startswith("shared vs stock: ") and out[-3].startswith("stock with eager attention vs stock")
    for line in out[-4:-2]:  # how far apart: the scorers, then the two attention kernels of HFLM (for scale)
        fields(r".*: max \|difference\| (\d\.\d\de[-+]\d\d), mean (\d\.\d\de[-+]\d\d) nats over 16 "
               r"\(context, choice\)", line)
    positive(*fields(r"median: stock (\d+\.\d\d) s, shared (\d+\.\d\d) s", out[-2]))
    positive(*fields(r"shared_context_speedup (\d+\.\d\d)", out[-1]))


def test_every_benchmark_is_tested():
    """Each benchmarks/*.py is run by a test above (names written out: a new script needs its own test)."""
    scripts = {p.name for p in BENCH.glob("*.py")}
    covered = {"bench_allocator.py", "bench_bf16.py", "bench_export.py", "bench_generate.py", "bench_host_memory.py", "bench_qat.py",
               "gen_dtype.py", "gpu_check.py", "llama_cpp_check.py", "token_curve.py", "roofline.py",
               "bench_zeroshot.py", "bench_startup.py"}
    assert scripts <= covered, f"benchmarks without a test in tests/test_benchmarks.py: {sorted(scripts - covered)}"
    source = open(__file__).read()
    for name in covered:
        assert re.search(rf'(bench|load)\("{re.escape(name)}"', source), f"{name}: listed but never run"
