"""torchrun worker for tests/test_shard_teacher.py: shard a frozen model with utils.fsdp.shard_frozen (gloo, CPU)
and compare its logits with the unsharded model's. Rank 0 writes what it saw to the json path in argv[1]."""
import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate.utils import FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FSDPModule
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from models.quant_model import load_model  # noqa: E402
from utils.fsdp import local_param_numel, shard_frozen  # noqa: E402
from utils.process_args import EMBEDDED_MODEL  # noqa: E402


def models():
    yield "llama", load_model(EMBEDDED_MODEL)
    torch.manual_seed(0)  # same weights on every rank, as from_pretrained gives
    yield "qwen2_tied", Qwen2ForCausalLM(Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True))


def main():
    dist.init_process_group("gloo")
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    ids = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(1))
    seen = {"no_plugin": shard_frozen(torch.nn.Linear(2, 2), None, torch.device("cpu"))}
    for name, model in models():
        model.eval().requires_grad_(False)
        with torch.no_grad():
            before = model(input_ids=ids).logits
            full = sum(p.numel() for p in model.parameters())
            sharded = shard_frozen(model, plugin, torch.device("cpu"))
            after = model(input_ids=ids).logits
            again = model(input_ids=ids).logits  # resharded after the first forward, gathered again
        local = torch.tensor([local_param_numel(model)])
        held = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(held, local)
        seen[name] = {"sharded": sharded, "equal": torch.equal(before, after) and torch.equal(before, again),
                      "full": full, "held": [int(h) for h in held],
                      "units": sum(isinstance(m, FSDPModule) for m in model.modules()),
                      "layers": model.config.num_hidden_layers}
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(seen, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
