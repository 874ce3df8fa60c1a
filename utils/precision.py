"""The training precision regimes: one policy however the run is launched, and the original's one flag away.

default (``--precision default``): fp32 master weights and fp32 AdamW state; with ``--bf16`` the forward runs
under bf16 autocast, in every launch. accelerate itself autocasts only a single process's forward: under FSDP2
it instead gives FSDP a bf16 mixed-precision policy, which casts the parameters and every layer's inputs to
bf16, so the quantizers would see bf16 weights and a bf16 residual stream under FSDP and fp32 ones in one
process. Here FSDP gets no policy (fp32 parameters gathered, fp32 gradients reduced) and the trainer applies
the autocast itself: 1 process, N processes and N nodes quantize the same dtypes. The KD teacher is a frozen
bf16 copy with ``--bf16`` (fp32 without), in every launch.

original (``--precision original``): what facebookresearch/LLM-QAT trained with: pure bf16 parameters and bf16
AdamW state (its train.py loads the model in bf16), bf16 gradient reductions (FSDP reduces in the parameters'
dtype), the student's forward under bf16 autocast, the teacher in bf16 (its softmax over bf16 logits), eager
attention (fp32 softmax). accelerate's own mixed precision is turned off for it (it would upcast the
parameters to fp32 under FSDP2); this module's autocast takes its place, under 1 process and under FSDP.
"""
import contextlib
import logging

import torch

from utils.errors import InputError

logger = logging.getLogger("llm_qat")

PRECISIONS = ("default", "original")


def check(precision, load_dtype):
    """The student's load dtype under a precision regime (one error line for a contradiction): the one place
    it is decided (complete_args stores it as model_args.load_dtype)."""
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    want = "bfloat16" if precision == "original" else "float32"
    if load_dtype not in (None, want):
        if load_dtype == "bfloat16":
            raise InputError("--load_dtype bfloat16: pure bf16 student weights are the original's regime; pass "
                             "--precision original (with --bf16 alone accelerate would train them as fp32 under "
                             "FSDP and as bf16 in one process)")
        raise InputError(f"--load_dtype {load_dtype}: --precision {precision} trains {want} weights")
    return want


def setup(args):
    """Called by TrainingArguments.__post_init__: the original regime replaces accelerate's bf16 mixed precision
    by its own autocast (see the module docstring)."""
    if args.precision == "original" and args.bf16:
        args.bf16 = False
        logger.info("--precision original: accelerate's mixed precision off; bf16 parameters, bf16 autocast")


def is_original(args):
    return args.precision == "original"


def teacher_dtype(args):
    return torch.bfloat16 if is_original(args) or args.bf16 else torch.float32


def model_kwargs(args):
    """Extra from_pretrained arguments: eager attention (fp32 softmax) in the original's regime, and for
    --compile_layers on a CPU, where the compiler fuses its softmax and the step beats the CPU flash kernel
    (docs/speed.md); a GPU keeps its fused attention kernel. --attn_implementation, when given, decides."""
    if getattr(args, "attn_implementation", None):
        return {"attn_implementation": args.attn_implementation}
    if is_original(args) or (getattr(args, "compile_layers", False) and args.device.type == "cpu"):
        return {"attn_implementation": "eager"}
    return {}


def autocast(args):
    """bf16 autocast around the forward (training and evaluation) with --bf16 or in the original regime, under
    every launch (in one process accelerate's own autocast of the forward nests inside it, same dtype)."""
    if is_original(args) or args.bf16:
        return torch.autocast(args.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fsdp_mixed_precision(plugin):
    """No FSDP mixed-precision policy in either regime: parameters are gathered and gradients reduced in the
    parameters' own dtype (fp32 master weights by default, bf16 in the original regime), so an FSDP run
    quantizes what a single process quantizes."""
    plugin.mixed_precision_policy = None
