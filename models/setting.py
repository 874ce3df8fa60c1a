"""The quantization setting: bit widths of weights, activations and the KV cache (plus weight groups and the
weight quantizer), parsed, checked and named once.

Apart from models/quant_model.py, which converts models and imports transformers, so that a launcher
(run_train.sh) checks a setting in the time torch takes to import."""
import logging
import re
from dataclasses import asdict, dataclass

from models.errors import InputError
from models.utils_quant import BITS_RULE, TERNARY, W_QUANTIZERS

logger = logging.getLogger(__name__)

ALLOWED_BITS = (*range(1, 9), 16, 32)
_NAME = re.compile(r"W(\d+)A(\d+)KV(\d+)(?:-g(\d+))?(?:-(lsq|seq))?$")
_LABEL = re.compile(r"(\d+)-(\d+)-(\d+)(?:-g(\d+))?(?:-(lsq|seq))?$")


@dataclass(frozen=True)
class QuantSetting:
    """Bit widths of weights, input activations and the KV cache (32: not quantized; w_bits 0: ternary weights,
    ParetoQ's SEQ grid, with w_quantizer seq only), checked once, here.

    name "W4A8KV4" (run and model directory names), label "4-8-4" (tables), both with "-g128" for groups of
    128 weight columns and "-lsq" / "-seq" for learned weight scales; written to and read from a model's
    config.json (w_bits, a_bits, kv_bits, kv_post_rope, w_group_size, w_quantizer), and applied to a model by
    apply()."""
    w_bits: int = 32
    a_bits: int = 32
    kv_bits: int = 32
    kv_post_rope: bool = False  # quantize keys after RoPE (serving engines' cache) instead of before (the paper)
    w_group_size: int = None  # one weight scale per group of this many input columns; None: per output channel
    w_quantizer: str = "absmax"  # the weight scale: absmax (the paper's), lsq or seq (learned; utils_quant)

    def __post_init__(self):
        # ternary weights (w_bits 0) are checked with the quantizer below
        for field, bits, allowed in (("w_bits", self.w_bits, (*ALLOWED_BITS, TERNARY)),
                                     ("a_bits", self.a_bits, ALLOWED_BITS), ("kv_bits", self.kv_bits, ALLOWED_BITS)):
            if type(bits) is not int or bits not in allowed:
                raise InputError(f"{field}={bits} is not allowed; use {BITS_RULE}")
        if self.kv_bits == 1:
            raise InputError("kv_bits=1 is not allowed (symmetric 1-bit quantization has no nonzero level); "
                             "use 2-8, 16 or 32")
        if self.w_group_size is not None:
            if type(self.w_group_size) is not int or self.w_group_size < 1:
                raise InputError(f"w_group_size={self.w_group_size} is not allowed; use a positive number of input "
                                 "columns that divides every decoder linear's input width (e.g. 32, 64, 128)")
            if self.w_bits >= 32:
                raise InputError(f"w_group_size={self.w_group_size} needs quantized weights (w_bits 1-8 or 16)")
        self.check_quantizer()
        if self.a_bits <= 2:
            logger.warning("a_bits=%d: activations are not quantized below 3 bits (as in the paper)", self.a_bits)

    def check_quantizer(self):
        q, w = self.w_quantizer, self.w_bits
        if q not in W_QUANTIZERS:
            raise InputError(f"w_quantizer={q} is not allowed; use {', '.join(W_QUANTIZERS)}")
        if q == "lsq" and not 2 <= w <= 8:
            raise InputError(f"w_quantizer=lsq with w_bits={w}: learned scales need w_bits 2-8")
        if q == "seq" and w not in (2, TERNARY):
            raise InputError(f"w_quantizer=seq with w_bits={w}: SEQ is ParetoQ's grid for 2 bits and ternary; use "
                             "w_bits 2 or 0 (lsq for 3-8 bits)")
        if w == TERNARY and q != "seq":
            raise InputError(f"w_bits=0 (ternary) with w_quantizer={q}: ternary weights are ParetoQ's SEQ grid "
                             "with a learned range; add w_quantizer seq (-seq)")

    @classmethod
    def parse(cls, text, kv_post_rope=False):
        """From a label "4-8-4" or a name "W4A8KV4" (either with "-g128": groups of 128 weight columns, then
        "-lsq" / "-seq": learned weight scales)."""
        m = _LABEL.match(str(text)) or _NAME.match(str(text))
        if m is None:
            raise InputError(f"quantization setting {text!r}: write W-A-KV as 4-8-4 or W4A8KV4 (-g128: groups, "
                             "-lsq / -seq: learned weight scales)")
        *bits, group, quantizer = m.groups()
        return cls.of(*bits, kv_post_rope=kv_post_rope, w_group_size=group, w_quantizer=quantizer or "absmax")

    @classmethod
    def of(cls, w_bits, a_bits, kv_bits, kv_post_rope=False, w_group_size=None, w_quantizer="absmax"):
        """From widths given as text (a command line); one that is not an integer is named in the error."""
        def width(x):
            return int(x) if str(x).lstrip("-").isdigit() else x
        group = None if w_group_size in (None, "", "0", 0) else width(w_group_size)
        return cls(width(w_bits), width(a_bits), width(kv_bits), kv_post_rope, group, w_quantizer)

    @property
    def bits(self):
        return self.w_bits, self.a_bits, self.kv_bits

    @property
    def groups(self):
        return f"-g{self.w_group_size}" if self.w_group_size else ""

    @property
    def suffix(self):
        return self.groups + (f"-{self.w_quantizer}" if self.w_quantizer != "absmax" else "")

    @property
    def name(self):
        return "W{}A{}KV{}".format(*self.bits) + self.suffix

    @property
    def label(self):
        return "{}-{}-{}".format(*self.bits) + self.suffix

    @property
    def is_float(self):
        return self.bits == (32, 32, 32)

    @classmethod
    def from_config(cls, config):
        """The setting a saved QAT model carries in its config.json, or None for a full-precision model."""
        if not all(hasattr(config, k) for k in ("w_bits", "a_bits", "kv_bits")):
            return None
        return cls(config.w_bits, config.a_bits, config.kv_bits, bool(getattr(config, "kv_post_rope", False)),
                   getattr(config, "w_group_size", None), getattr(config, "w_quantizer", None) or "absmax")

    def write_config(self, config):
        for key, value in asdict(self).items():
            setattr(config, key, value)

    def check_groups(self, model):
        """One clear error if w_group_size does not divide the input width of every decoder linear."""
        from models.quant_model import check_groups  # the model side imports transformers
        check_groups(self, model)

    def apply(self, model, init_scales=True):
        """Replace every decoder nn.Linear with QuantizeLinear in place; record the setting in model.config.
        Learned weight ranges start from the weights (initial_range), or are only allocated (init_scales=False:
        weights still to come, from a checkpoint or from FSDP's rank 0)."""
        from models.quant_model import quantize  # the model side imports transformers
        return quantize(self, model, init_scales)
