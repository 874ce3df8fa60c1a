"""Roofline of LLM-QAT on this machine: the QAT+KD training step and data-free generation against the measured
matmul rate at their own shapes and thread count.

(1) Generation (generate_data.py's decoder, utils.decode) at the table's batch (256 rows; 128 tokens, half the
    table's length, by default): the matmul FLOPs of every
    linear call (recorded by forward hooks), the time the same matmuls take alone at this machine's measured
    rate (each distinct shape timed with torch.mm in the model's dtype), and the share of the decode time they
    account for. Last line of the section: `gen_gemm_fraction <x>`.
(2) The training step, through the real Trainer (utils.train_qat.run): W-A-KV QAT + KD in bf16 autocast and in
    fp32, and the unquantized KD step in bf16; median step times side by side, the step's matmul FLOPs (student
    forward + backward, teacher forward), the achieved rate, its share of the measured bf16 rate at the step's
    GEMM shapes, and a torch.profiler breakdown of one bf16 QAT step by kind (matmul, attention, quantizers,
    casts, KD loss, optimizer, other). The last line of the output: `step_gemm_fraction <x>`; before it
    `step_gemm_fraction_beside <x>`, the median over the bf16 QAT steps of (its matmuls timed alone right after
    the step) / (the step), with an interval: the fraction without the machine's drift between the two timings.
    --paired: the bf16 QAT run alternates quantized steps with unquantized ones (its linears at 32 bits),
    so QAT over unquantized KD is also measured step beside step, on the machine in the same state; with the
    median of the pairs' own ratios and a distribution-free 90% interval for it (order statistics).
    --paired_precision: likewise the fp32 QAT run alternates fp32 steps with bf16 ones (bf16 autocast and a bf16
    teacher, as --bf16 trains), so bf16 over fp32 is measured step beside step.
    --paired_attention: the bf16 QAT run alternates steps with sdpa attention (the default) and eager attention
    (train.py --attn_implementation eager: student and teacher), so eager over sdpa is measured step beside step.

step_gemm_fraction = (time the step's matmuls take alone at the measured bf16 rate) / (bf16 QAT step time).

    python benchmarks/roofline.py [--model smollm2] [--threads 2] [--parts gen,step] [--steps 4] [--rounds 3]
                                  [--paired | --paired_attention] [--paired_precision]
    python benchmarks/roofline.py --model assets/tiny_llama --steps 2 --rounds 1 --gen_ids 8   # the suite's smoke run
"""
import argparse
import collections
import contextlib
import functools
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.allocator import tune_cpu_allocator  # noqa: E402
from models import utils_quant  # noqa: E402
from models.utils_quant import QuantizeLinear  # noqa: E402
from models.quant_model import load_model, read_config  # noqa: E402
from utils import kd_trainer  # noqa: E402
from utils.model_zoo import resolve_model  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "assets" / "data"
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int4pack_mm"}
KINDS = ("matmul", "attention", "quantizers", "casts", "KD loss", "optimizer", "compiled", "other")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="model directory or packaged name")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the cores)")
    p.add_argument("--parts", default="gen,step", help="comma list of gen, step")
    p.add_argument("--setting", default="4-8-4", help="W-A-KV of the QAT step")
    p.add_argument("--batch", type=int, default=4, help="training blocks per step")
    p.add_argument("--seq", type=int, default=256, help="tokens per training block")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant and round (after 2 warm-ups)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the three step variants (medians over all)")
    p.add_argument("--data", default=str(DATA / "shakespeare_train.jsonl"))
    p.add_argument("--optim", default=None, help="--optim of the training runs (default: train.py's)")
    p.add_argument("--paired", action="store_true",
                   help="the bf16 QAT run alternates quantized and unquantized steps (twice the steps): QAT over "
                        "unquantized KD measured step beside step")
    p.add_argument("--paired_precision", action="store_true",
                   help="the fp32 QAT run alternates fp32 and bf16 steps (a bf16 teacher beside the fp32 one; twice "
                        "the steps): bf16 over fp32 measured step beside step")
    p.add_argument("--paired_attention", action="store_true",
                   help="the bf16 QAT run alternates sdpa and eager attention steps (twice the steps): "
                        "--attn_implementation eager over the default measured step beside step")
    p.add_argument("--compile_layers", action="store_true", help="train.py --compile_layers in every step variant")
    p.add_argument("--gen_ids", type=int, default=86, help="start ids generated (x3 prefix lengths: 258 sequences, "
                   "so that the default batch is the table's, 256)")
    p.add_argument("--gen_batch", type=int, default=None, help="decode batch (default: generate_data.py's)")
    p.add_argument("--gen_max_length", type=int, default=128)
    p.add_argument("--gen_dtype", default="auto")
    p.add_argument("--reps", type=int, default=5, help="timings per matmul shape (median)")
    args = p.parse_args(argv)
    if args.paired and args.paired_attention:
        p.error("--paired and --paired_attention both pair the bf16 QAT run; pass one")
    if args.paired_attention and args.compile_layers:
        p.error("--paired_attention with --compile_layers: compiled layers on a CPU already use eager attention")
    return args


