"""FSDP around HF ``Trainer``: real FSDP on multi-process CPU (gloo, e.g. CPU-only CI), the sharded KD teacher
(``shard_frozen``), one checkpoint read per run (``weights_from_rank0``), and a per-rank shard report.

Why CPU needs a fix (transformers 5.24 / accelerate 1.15):
``Trainer`` turns ``TrainingArguments.fsdp_plugin_args`` into a ``FullyShardedDataParallelPlugin`` and passes
it to ``Accelerator``. ``AcceleratorState.__init__`` (accelerate/state.py, the ``elif self.distributed_type in
[MULTI_GPU, MULTI_MLU, ...]`` branch around line 986-1016) only promotes the run to ``DistributedType.FSDP``
and stores ``state.fsdp_plugin`` for accelerator types; ``MULTI_CPU`` is not in that list. The plugin is
silently dropped, ``Trainer.is_fsdp_enabled`` (trainer.py line 875) is False, and
``Accelerator.prepare_model`` takes its ``MULTI_CPU`` branch (accelerator.py line 2058): plain DDP.
``ACCELERATE_USE_FSDP=true`` does not help (Accelerator already sets it; the gate is the type list).

Fix (``promote_to_fsdp``): right after the stock ``create_accelerator_and_postprocess``, if FSDP was requested,
the state is ``MULTI_CPU`` and world size > 1, do what accelerate does for GPUs: set ``distributed_type = FSDP``
and attach the plugin. Everything after that (FSDP2 ``fully_shard`` wrapping, grad clipping, FULL_STATE_DICT
saving) is accelerate's and Trainer's own code. GPU runs never reach the promotion (their state is already FSDP).

Notes: needs ``TrainingArguments(use_cpu=True)`` (else accelerate picks DistributedType.NO and Trainer raises
"Using fsdp only works in distributed training"). The stock post-create sanity checks that key on
``is_fsdp_enabled`` (e.g. activation_checkpointing set both in args and fsdp_config) ran before the promotion,
so they are not re-done here. FSDP1 (deprecated in transformers 5.x) trains but cannot save on CPU, see below.
"""

import logging
import resource

import torch
from transformers import TrainerCallback

from utils import precision
from utils.internals import fsdp2_shard, set_distributed_type

logger = logging.getLogger(__name__)


def promote_to_fsdp(accelerator, fsdp_plugin_args) -> bool:
    """Promote a MULTI_CPU accelerator state to FSDP when FSDP was requested. Returns True if it did."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if fsdp_plugin_args is None or state.distributed_type != DistributedType.MULTI_CPU or state.num_processes <= 1:
        return False
    plugin = FullyShardedDataParallelPlugin(**fsdp_plugin_args)  # mixed precision: see utils.precision
    if plugin.fsdp_version == 1:
        # accelerate passes device_id=accelerator.device ("cpu:<rank>") to FSDP1, which then fails its
        # "Inconsistent compute device" check against plain "cpu". FSDP2 does not use it.
        state.device = torch.device("cpu")
    state.fsdp_plugin = plugin
    set_distributed_type(state, DistributedType.FSDP)
    if state.is_main_process:
        logger.warning(
            "utils.fsdp: CPU multi-process run (%s procs, backend %s): using FSDP%d instead of accelerate's DDP fallback",
            state.num_processes, state.backend, plugin.fsdp_version,
        )
        if plugin.fsdp_version == 1:
            logger.warning(
                "utils.fsdp: FSDP1 on CPU trains, but save_model() segfaults (accelerate's get_state_dict hardcodes "
                "FullStateDictConfig(offload_to_cpu=True), which crashes torch FSDP1 on CPU). Use fsdp_version 2."
            )
    return True


class CpuFsdpMixin:
    """Put first in the bases: ``class MyTrainer(CpuFsdpMixin, Trainer)``."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if promote_to_fsdp(self.accelerator, self.args.fsdp_plugin_args):
            self.is_fsdp_enabled = True
        if (plugin := getattr(self.accelerator.state, "fsdp_plugin", None)) is not None:
            precision.fsdp_mixed_precision(plugin)  # before prepare(): the same dtypes as one process


def weights_from_rank0(args) -> bool:
    """True on the ranks that need not read the checkpoint: FSDP2 with cpu_ram_efficient_loading, rank != 0.

    They build the model without weights (load_model(empty=True): untouched storage) and FSDP broadcasts rank 0's
    weights while it shards (accelerate's fsdp2_prepare_model), so host RAM holds one copy, not one per process."""
    plugin_args = args.fsdp_plugin_args or {}
    return (plugin_args.get("fsdp_version") == 2 and bool(plugin_args.get("cpu_ram_efficient_loading"))
            and args.world_size > 1 and args.process_index != 0)


def shard_frozen(module, accelerator) -> bool:
    """FSDP2-shard a frozen module (the KD teacher) over all ranks exactly as accelerate shards the student.

    Each rank keeps 1/N of the weights; a forward all-gathers one unit (decoder layer, embedding, head) at a
    time. The gathered weights are the originals, so the outputs are bit-identical to an unsharded copy.
    With cpu_ram_efficient_loading the weights come from rank 0 (see weights_from_rank0). Needs FSDP2
    (the default); returns False and leaves the module as is otherwise."""
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if accelerator.distributed_type != DistributedType.FSDP or plugin is None or plugin.fsdp_version != 2:
        return False
    fsdp2_shard(accelerator, module)  # in place: trainable params only are upcast, and it has none
    module.set_reshard_after_forward(True)  # also the root and head: there is no backward to keep them for
    return True


def local_param_numel(model: torch.nn.Module) -> int:
    """Number of parameter elements this rank really holds (call outside forward/backward).

    FSDP2: parameters are DTensors -> size of the local shard. FSDP1: between steps (resharded) the parameters
    are views into this rank's shard of the FlatParameter (use_orig_params=True: a param not on this rank has
    numel 0), or the FlatParameters themselves whose data is the local shard (use_orig_params=False), so
    ``numel()`` is already local. Unsharded models: full size.
    """
    from torch.distributed.tensor import DTensor

    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())


class ShardReport(TrainerCallback):
    """Logs, on every rank at the start of training, how many parameter elements that rank holds."""

    def __init__(self, teacher=None):
        self.teacher = teacher

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux: loading + sharding
        print(f"rank {args.process_index}/{args.world_size} host memory peak so far: {peak:.0f} MiB", flush=True)
        for name, m in (("student", model), ("teacher", self.teacher)):
            if m is not None:
                full = sum(p.numel() for p in m.parameters())  # a DTensor's numel() is its global size
                print(f"rank {args.process_index}/{args.world_size} holds {local_param_numel(m)} of {full} {name} "
                      f"parameter elements ({type(m).__name__})", flush=True)
