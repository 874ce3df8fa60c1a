"""torchrun worker for tests/test_shard_teacher.py: shard a frozen model with utils.fsdp.shard_frozen (gloo, CPU),
whole on every rank or built without weights on rank != 0 (cpu_ram_efficient_loading), and compare its logits
with the unsharded model's. Rank 0 writes what it saw to the json path in argv[1]; argv[2] is a scratch dir."""
import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from models.quant_model import load_model  # noqa: E402
from utils.fsdp import local_param_numel, promote_to_fsdp, shard_frozen  # noqa: E402
from utils.constants import EMBEDDED_MODEL  # noqa: E402


def model_dirs(scratch):
    qwen = os.path.join(scratch, "qwen2_tied")
    if dist.get_rank() == 0:
        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
                         ).save_pretrained(qwen)
    dist.barrier()
    return {"llama": EMBEDDED_MODEL, "qwen2_tied": qwen}


def main():
    accelerator = Accelerator(cpu=True)  # torchrun env: gloo, MULTI_CPU
    seen = {"no_fsdp": shard_frozen(torch.nn.Linear(2, 2), accelerator)}
    plugin_args = {"fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}
    promote_to_fsdp(accelerator, plugin_args)
    ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(1))
    for name, path in model_dirs(sys.argv[2]).items():
        with torch.no_grad():
            reference = load_model(path).eval()(input_ids=ids).logits
        for efficient in (False, True):
            # a fresh plugin per model: sharding fills in the model's layer class (the student's, in training)
            accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args,
                                                                           cpu_ram_efficient_loading=efficient)
            model = load_model(path, empty=efficient and dist.get_rank() != 0).eval().requires_grad_(False)
            full = sum(p.numel() for p in model.parameters())
            sharded = shard_frozen(model, accelerator)
            with torch.no_grad():
                logits = [model(input_ids=ids).logits for _ in range(2)]  # resharded after each forward
            local = torch.tensor([local_param_numel(model)])
            held = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(held, local)
            seen[f"{name}_efficient" if efficient else name] = {
                "sharded": sharded, "equal": all(torch.equal(reference, x) for x in logits),
                "full": full, "held": [int(h) for h in held],
                "units": [n for n, m in model.named_modules() if isinstance(m, FSDPModule)],
                "layers": model.config.num_hidden_layers}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(seen, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
