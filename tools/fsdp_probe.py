"""FSDP probe for CPU CI: tiny random Llama, ~20 Trainer steps, real sharding, full checkpoint.

    torchrun --nproc_per_node 2 tools/fsdp_probe.py OUT_DIR [--fsdp-version 2] [--compare OTHER_OUT_DIR]
    python tools/fsdp_probe.py OUT_DIR                      # 1 process: same global batch via grad accumulation

Prints per rank: world size, wrapped-model type, full vs local parameter count, first/last loss.
Rank 0 then reloads OUT_DIR with LlamaForCausalLM.from_pretrained and checks every tensor is full size;
with --compare it prints the max abs weight difference to another run's OUT_DIR.
--no-fix runs the stock Trainer (shows the silent DDP fallback on CPU).
"""

import argparse
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.fsdp import CpuFsdpMixin, local_param_numel  # noqa: E402

VOCAB, SEQ, N_SAMPLES, GLOBAL_BATCH, MICRO_BATCH = 128, 32, 160, 8, 4


class ProbeTrainer(CpuFsdpMixin, Trainer):
    pass


class ToyData(torch.utils.data.Dataset):
    """Random blocks that are learnable: x[t+1] = (x[t] + k) % VOCAB with random start and k in {1,2,3}."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, VOCAB, (N_SAMPLES, 1), generator=g)
        step = torch.randint(1, 4, (N_SAMPLES, 1), generator=g)
        self.ids = (start + step * torch.arange(SEQ)) % VOCAB

    def __len__(self):
        return N_SAMPLES

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--fsdp-version", type=int, default=2, choices=[1, 2])
    ap.add_argument("--compare", default=None, help="another run's OUT_DIR to diff weights against")
    ap.add_argument("--no-fix", action="store_true", help="stock Trainer, to show the DDP fallback")
    a = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", 1))
    assert GLOBAL_BATCH % (MICRO_BATCH * world) == 0
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float()
    full = sum(p.numel() for p in model.parameters())

    args = TrainingArguments(
        output_dir=a.out_dir, use_cpu=True, report_to="none", max_steps=a.steps, learning_rate=3e-3,
        per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=GLOBAL_BATCH // (MICRO_BATCH * world),
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", seed=0, data_seed=0,
        fsdp="full_shard auto_wrap" if world > 1 else None,
        fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], "version": a.fsdp_version,
                     # FSDP1 only: accelerate's sync_module_states=True needs an accelerator device (raises on
                     # CPU); ranks start from the same seed anyway.
                     **({"sync_module_states": False} if a.fsdp_version == 1 else {})},
        disable_tqdm=True,
    )
    trainer = (Trainer if a.no_fix else ProbeTrainer)(model=model, args=args, train_dataset=ToyData())
    t0 = time.time()
    trainer.train()
    dt = time.time() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rank = trainer.args.process_index
    wrapped = trainer.model_wrapped
    print(f"[rank {rank}] world={world} distributed_type={trainer.accelerator.distributed_type} "
          f"wrapped={type(wrapped).__module__}.{type(wrapped).__name__} "
          f"layer0={type(trainer.model.model.layers[0]).__name__} "
          f"full_params={full} local_params={local_param_numel(trainer.model)} "
          f"first_loss={losses[0]:.4f} last_loss={losses[-1]:.4f} n_logged={len(losses)} train_s={dt:.1f}",
          flush=True)

    trainer.save_model(a.out_dir)
    trainer.accelerator.wait_for_everyone()
    if rank == 0:
        loaded = LlamaForCausalLM.from_pretrained(a.out_dir)
        ref = LlamaForCausalLM(cfg).state_dict()
        sd = loaded.state_dict()
        bad = [k for k, v in ref.items() if k not in sd or sd[k].shape != v.shape]
        files = sorted(f for f in os.listdir(a.out_dir) if f.endswith(".safetensors"))
        print(f"[rank 0] saved {files}: {len(sd)} tensors, {sum(v.numel() for v in sd.values())} params, "
              f"missing/wrong-shape: {bad or 'none'}", flush=True)
        if a.compare:
            other = LlamaForCausalLM.from_pretrained(a.compare).state_dict()
            diff = max((sd[k] - other[k]).abs().max().item() for k in sd)
            print(f"[rank 0] max_abs_diff vs {a.compare}: {diff:.3e}", flush=True)


if __name__ == "__main__":
    main()