# ---- matmul rate at given shapes ----
def time_mm(m, k, n, dtype, reps, device="cpu", operands=None):
    """Median seconds of one [m, k] @ [k, n] product in dtype (timed in loops of >= ~10 ms); operands: a dict that
    keeps the random operands for the next call (timings repeated step by step make them once)."""
    made, key = (operands if operands is not None else {}), (m, k, n, dtype, device)
    if key not in made:
        made[key] = torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)
    a, b = made[key]
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)

    def loop(count):
        sync()
        t = time.perf_counter()
        for _ in range(count):
            torch.mm(a, b)
        sync()
        return (time.perf_counter() - t) / count

    loop(1)
    count = max(1, int(0.01 / max(loop(1), 1e-7)))
    return statistics.median(loop(count) for _ in range(reps))


def gemm_time(shapes, dtype, reps, device="cpu", operands=None):
    """{(m, k, n): count} -> (FLOPs, seconds these matmuls take alone at this machine's rate)."""
    flops = seconds = 0.0
    for (m, k, n), count in shapes.items():
        flops += 2 * m * k * n * count
        seconds += time_mm(m, k, n, dtype, reps, device, operands) * count
    return flops, seconds


def linear_shapes(config, tokens, with_backward):
    """The GEMMs of the decoder linears and lm_head for `tokens` rows: forward [T, in] @ [in, out], and with
    backward the input gradient [T, out] @ [out, in] and the weight gradient [out, T] @ [T, in]."""
    c = config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    h, i = c.hidden_size, c.intermediate_size
    per_layer = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    shapes = collections.Counter()
    for d_in, d_out in per_layer * c.num_hidden_layers + [(h, c.vocab_size)]:
        shapes[(tokens, d_in, d_out)] += 1
        if with_backward:
            shapes[(tokens, d_out, d_in)] += 1
            shapes[(d_out, tokens, d_in)] += 1
    return shapes


# ---- profile breakdown ----
@contextlib.contextmanager
def labelled(compiled=False):
    """Profiler ranges around the quantizers and the KD loss (their ops have generic names). compiled: not around
    the quantizers, which run inside the compiled layers (a wrapper there would make torch.compile recompile)."""
    from torch.profiler import record_function

    def wrap(module, name, label):
        fn = getattr(module, name)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with record_function(label):
                return fn(*args, **kwargs)
        setattr(module, name, inner)
        return fn

    targets = [(kd_trainer, "kd_loss", "llmqat::kd_loss"), (torch.nn.utils, "clip_grad_norm_", "Optimizer.clip_grad_norm_")]
    if not compiled:
        targets += [(utils_quant, "sym_quant", "llmqat::quantizer"), (utils_quant, "ste_grad", "llmqat::quantizer")]
    originals = [(m, n, wrap(m, n, label)) for m, n, label in targets]
    try:
        yield
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def kind_of(event):
    name = event.name
    if name in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if "CompiledFxGraph" in name:  # --compile_layers: a layer's fused kernels (quantizers, norms, RoPE, ...)
        return "compiled"
    parent = event.cpu_parent
    while parent is not None:
        p = parent.name
        if p == "llmqat::quantizer" or "SymQuantizerBackward" in p or "QuantizerBackward" in p:
            return "quantizers"
        if p == "llmqat::kd_loss" or "_ChunkedKLBackward" in p:
            return "KD loss"
        if p.startswith("Optimizer.") or "clip_grad" in p:
            return "optimizer"
        if "scaled_dot_product" in p or "flash_attention" in p:
            return "attention"
        parent = parent.cpu_parent
    if name in ("aten::copy_", "aten::_to_copy", "aten::to"):
        return "casts"
    return "other"


