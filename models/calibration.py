"""Calibration passes of the training-free baselines (SmoothQuant, GPTQ): token windows through the model
with hooks attached that record what they need."""
import torch
from tqdm import tqdm


class StopForward(Exception):
    """Raised by a hook once it has seen what it needs: the rest of the model is skipped."""


@torch.no_grad()
def run_windows(model, windows, hooks, batch_size=1, desc="calibrating"):
    """Forward windows [n, seq_len] of token ids in batches; the hook handles are removed afterwards, also
    on error."""
    try:
        for b in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
            try:
                model(input_ids=windows[b:b + batch_size].to(model.device), use_cache=False)
            except StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
