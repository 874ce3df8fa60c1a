"""train.py with a probe, for tests/test_precision.py: argv[1] is a json path prefix, the rest train.py's flags.
Each rank writes <prefix>.<rank>.json: the dtypes every QuantizeLinear saw in the first forward (its input,
its weight, autocast's dtype), the parameters' and the optimizer state's dtypes after the first step, the
attention implementation, and the logged losses."""
import json
import os
import sys

import torch
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from models.utils_quant import QuantizeLinear  # noqa: E402
from utils.process_args import process_args  # noqa: E402
from utils.train_qat import run  # noqa: E402


def name(dtype):
    return str(dtype).removeprefix("torch.")


class Probe(TrainerCallback):
    def __init__(self, prefix):
        self.prefix, self.seen, self.hooks, self.record = prefix, {}, [], {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for module_name, module in model.named_modules():
            if isinstance(module, QuantizeLinear):
                self.hooks.append(module.register_forward_pre_hook(self.hook(module_name)))
        self.record["attn_implementation"] = model.config._attn_implementation

    def hook(self, module_name):
        def pre(module, inputs):
            if module_name not in self.seen:
                x = inputs[0]
                autocast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
                self.seen[module_name] = [name(x.dtype), name(module.weight.dtype), autocast and name(autocast)]
        return pre

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step == 1:
            for h in self.hooks:
                h.remove()
            self.record["quantizer_inputs"] = self.seen
            self.record["params"] = sorted({name(p.dtype) for p in model.parameters()})
            self.record["optimizer_state"] = sorted({name(v.dtype) for s in optimizer.state.values()
                                                     for v in s.values() if torch.is_tensor(v) and v.dim() > 0})

    def on_train_end(self, args, state, control, **kwargs):
        self.record["losses"] = [h["loss"] for h in state.log_history if "loss" in h]
        with open(f"{self.prefix}.{args.process_index}.json", "w") as f:
            json.dump(self.record, f, indent=1)


if __name__ == "__main__":
    run(*process_args(sys.argv[2:]), callbacks=[Probe(sys.argv[1])])