def breakdown(prof):
    """Self time per kind (seconds) of the profiled region, and the top ops of 'other'."""
    kinds, other = collections.Counter(), collections.Counter()
    for e in prof.events():
        if e.device_type.name != "CPU" or e.self_cpu_time_total <= 0:
            continue
        k = kind_of(e)
        kinds[k] += e.self_cpu_time_total / 1e6
        if k == "other":
            other[e.name] += e.self_cpu_time_total / 1e6
    return kinds, other


def print_breakdown(kinds, other, steps=1):
    profiled = sum(kinds.values())
    print(f"  breakdown of a profiled step (self time, median of {steps}; {profiled:.2f} s under the profiler):")
    for k in KINDS:
        print(f"    {k:11s} {kinds[k]:7.3f} s  {kinds[k] / profiled:6.1%}")
    top = ", ".join(f"{n.removeprefix('aten::')} {s / profiled:.1%}" for n, s in other.most_common(6))
    print(f"    other's largest: {top}")


# ---- (1) generation ----
def generation(args, path):
    from utils.decode import Sampling, generate_batch
    from utils.generate import default_batch_size, eos_token_ids, load_generator, sequence_seed

    model = load_generator(path, args.gen_dtype)
    max_length = min(args.gen_max_length, model.config.max_position_embeddings)
    ids = list(range(100, 100 + args.gen_ids))
    pairs = [(i, j) for j in (3, 4, 5) for i in ids]
    batch = min(args.gen_batch or default_batch_size(model, max_length), len(pairs))
    sampling, eos = Sampling.of(model.generation_config), eos_token_ids(model)

    def run():
        seeds = [sequence_seed(0, i, j) for i, j in pairs]
        return sum(len(s) - 1 for _, s in generate_batch(model, [p[0] for p in pairs], [p[1] for p in pairs],
                                                         max_length, sampling, seeds, eos, batch))

    run_short = functools.partial(generate_batch, model, ids[:2], [3, 3], 8, sampling, [0, 1], eos, 2)
    list(run_short())  # first-call costs
    shapes = collections.Counter()

    def hook(module, inputs, output):
        x = inputs[0]
        shapes[(x.numel() // x.shape[-1], module.in_features, module.out_features)] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    t = time.perf_counter()
    tokens = run()
    seconds = time.perf_counter() - t
    for h in handles:
        h.remove()
    flops, gemm_s = gemm_time(shapes, model.dtype, args.reps)
    print(f"(1) generation: {len(pairs)} sequences, max_length {max_length}, batch {batch}, {model.dtype}, "
          f"{torch.get_num_threads()} threads")
    print(f"  {tokens} tokens in {seconds:.2f} s: {tokens / seconds:.0f} tokens/s; {flops / 1e12:.3f} TFLOP of "
          f"matmuls in {len(shapes)} shapes, {gemm_s:.2f} s alone at the measured rate "
          f"({flops / gemm_s / 1e9:.0f} GFLOP/s); achieved {flops / seconds / 1e9:.0f} GFLOP/s")
    print(f"gen_gemm_fraction {gemm_s / seconds:.3f}")


# ---- (2) the training step ----
class StepTimer(TrainerCallback):
    """Each step's seconds; step `profile_step` (1-based) under torch.profiler; `beside`: a function called after
    each timed step, outside its time (the step's matmuls timed alone), its results in `besides`."""

    def __init__(self, profile_step=None, compiled=False, beside=None):
        self.times, self.start, self.profile_step, self.prof, self.labels = [], None, profile_step, None, None
        self.compiled, self.beside, self.besides = compiled, beside, []

    def kept(self):
        """Whether this step's time stays in `times` (a paired timer moves its other steps' times elsewhere)."""
        return True

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.profile_step:  # the labels and the profiler for this step only
            self.labels = labelled(self.compiled)
            self.labels.__enter__()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)
        if self.prof is not None and state.global_step == self.profile_step:
            self.prof.__exit__(None, None, None)
            self.labels.__exit__(None, None, None)
        if self.beside is not None and self.kept():
            self.besides.append(self.beside())


def timed_training(path, data, out_dir, name, setting, bf16, max_steps, batch=4, seq=256, optim=None,
                   profile_step=None, compile_layers=False, timer=None, seed=0):
    """A QAT+KD training run through the real Trainer (lr 1e-4, nothing saved but the student), with
    a StepTimer: its per-step seconds, and the profiler of step `profile_step` if asked. setting "W-A-KV", or
    None for the unquantized KD run; timer: a StepTimer of the caller's (a subclass that records more); seed: the
    Trainer's (the order of the training blocks).
    Shared with bench_bf16.py and bench_allocator.py."""
    from utils.process_args import process_args
    from utils.train_qat import run

    w, a, kv = setting.split("-") if setting else ("32", "32", "32")
    timer = timer or StepTimer(profile_step, compile_layers)
    argv = ["--input_model_filename", path, "--train_data_local_path", data, "--local_dir", out_dir,
            "--output_model_filename", name, "--qat", str(bool(setting)), "--w_bits", w, "--a_bits", a,
            "--kv_bits", kv, "--model_max_length", str(seq), "--per_device_train_batch_size", str(batch),
            "--max_steps", str(max_steps), "--learning_rate", "1e-4", "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", str(not torch.cuda.is_available()), "--bf16", str(bf16),
            "--log_level", "warning", "--logging_strategy", "no", "--disable_tqdm", "True",
            "--dataloader_pin_memory", "False", "--seed", str(seed)]
    if optim:
        argv += ["--optim", optim]
    if compile_layers:
        argv += ["--compile_layers", "True"]
    run(*process_args(argv), callbacks=[timer])
    return timer


class AlternatingTimer(StepTimer):
    """Every other step (the odd ones, never the profiled one) of the other kind, on the same model, data, teacher and
    optimizer, so each step is timed beside one of the other kind on the machine in the same state (these machines
    drift by tens of percent within minutes: separate runs cannot resolve a 10% difference). `alternate`: whether
    the current step is of the other kind; times: the run's own steps', other: the other kind's (no `beside` call)."""

    def __init__(self, profile_step=None, compiled=False, beside=None):
        super().__init__(profile_step, compiled, beside)
        self.other, self.alternate = [], False

    def kept(self):
        return not self.alternate

    def switch(self, model):
        """Set the model up for the coming step's kind (self.alternate)."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.alternate = state.global_step % 2 == 1 and state.global_step + 1 != self.profile_step
        self.switch(model)
        super().on_step_begin(args, state, control, model=model, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if self.alternate:
            self.other.append(self.times.pop())


class PairedTimer(AlternatingTimer):
    """The other kind unquantized: the QAT run's QuantizeLinear modules set to 32 bits (no quantizer runs; the weights
    go through autocast's cast as nn.Linear's do). times: the QAT steps', other: the unquantized ones'."""

    def __init__(self, profile_step=None, compiled=False, beside=None):
        super().__init__(profile_step, compiled, beside)
        self.bits = None

    def switch(self, model):
        linears = [m for m in model.modules() if isinstance(m, QuantizeLinear)]
        if self.bits is None:
            self.bits = [(m.w_bits, m.a_bits, m.out_bits) for m in linears]
        for m, bits in zip(linears, self.bits):
            m.w_bits, m.a_bits, m.out_bits = (32, 32, 32) if self.alternate else bits


class PrecisionPairedTimer(AlternatingTimer):
    """The other kind in bf16 (the student under bf16 autocast, a bf16 teacher beside the fp32 one) in the fp32 QAT
    run: used with alternating_precision(), which makes the trainer follow `alternate`. times: the fp32 steps',
    other: the bf16 steps'."""


