"""Command-line arguments: the original LLM-QAT flags on top of every HF TrainingArguments flag."""
import json
import os
import sys
import time
from dataclasses import dataclass, field

import transformers

from models.quant_model import QuantSetting
from utils import precision
from utils.errors import InputError
from utils.precision import PRECISIONS
from utils.constants import EMBEDDED_EVAL, EMBEDDED_MODEL, EMBEDDED_TRAIN


def recipe(default, what):
    """A TrainingArguments default set to the paper's recipe (reference section 3), shown by --help."""
    return field(default=default, metadata={"help": f"{what} (the paper's recipe)"})


@dataclass
class ModelArguments:
    input_model_filename: str = field(
        default=EMBEDDED_MODEL, metadata={"help": "Local HF model directory, or a packaged model's name (smollm2); "
                                          "teacher and student start from it"})
    output_model_filename: str = field(
        default=None, metadata={"help": "Name of the saved student under <local_dir>/models/ (None: W<w>A<a>KV<kv>)"})
    local_dir: str = field(default="output", metadata={"help": "Root of the saved model: <local_dir>/models/<name>"})
    qat: bool = field(default=True, metadata={"help": "Fake-quantize the student (False: fine-tune the FP model)"})
    w_bits: int = field(default=32, metadata={"help": "Weight bits: 1-8, 16, or 32 (off)"})
    a_bits: int = field(default=32, metadata={"help": "Activation bits: 1-8, 16, or 32 (off; <=2 also off)"})
    kv_bits: int = field(default=32, metadata={"help": "KV-cache bits: 2-8, 16, or 32 (off)"})
    kv_post_rope: bool = field(default=False, metadata={"help": "Quantize keys after RoPE (False: before, as the paper)"})
    w_group_size: int = field(default=None, metadata={"help": "One weight scale per group of this many input columns "
                              "(e.g. 128, as deployable recipes; saved in config.json); default: per output channel, "
                              "the paper's"})
    w_quantizer: str = field(default="absmax", metadata={
        "help": "Weight quantizer: absmax (the paper's scale from max|w|, recomputed every step), lsq (a learned range "
                "per channel or group, LSQ; w_bits 2-8; starts at absmax's grid) or seq (ParetoQ's stretched elastic "
                "2-bit grid, learned range from max|w|; w_bits 2)"})
    use_kd: bool = field(default=True, metadata={"help": "Distill from the FP teacher (False: next-token loss)"})
    kd_loss_scale: float = field(default=1.0, metadata={"help": "Scale of the KL(teacher || student) loss"})
    shard_teacher: bool = field(
        default=True, metadata={"help": "Under FSDP, shard the frozen teacher like the student (1/N per GPU; same "
                                "logits). False: a full teacher on every GPU, as the original"})
    load_dtype: str = field(
        default=None, metadata={"help": "Dtype of the student's weights; follows --precision (float32 master "
                                "weights by default, bfloat16 under --precision original) and may only repeat it",
                                "choices": ["float32", "bfloat16"]})

    def quant_setting(self):
        """The student's QuantSetting (bad widths fail here, with one line); full precision without --qat."""
        if not self.qat:
            return QuantSetting()
        return QuantSetting(self.w_bits, self.a_bits, self.kv_bits, self.kv_post_rope, self.w_group_size,
                            self.w_quantizer)


