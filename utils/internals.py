"""The accelerate internals this repo relies on, fenced here: accelerate has no public API for (1) promoting a
CPU multi-process run to FSDP, (2) FSDP2-sharding a module outside prepare() (the frozen KD teacher), (3)
registering a module sharded that way as prepared. Each is checked against the version it was written for, so
an upgrade fails loudly here instead of training wrongly elsewhere. (transformers: only public APIs are used,
ALL_ATTENTION_FUNCTIONS and set_attn_implementation in models/kv_cache.py; DynamicLayer, subclassed by
utils/decode.py, is an exported class of transformers.cache_utils.)"""
import accelerate

TESTED = "1.15."  # accelerate's minor version these were written against (requirements.txt pins 1.15.0)


def _check():
    if not accelerate.__version__.startswith(TESTED):
        raise RuntimeError(f"utils/internals.py uses accelerate internals written for {TESTED}x, found "
                           f"{accelerate.__version__}: pip install -r requirements.txt, or re-check the functions "
                           "in utils/internals.py against the new version")


def set_distributed_type(state, distributed_type):
    """PartialState shares its state dict between instances; AcceleratorState writes the type into both."""
    _check()
    from accelerate.state import PartialState
    state.distributed_type = distributed_type
    PartialState._shared_state["distributed_type"] = distributed_type


def fsdp2_shard(accelerator, module):
    """accelerate's own FSDP2 wrapping (the student's), applied in place to another module."""
    _check()
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    return fsdp2_prepare_model(accelerator, module)


def register_prepared(accelerator, model):
    """Make the accelerator treat model as prepared (its save/gather paths look it up there)."""
    _check()
    accelerator._models.append(model)