class AttentionPairedTimer(AlternatingTimer):
    """The other kind with eager attention in the student and the teacher: used with alternating_attention().
    times: the default (sdpa) steps', other: the eager ones'."""


def alternating_attention(timer):
    """While open (a patch of KDTrainer), the student and the teacher run with eager attention whenever
    timer.alternate (as --attn_implementation eager loads them), else with the attention they were loaded with."""
    compute_loss, loaded = kd_trainer.KDTrainer.compute_loss, {}

    def paired_loss(self, model, inputs, *args, **kwargs):
        for m in filter(None, (model, self.teacher)):
            own = loaded.setdefault(id(m), m.config._attn_implementation)  # before any switch
            name = "eager" if timer.alternate else own
            if m.config._attn_implementation != name:
                m.set_attn_implementation(name)
        return compute_loss(self, model, inputs, *args, **kwargs)

    return mock.patch.object(kd_trainer.KDTrainer, "compute_loss", paired_loss)


def alternating_precision(timer, path, compiled):
    """While open (a patch of KDTrainer), it steps in bf16 whenever timer.alternate: bf16 autocast around the loss (as
    --bf16 gives) and the KD teacher swapped for a bf16 one, loaded as train.py loads it (compiled like it under
    --compile_layers)."""
    from utils import precision
    trainer_cls = kd_trainer.KDTrainer
    autocast, compute_loss = trainer_cls.autocast_smart_context_manager, trainer_cls.compute_loss
    teachers = {}

    def paired_autocast(self, cache_enabled=True):
        return torch.autocast(self.args.device.type, dtype=torch.bfloat16) if timer.alternate else autocast(self)

    def paired_loss(self, model, inputs, *args, **kwargs):
        if self.teacher is not None:
            if not teachers:
                teachers[False] = self.teacher
                teachers[True] = load_model(path, dtype=torch.bfloat16, **precision.model_kwargs(self.args)).eval()
                teachers[True].requires_grad_(False)
                if compiled:
                    kd_trainer.compile_layers([teachers[True]], backend=self.args.torch_compile_backend or "inductor",
                                              mode=self.args.torch_compile_mode)
            self.teacher = teachers[timer.alternate]
        return compute_loss(self, model, inputs, *args, **kwargs)

    return mock.patch.multiple(trainer_cls, autocast_smart_context_manager=paired_autocast, compute_loss=paired_loss)