@dataclass
class DataArguments:
    train_data_local_path: str = field(
        default=EMBEDDED_TRAIN, metadata={"help": "jsonl {'text'} file(s): a path, a glob, or a comma-separated list"})
    eval_data_local_path: str = field(default=EMBEDDED_EVAL, metadata={"help": "jsonl {'text'} file(s) for perplexity"})
    max_train_samples: int = field(default=None, metadata={"help": "Keep only the first N training blocks"})
    max_eval_samples: int = field(default=None, metadata={"help": "Keep only the first N evaluation blocks"})
    shuffle: bool = field(default=True, metadata={"help": "Shuffle training blocks (False: file order, as the original)"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    output_dir: str = field(
        default=None, metadata={"help": "Trainer checkpoints, resumed if present (None: "
                                "<local_dir>/checkpoints/<output_model_filename>)"})
    model_max_length: int = field(default=2048, metadata={"help": "Training block length in tokens (capped at the "
                                                                   "model's max_position_embeddings)"})
    logging_dir: str = field(default=None, metadata={"help": "TensorBoard events (None: "
                                                             "<local_dir>/runs/<output_model_filename>/<start time>)"})
    fsdp_transformer_layer_cls_to_wrap: str = field(
        default=None, metadata={"help": "Decoder layer class FSDP wraps (None: the model's own, e.g. LlamaDecoderLayer)"})
    # The paper's recipe as defaults (reference section 3); every other TrainingArguments flag works too.
    do_train: bool = field(default=True, metadata={"help": "Train (False: only --do_eval, e.g. of the RTN student)"})
    report_to: str = field(default="tensorboard", metadata={"help": "Where to log: tensorboard, none, ..."})
    optim: str = field(default="adamw_torch_fused", metadata={
        "help": "Optimizer: AdamW (the paper's), fused into one pass over the parameters (5x faster on a CPU, same "
                "update up to rounding); adamw_torch: torch's per-tensor loop"})
    num_train_epochs: float = recipe(1.0, "Passes over the training blocks")
    per_device_train_batch_size: int = recipe(1, "Training blocks per device and step")
    per_device_eval_batch_size: int = recipe(1, "Evaluation blocks per device")
    learning_rate: float = recipe(2e-5, "Peak learning rate")
    w_range_lr: float = field(default=None, metadata={
        "help": "Peak learning rate of the learned weight ranges (--w_quantizer lsq / seq; the same schedule, no weight "
                "decay). None: --learning_rate (the ranges are in the weights' units, as ParetoQ trains them)"})
    lr_scheduler_type: str = recipe("cosine", "Learning-rate schedule")
    weight_decay: float = recipe(0.0, "AdamW weight decay")
    logging_steps: float = recipe(1, "Log the loss every N steps")
    save_strategy: str = recipe("steps", "When to write checkpoints")
    save_steps: float = recipe(2000, "Checkpoint every N steps")
    save_total_limit: int = recipe(1, "Checkpoints kept")

    precision: str = field(
        default="default", metadata={"help": "default: fp32 master weights, bf16 autocast with --bf16, the same "
                                     "numerics under 1 process, N processes, N nodes; original: the original "
                                     "code's pure bf16 weights and optimizer, bf16 reductions, eager attention "
                                     "(utils/precision.py)", "choices": list(PRECISIONS)})
    compile_layers: bool = field(default=False, metadata={
        "help": "torch.compile every decoder layer of the student and the teacher, and the KD loss (the compiler fuses "
                "their element-wise work: docs/speed.md); rounds differently outside the quantizers, the first steps "
                "compile. --torch_compile means this here (not the whole model). Not under --fsdp"})
    attn_implementation: str = field(default=None, metadata={
        "help": "Attention of the student and the teacher: sdpa (PyTorch's fused kernel) or eager (Hugging Face's "
                "matmuls and fp32 softmax: on a CPU at blocks of a few hundred tokens the step is faster, "
                "docs/speed.md; its memory grows with the square of the block length). None: sdpa, and eager "
                "under --precision original or --compile_layers on a CPU. Not saved: the trained model loads with the default",
        "choices": ["sdpa", "eager"]})
    warmup_ratio: float = field(default=None, metadata={"help": "The original's flag (transformers 5 folded it "
                                                                   "into --warmup_steps, where a value < 1 is a ratio)"})

    def __post_init__(self):
        if self.warmup_ratio is not None:
            self.warmup_steps = self.warmup_ratio
        if self.fsdp:
            cfg = self.fsdp_config or {}
            if isinstance(cfg, str):  # a JSON string or a JSON file, as transformers reads it
                if cfg.startswith("{"):
                    cfg = json.loads(cfg)
                else:
                    with open(cfg) as f:
                        cfg = json.load(f)
            cfg = {k.removeprefix("fsdp_"): v for k, v in cfg.items()}
            if self.fsdp_transformer_layer_cls_to_wrap:
                cfg["transformer_layer_cls_to_wrap"] = [self.fsdp_transformer_layer_cls_to_wrap]
            # one copy of the weights in host RAM, not one per process (FSDP2, the default; see utils.fsdp)
            cfg.setdefault("cpu_ram_efficient_loading", str(cfg.get("version", 2)) == "2")
            self.fsdp_config = cfg
        if self.torch_compile or self.torch_compile_backend or self.torch_compile_mode:
            # the regional compilation of KDTrainer instead of accelerate's whole-model one (which would break its
            # graph at every quantizer's shared input and leave the teacher and the KD loss eager)
            self.compile_layers, self.torch_compile = True, False
        if self.compile_layers and self.fsdp and str(self.fsdp_config.get("version", 2)) != "2":
            # tested under FSDP2 (2 CPU processes: the same first loss as one compiled process); FSDP1 not tried
            raise InputError("--compile_layers (or --torch_compile) under --fsdp needs FSDP2 (fsdp_config version 2, "
                             "the default); drop one, or the version 1 setting")
        precision.setup(self)
        compile_options = self.torch_compile_backend, self.torch_compile_mode
        self.torch_compile_backend = self.torch_compile_mode = None  # else transformers turns torch_compile on
        super().__post_init__()
        self.torch_compile_backend, self.torch_compile_mode = compile_options  # compile_layers passes them on


def process_args(argv=None):
    """train.py's command line -> (model_args, data_args, training_args), checked and completed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    parser.error = lambda message: sys.exit(f"error: {message} (python train.py --help lists every flag)")
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    explicit_output_dir = any(a == "--output_dir" or a.startswith("--output_dir=") for a in argv)
    return complete_args(model_args, data_args, training_args, explicit_output_dir)


def complete_args(model_args, data_args, training_args, explicit_output_dir=False):
    """Check the setting once and fill in the names and directories that follow from it (for arguments
    built in Python as for parsed ones)."""
    setting = model_args.quant_setting()  # checked once, before any work
    model_args.load_dtype = precision.check(training_args.precision, model_args.load_dtype)
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        raise InputError(f"--max_steps {training_args.max_steps}: use >= 1, or -1 (the default: "
                         "--num_train_epochs decides)")
    if model_args.output_model_filename is None:
        model_args.output_model_filename = setting.name
    if not explicit_output_dir:
        # one checkpoint folder per run name, so a resumed run never picks up another setting's checkpoint
        training_args.output_dir = os.path.join(model_args.local_dir, "checkpoints", model_args.output_model_filename)
    if training_args.logging_dir is None:
        # one TensorBoard run per training run: <local_dir>/runs/<name>/<start time>
        training_args.logging_dir = os.path.join(model_args.local_dir, "runs", model_args.output_model_filename,
                                                 time.strftime("%Y%m%d-%H%M%S"))
    os.environ["TENSORBOARD_LOGGING_DIR"] = training_args.logging_dir  # transformers 5 dropped --logging_dir
    return model_args, data_args, training_args
