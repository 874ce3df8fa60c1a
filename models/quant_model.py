"""The quantization setting, and a stock HF causal LM turned into its LLM-QAT fake-quantized form (and loaded back).

No model file is forked: every nn.Linear inside the decoder layers is swapped for a QuantizeLinear
sharing the same parameters, so LLaMA-1/2/3, Mistral and Qwen2 (grouped-query attention) all work.
Embeddings and lm_head stay full precision; the attention matmuls are not quantized.

KV cache: by default the outputs of k_proj / v_proj are quantized per token across all heads,
before rotary embedding (the paper). `kv_post_rope=True` quantizes keys after RoPE instead, as
serving engines cache them (models/kv_cache.py).
"""
import contextlib
import copy
import logging
import re
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, GenerationConfig

from models.errors import InputError
from models.kv_cache import use_post_rope_kv_attention
from models.packed import PackedQuantizeLinear
from models.utils_quant import BITS_RULE, TERNARY, W_QUANTIZERS, QuantizeLinear, SharedInput

logger = logging.getLogger(__name__)

ALLOWED_BITS = (*range(1, 9), 16, 32)
KV_MODULES = ("k_proj", "v_proj")
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
        if self.w_group_size:
            widths = sorted({m.in_features for layer in decoder_layers(model) for m in layer.modules()
                             if isinstance(m, nn.Linear)})
            if bad := [w for w in widths if w % self.w_group_size]:
                raise InputError(f"w_group_size={self.w_group_size} does not divide the decoder linears' input "
                                 f"width {bad[0]}; use a divisor of every width in {widths}")

    def apply(self, model, init_scales=True):
        """Replace every decoder nn.Linear with QuantizeLinear in place; record the setting in model.config.
        Learned weight ranges start from the weights (initial_range), or are only allocated (init_scales=False:
        weights still to come, from a checkpoint or from FSDP's rank 0)."""
        self.check_groups(model)

        def to_quantize_linear(name, linear):
            out_bits = self.kv_bits if name in KV_MODULES and not self.kv_post_rope else 32
            q = QuantizeLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                               w_bits=self.w_bits, a_bits=self.a_bits, out_bits=out_bits,
                               w_group_size=self.w_group_size, w_quantizer=self.w_quantizer)
            q.weight, q.bias = linear.weight, linear.bias  # share parameters: no copy, same state_dict keys
            if q.learns_scale:
                q.init_weight_range(empty=not init_scales)
            return q

        swap_linears(model, nn.Linear, to_quantize_linear)
        shared = SharedInput()  # q/k/v and gate/up quantize their common input once
        for m in model.modules():
            if isinstance(m, QuantizeLinear):
                m.shared_input = shared
        self.write_config(model.config)
        if self.kv_post_rope and self.kv_bits < 32:
            use_post_rope_kv_attention(model)
        return model


def decoder_layers(model):
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder `layers`; only LLaMA-style decoders are supported")
    return layers


def swap_linears(model, cls, make):
    """Replace every module of exactly type cls inside the decoder layers by make(attribute name, module)."""
    for layer in decoder_layers(model):
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is cls:
                    setattr(parent, name, make(name, child))


def _allocate_parameters(model):
    """Give meta parameters uninitialized CPU storage: no RAM is used until written (untouched pages), but
    each has its own data_ptr, by which accelerate maps the optimizer onto FSDP's sharded parameters."""
    allocated = {}  # id -> new parameter, so tied weights stay tied
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in allocated:
                    allocated[id(p)] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
                module._parameters[name] = allocated[id(p)]


def read_config(path):
    """A model directory's config, or one clear error (no config.json, or one that does not parse)."""
    if not (Path(path) / "config.json").is_file():  # checked first: transformers would ask the hub for a repo id
        raise InputError(f"model {str(path)!r}: not a local Hugging Face model directory (no config.json)")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:  # transformers reports unparsable JSON as an OSError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"model {str(path)!r}: cannot read its config.json ({reason})") from None


def load_model(path, dtype=torch.float32, empty=False, config=None, **kwargs):
    """Load an HF causal LM; if its config carries a QuantSetting, rebuild the quantized model; an export.py
    directory (packed integer weights) loads as load_exported. config: path's, if already read.

    empty=True builds the same model without reading its weights (uninitialized parameters, real buffers):
    for FSDP ranks whose weights are broadcast from rank 0."""
    config = read_config(path) if config is None else copy.deepcopy(config)  # the model may change its own
    if hasattr(config, "llmqat_export"):
        return load_exported(path, config)
    if empty:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
        model.tie_weights()  # as from_pretrained does; _allocate_parameters keeps tied weights tied
        _allocate_parameters(model)
    else:
        with expecting_learned_scales(config):
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **kwargs)
    if (setting := QuantSetting.from_config(config)) is not None:
        learned = setting.w_quantizer != "absmax"
        setting.apply(model, init_scales=not learned)
        if learned and not empty:
            load_learned_scales(model, path)
    return model


@contextlib.contextmanager
def expecting_learned_scales(config):
    """from_pretrained of a model with learned weight ranges: the stock class has no `weight_range` parameter, so
    say (for this load) that those keys are expected to be left over; load_learned_scales reads them."""
    cls = AutoModelForCausalLM._model_mapping.get(type(config), None) if getattr(config, "w_quantizer", None) in ("lsq", "seq") \
        else None
    if cls is None:
        yield
        return
    before = cls.__dict__.get("_keys_to_ignore_on_load_unexpected", _UNSET)
    cls._keys_to_ignore_on_load_unexpected = [*(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []),
                                              r"\.weight_range$"]
    try:
        yield
    finally:
        if before is _UNSET:
            del cls._keys_to_ignore_on_load_unexpected
        else:
            cls._keys_to_ignore_on_load_unexpected = before


_UNSET = object()


def load_learned_scales(model, path):
    """Copy the learned weight ranges (`*.weight_range`, which from_pretrained leaves: the stock model has no such
    parameter) from a saved model directory into the quantized model; one clear error if any is missing."""
    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys() if k.endswith(".weight_range")})
    params = {name: p for name, p in model.named_parameters() if name.endswith(".weight_range")}
    if missing := sorted(set(params) - set(state)):
        raise InputError(f"{path}: its config.json has w_quantizer={model.config.w_quantizer} but the weights have no "
                         f"learned range {missing[0]} ({len(missing)} missing)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def load_exported(path, config=None):
    """Load a checkpoint written by models.export.export: packed weights, and the QAT model's activation and KV
    quantization. config: path's, if already read."""
    config = read_config(path) if config is None else copy.deepcopy(config)  # the model may change its own
    if not hasattr(config, "llmqat_export"):
        raise InputError(f"{path} is not an exported checkpoint (no llmqat_export in its config.json)")
    with init_empty_weights(include_buffers=False):  # parameters come from the files; buffers (RoPE) are computed
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    QuantSetting.from_config(config).apply(model)
    swap_linears(model, QuantizeLinear, lambda name, linear: PackedQuantizeLinear(linear))
    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(file))
    unexpected = model.load_state_dict(state, strict=False, assign=True).unexpected_keys
    model.tie_weights()  # a tied lm_head is stored once
    missing = [name for name, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if missing or unexpected:
        raise InputError(f"{path} does not match its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()