def median_interval(values, confidence=0.9):
    """(low, high, coverage): a distribution-free interval for the median of `values` (order statistics: the true
    median lies between the k-th smallest and the k-th largest value with probability coverage = 1 - 2 P(B < k),
    B ~ Binomial(n, 1/2), the largest k with coverage >= confidence), or None with too few values for it."""
    x, n = sorted(values), len(values)
    tail, k = 0.0, 0  # tail = P(B < k)
    while k < n // 2:
        nxt = tail + math.comb(n, k) / 2 ** n
        if 1 - 2 * nxt < confidence:
            break
        tail, k = nxt, k + 1
    return (x[k - 1], x[n - k], 1 - 2 * tail) if k else None


def train_step(args, path, tmp, name, setting, bf16, profile_step=None, paired=None, beside=None):
    """The seconds of each training step after 2 warm-ups, and the profiler of one if asked; paired "quant": every
    other step unquantized (PairedTimer), "precision": every other step in bf16 (PrecisionPairedTimer), "attention":
    every other step with eager attention (AttentionPairedTimer), the other steps' seconds third; beside: called
    after each kept step (StepTimer), its results fourth."""
    steps = args.steps * (2 if paired else 1)
    # the profiled step stays the last one (after the timed steps)
    timer_cls = {None: StepTimer, "quant": PairedTimer, "precision": PrecisionPairedTimer,
                 "attention": AttentionPairedTimer}[paired]
    timer = timer_cls(profile_step and profile_step + steps - args.steps, args.compile_layers, beside)
    alternating = {"precision": lambda: alternating_precision(timer, path, args.compile_layers),
                   "attention": lambda: alternating_attention(timer)}.get(paired, contextlib.nullcontext)
    with alternating():
        timed_training(path, args.data, tmp, name, setting, bf16, steps + 2 + bool(profile_step), args.batch,
                       args.seq, args.optim, timer.profile_step, args.compile_layers, timer)
    warm = 1 if paired else 2  # 2 warm-up steps: one of each kind when paired
    other = timer.other[warm:warm + args.steps] if paired else []
    return timer.times[warm:warm + args.steps], timer.prof, other, timer.besides[warm:warm + args.steps]


