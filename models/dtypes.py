"""Compute dtypes: which one pays on this machine (bf16 on GPUs, and on CPUs with native bf16 for wide models)."""
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_bf16():
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16): there bf16 matmuls run ~4x fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# On CPU, bf16 pays only where the matmuls are large: bf16/fp32 QAT step time measured on this 2-core CPU,
# 1.7x faster on SmolLM2 (hidden 576), 3.5x slower on the embedded model (hidden 256).
CPU_BF16_MIN_HIDDEN = 512


def bf16_pays(hidden_size=CPU_BF16_MIN_HIDDEN):
    """Whether bf16 compute is the better default: a GPU with bf16, or a CPU with native bf16 matmuls and a
    model at least CPU_BF16_MIN_HIDDEN wide (hidden_size: the text model's; by default any model)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16() and hidden_size >= CPU_BF16_MIN_HIDDEN


def resolve_dtype(name, config=None):
    """A --dtype choice: "auto" is bfloat16 where bf16_pays(config) (a GPU; on CPU, generation only: pass the
    model's config), else float32. Any other name stays."""
    if name == "auto":
        if torch.cuda.is_available():
            return "bfloat16"
        width = getattr(config.get_text_config(), "hidden_size", 0) if config is not None else 0
        return "bfloat16" if bf16_pays(width) else "float32"
    return name
