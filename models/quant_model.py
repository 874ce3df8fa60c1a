"""A stock HF causal LM turned into its LLM-QAT fake-quantized form (and loaded back); the setting itself is
models/setting.py.

No model file is forked: every nn.Linear inside the decoder layers is swapped for a QuantizeLinear
sharing the same parameters, so LLaMA-1/2/3, Mistral and Qwen2 (grouped-query attention) all work.
Embeddings and lm_head stay full precision; the attention matmuls are not quantized.

KV cache: by default the outputs of k_proj / v_proj are quantized per token across all heads,
before rotary embedding (the paper). `kv_post_rope=True` quantizes keys after RoPE instead, as
serving engines cache them (models/kv_cache.py).
"""
import contextlib
import copy
from itertools import chain
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, GenerationConfig

from models.config_file import config_json, first_line
from models.errors import InputError
from models.kv_cache import use_post_rope_kv_attention
from models.packed import PackedQuantizeLinear
from models.setting import QuantSetting  # also imported from here by other modules and tools
from models.utils_quant import QuantizeLinear, SharedInput

KV_MODULES = ("k_proj", "v_proj")


def check_groups(setting, model):
    """One clear error if setting.w_group_size does not divide the input width of every decoder linear."""
    if setting.w_group_size:
        widths = sorted({m.in_features for layer in decoder_layers(model) for m in layer.modules()
                         if isinstance(m, nn.Linear)})
        if bad := [w for w in widths if w % setting.w_group_size]:
            raise InputError(f"w_group_size={setting.w_group_size} does not divide the decoder linears' input "
                             f"width {bad[0]}; use a divisor of every width in {widths}")


def quantize(setting, model, init_scales=True):
    """setting.apply(model): every decoder nn.Linear becomes a QuantizeLinear, in place; model.config records
    the setting. Learned weight ranges start from the weights, or are only allocated (init_scales=False)."""
    check_groups(setting, model)

    def to_quantize_linear(name, linear):
        out_bits = setting.kv_bits if name in KV_MODULES and not setting.kv_post_rope else 32
        q = QuantizeLinear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                           w_bits=setting.w_bits, a_bits=setting.a_bits, out_bits=out_bits,
                           w_group_size=setting.w_group_size, w_quantizer=setting.w_quantizer)
        q.weight, q.bias = linear.weight, linear.bias  # share parameters: no copy, same state_dict keys
        if q.learns_scale:
            q.init_weight_range(empty=not init_scales)
        return q

    swap_linears(model, nn.Linear, to_quantize_linear)
    shared = SharedInput()  # q/k/v and gate/up quantize their common input once
    for m in model.modules():
        if isinstance(m, QuantizeLinear):
            m.shared_input = shared
    setting.write_config(model.config)
    if setting.kv_post_rope and setting.kv_bits < 32:
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
    config_json(path)  # checked first: transformers would ask the hub for a repo id, or say less
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:  # e.g. an unknown model_type
        raise InputError(f"model {str(path)!r}: cannot read its config.json ({first_line(e)})") from None


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
