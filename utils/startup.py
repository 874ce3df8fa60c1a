"""A command's start-up without the cyclic garbage collector.

A command's imports (torch, transformers, datasets, accelerate) create ~440k objects that live as long as the
process. The collector, triggered every 700 new objects, traverses them again and again while they pile up (7
full and ~1,100 partial collections during `import train`, freeing 2% of what they visit), and again after, as
they age through its generations. The entry scripts import their libraries inside `imports_without_gc()`: the
collector is off for the block, and what the block created is then frozen (`gc.freeze`: exempt from the
collector; reference counting frees objects as before). Garbage from before the block is collected first (at a
process's start, a few thousand objects). Only the imports' own cyclic garbage is kept, ~10k small objects.
LLMQAT_IMPORT_GC=1 leaves the collector alone (benchmarks/bench_startup.py compares the two).
"""
import gc
import os
from contextlib import contextmanager


@contextmanager
def imports_without_gc():
    """Collector off for the block and its objects frozen after it (unless LLMQAT_IMPORT_GC=1, or it is off)."""
    if os.environ.get("LLMQAT_IMPORT_GC") == "1" or not gc.isenabled():
        yield
        return
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()
