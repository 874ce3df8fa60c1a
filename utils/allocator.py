"""CPU memory that is reused instead of page-faulted afresh every step.

PyTorch's CPU allocator is the C library's malloc. glibc serves every block above its mmap threshold (128 KiB
to 32 MiB, adaptive) with a fresh mmap and unmaps it on free, so every step's activations, logits and gradients
are new pages: the kernel faults and zeroes each 4 KiB page on first touch. Measured on SmolLM2 (batch 4 x 256,
bf16 QAT+KD, 2 threads): ~330k page faults per training step. tune_cpu_allocator() removes almost all of them:

- THP_MEM_ALLOC_ENABLE=1 (PyTorch's own switch): blocks of >= 2 MiB are 2 MiB aligned and madvised as
  transparent huge pages, one fault per 2 MiB (read once, at torch's first allocation: call this before any);
- glibc's mallopt, where no CUDA device is visible: blocks up to 1 GiB come from the heap, and freed memory stays
  with the process for the next step (the peak resident memory is the same; it is not handed back between steps).

Together: ~2k faults per step. Numbers are unchanged (allocation only). LLMQAT_DEFAULT_ALLOCATOR=1 turns both off
(benchmarks/bench_allocator.py compares the two).
"""
import ctypes
import ctypes.util
import os
import resource

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's <malloc.h>
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB from the heap (the largest: SmolLM2's [1024, 49152] fp32 logits)
TRIM_THRESHOLD = 2**31 - 1  # (mallopt takes a C int) the heap's top is not given back between steps
TOP_PAD = 256 << 20


def tune_cpu_allocator() -> dict:
    """Huge pages for torch's large blocks; on CPU-only runs, glibc keeps freed blocks for reuse. Returns what was
    set (empty when LLMQAT_DEFAULT_ALLOCATOR=1). Call first in a script, before torch allocates anything."""
    if os.environ.get("LLMQAT_DEFAULT_ALLOCATOR") == "1":
        return {}
    done = {"THP_MEM_ALLOC_ENABLE": os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")}
    import torch  # importing allocates nothing on the CPU

    if torch.cuda.is_available():  # host memory of GPU runs (loading, pinned buffers) is returned as before
        return done
    mallopt = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallopt", None)  # glibc only
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        ok = all(mallopt(opt, value) == 1 for opt, value in
                 ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
        done["mallopt"] = ok
    return done


def page_faults() -> int:
    """Minor page faults of this process so far (first touches of fresh memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