def median_with_interval(values, unit):
    """'median m, c% interval of the median [lo, hi] over n <unit>' (or, with too few values, no interval)."""
    interval = median_interval(values)
    return f"median {statistics.median(values):.3f}, " + (
        f"{interval[2]:.0%} interval of the median [{interval[0]:.3f}, {interval[1]:.3f}] over {len(values)} {unit}"
        if interval else f"{len(values)} {unit} (an interval of the median needs 5+)")


def print_pairs(first, second, times):
    """The pairs of a paired run in order, and the median of their own ratios with its 90% interval."""
    pairs = list(zip(*times))
    print(f"  the pairs in order ({first} / {second}, s): " + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in pairs))
    print("  the pairs' own ratios: " + median_with_interval([a / b for a, b in pairs], "pairs"))


def step(args, path):
    """Rounds of [QAT bf16, unquantized KD bf16, QAT fp32] (every other round reversed) and of the matmul
    timings: these machines' speed drifts within minutes, so every figure is a median over the rounds."""
    config = read_config(path)
    tokens = args.batch * args.seq
    # student forward + backward, teacher forward (embeddings tied to lm_head: the head's GEMMs count once each)
    shapes = linear_shapes(config, tokens, True) + linear_shapes(config, tokens, False)
    variants = [("qat_bf16", args.setting, True), ("kd_bf16", None, True), ("qat_fp32", args.setting, False)]
    times, gemm, profiles = collections.defaultdict(list), collections.defaultdict(list), []
    operands = {}  # the step-by-step matmul timings' operands, made once
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, setting, bf16 in variants if r % 2 == 0 else variants[::-1]:
                profile = args.steps + 3 if name == "qat_bf16" else None  # one profiled step per round
                paired = ("quant" if args.paired and name == "qat_bf16" else
                          "attention" if args.paired_attention and name == "qat_bf16" else
                          "precision" if args.paired_precision and name == "qat_fp32" else None)
                # the bf16 QAT steps' matmuls timed alone right after each step: the gemm fraction step by step
                beside = ((lambda: gemm_time(shapes, torch.bfloat16, 1, operands=operands)[1])
                          if name == "qat_bf16" else None)
                t, p, other, gemms = train_step(args, path, tmp, f"{name}_{r}", setting, bf16, profile, paired, beside)
                times[name] += t
                times["gemm_beside"] += gemms
                if paired:
                    times[{"quant": "kd_bf16_paired", "precision": "qat_bf16_paired",
                           "attention": "qat_bf16_eager_attention"}[paired]] += other
                if p is not None:
                    profiles.append(breakdown(p))
            for dtype in (torch.bfloat16, torch.float32):
                flops, seconds = gemm_time(shapes, dtype, args.reps)
                gemm[dtype].append(seconds)
    t = {name: statistics.median(v) for name, v in times.items()}
    g = {dtype: statistics.median(v) for dtype, v in gemm.items()}
    print(f"(2) training step: W-A-KV {args.setting} QAT + KD, batch {args.batch} x {args.seq}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds of {args.steps} timed steps per variant")
    print(f"  matmul rate at the step's {len(shapes)} GEMM shapes: bf16 {flops / g[torch.bfloat16] / 1e9:.0f} GFLOP/s, "
          f"fp32 {flops / g[torch.float32] / 1e9:.0f} GFLOP/s ({g[torch.float32] / g[torch.bfloat16]:.2f}x)")
    print(f"  median step: QAT bf16 {t['qat_bf16']:.3f} s, QAT fp32 {t['qat_fp32']:.3f} s, unquantized KD bf16 "
          f"{t['kd_bf16']:.3f} s")
    if args.paired:
        print(f"  paired in one run, every other step unquantized: QAT bf16 {t['qat_bf16']:.3f} s, unquantized "
              f"{t['kd_bf16_paired']:.3f} s: qat_over_kd_step_paired {t['qat_bf16'] / t['kd_bf16_paired']:.3f}")
        print_pairs("QAT", "unquantized", (times["qat_bf16"], times["kd_bf16_paired"]))
    if args.paired_precision:
        print(f"  paired in one run, every other step in bf16: QAT fp32 {t['qat_fp32']:.3f} s, bf16 "
              f"{t['qat_bf16_paired']:.3f} s: bf16_over_fp32_speedup_paired {t['qat_fp32'] / t['qat_bf16_paired']:.2f}")
        print_pairs("fp32", "bf16", (times["qat_fp32"], times["qat_bf16_paired"]))
    if args.paired_attention:
        print(f"  paired in one run, every other step with eager attention: QAT bf16 {t['qat_bf16']:.3f} s (sdpa), "
              f"{t['qat_bf16_eager_attention']:.3f} s (eager): eager_attention_speedup_paired "
              f"{t['qat_bf16'] / t['qat_bf16_eager_attention']:.3f}")
        print_pairs("sdpa", "eager", (times["qat_bf16"], times["qat_bf16_eager_attention"]))
    print(f"  step matmuls {flops / 1e12:.3f} TFLOP: achieved {flops / t['qat_bf16'] / 1e9:.0f} GFLOP/s in bf16, "
          f"{flops / t['qat_fp32'] / 1e9:.0f} GFLOP/s in fp32")
    # per kind, the median over the rounds' profiled steps (a stalled core doubles one step's every figure)
    kinds = collections.Counter({k: statistics.median(p[0][k] for p in profiles) for k in KINDS})
    other = collections.Counter({n: statistics.median(p[1][n] for p in profiles) for n in profiles[0][1]})
    print_breakdown(kinds, other, len(profiles))
    fractions = [gemm / step for gemm, step in zip(times["gemm_beside"], times["qat_bf16"])]
    print("  each bf16 QAT step beside its matmuls timed alone right after it, the fraction: "
          + median_with_interval(fractions, "steps"))
    print(f"bf16_over_fp32_speedup {t['qat_fp32'] / t['qat_bf16']:.2f}")
    print(f"qat_over_kd_step {t['qat_bf16'] / t['kd_bf16']:.3f}")
    print(f"fp32_step_gemm_fraction {g[torch.float32] / t['qat_fp32']:.3f}")
    print(f"step_gemm_fraction_beside {statistics.median(fractions):.3f}")
    print(f"step_gemm_fraction {g[torch.bfloat16] / t['qat_bf16']:.3f}")


def main(argv=None):
    tune_cpu_allocator()  # as train.py / generate_data.py run (utils/allocator.py)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = resolve_model(args.model)
    parts = set(args.parts.split(","))
    if bad := parts - {"gen", "step"}:
        sys.exit(f"error: --parts {args.parts!r}: unknown {sorted(bad)}; use a comma list of gen, step")
    if "gen" in parts:
        generation(args, path)
    if "step" in parts:
        step(args, path)


if __name__ == "__main__":
    main()
