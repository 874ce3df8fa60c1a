"""The training-free baselines of the table, chosen here by name: each quantizes an FP model to a QuantSetting.

    RTN          the fake quantizers alone (round to nearest on LLM-QAT's grids)
    SmoothQuant  activation outliers migrated into the weights (alpha), then RTN        (models/smoothquant.py)
    GPTQ         weights rounded with second-order error compensation on the same grid,
                 activations and KV cache as RTN                                        (models/gptq.py)
SmoothQuant and GPTQ are calibrated on token windows [n, seq_len]."""
from dataclasses import dataclass, replace
from typing import Callable

from models.errors import InputError
from models.gptq import gptq_model
from models.smoothquant import activation_absmax, smooth


def rtn(model, setting, windows=None, alpha=None):
    return setting.apply(model)


def smoothquant(model, setting, windows, alpha=0.5):
    smooth(model, activation_absmax(model, windows), alpha)
    return setting.apply(model)


def gptq(model, setting, windows, alpha=None):
    setting.check_groups(model)
    gptq_model(model, windows, setting.w_bits, group_size=setting.w_group_size)
    return replace(setting, w_bits=32, w_group_size=None).apply(model)  # the weights are on their grid already


@dataclass(frozen=True)
class Baseline:
    name: str
    quantize: Callable  # (model, setting, windows, alpha) -> the quantized model, in place
    calibrated: bool = False
    uses_alpha: bool = False
    w_bits: range = None  # the weight widths it can round to (None: every width a QuantSetting allows)

    def check(self, setting, alpha=None):
        """One clear error for a setting or alpha this baseline does not take."""
        if self.uses_alpha and not (alpha is not None and 0 < alpha <= 1):
            raise InputError(f"--smoothquant {alpha}: the migration strength alpha must be in (0, 1] (paper: 0.5)")
        if self.w_bits is not None and setting.w_bits not in self.w_bits:
            raise InputError(f"--{self.name.lower()} needs --w_bits {self.w_bits.start}-{self.w_bits.stop - 1} "
                             f"(the symmetric grid), not {setting.w_bits}")


BASELINES = {b.name: b for b in (Baseline("RTN", rtn), Baseline("SmoothQuant", smoothquant, True, True),
                                 # GPTQ: >= 3 bits only; at 2 bits the grid (a = 2 mean|w|) moves when the
                                 # rounded weights are quantized again, so its rounding would not be kept
                                 Baseline("GPTQ", gptq, True, w_bits=range(3, 9)))}


def baseline(name):
    if name not in BASELINES:
        raise InputError(f"baseline {name!r}: use one of {', '.join(BASELINES)}")
    return BASELINES[name]
