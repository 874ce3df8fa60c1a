"""Knowledge distillation from the frozen full-precision teacher, on the stock Trainer API."""
import functools

import torch
import torch.nn.functional as F
from transformers import Trainer

from utils import precision
from utils.fsdp import CpuFsdpMixin, ShardReport, shard_frozen
from utils.internals import register_prepared


KD_CHUNK_ELEMENTS = 2**23  # tokens per chunk x vocab: each fp32 temporary of the loss stays ~32 MB


class _ChunkedKL(torch.autograd.Function):
    """Sum over tokens of KL(softmax(teacher) || softmax(student)), one chunk of tokens at a time.

    The gradient w.r.t. the student logits, (softmax(student) - softmax(teacher)) * scale, is computed in the
    same pass and kept in the logits' dtype: no fp32 [tokens, vocab] tensor ever exists in full, the logits
    need not outlive the forward, and the backward returns it as it is (or one multiply if the incoming
    gradient is not 1). The loss is the sum times scale (1 / batch: batchmean)."""

    @staticmethod
    def forward(ctx, student, teacher, rows, scale, compiled=False):
        vocab = student.shape[-1]
        s, t = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
        grad = torch.empty_like(s) if ctx.needs_input_grad[0] else None
        loss = torch.zeros((), dtype=torch.float32, device=student.device)
        for i in range(0, s.shape[0], rows):
            if compiled:  # fused by the compiler (--compile_layers): the sum rounds in another order
                part, g = _compiled_chunk()(s[i:i + rows], t[i:i + rows], scale)
                loss += part
                if grad is not None:
                    grad[i:i + rows] = g
                continue
            log_s = F.log_softmax(s[i:i + rows].float(), dim=-1)
            log_t = F.log_softmax(t[i:i + rows].float(), dim=-1)
            p_t = log_t.exp()  # the one exp of the teacher, for the loss and the gradient
            # kl_div(log_s, log_t, log_target=True, "sum") = sum p_t (log p_t - log p_s) (torch's pairwise sum:
            # a BLAS dot over the chunk drifts by 1e-4 relative)
            loss += p_t.mul(log_t.sub_(log_s)).sum()
            if grad is not None:
                grad[i:i + rows] = log_s.exp_().sub_(p_t).mul_(scale)
        ctx.save_for_backward(grad)
        ctx.shape = student.shape
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        if not bool(grad_loss == 1):  # kd_loss_scale or gradient accumulation: else no pass over [tokens, vocab]
            grad = grad * grad_loss
        return grad.view(ctx.shape), None, None, None, None


def _kd_chunk(s, t, scale: float):
    """The chunk's loss sum and gradient, written for the compiler (which fuses it into a few passes)."""
    log_s, log_t = F.log_softmax(s.float(), dim=-1), F.log_softmax(t.float(), dim=-1)
    p_t = log_t.exp()
    return (p_t * (log_t - log_s)).sum(), ((log_s.exp() - p_t) * scale).to(s.dtype)


@functools.cache
def _compiled_chunk():
    return torch.compile(_kd_chunk, dynamic=False)


def kd_loss(student_logits, teacher_logits, chunked=True, compiled=False):
    """KL(softmax(teacher) || softmax(student)) over the vocabulary, no temperature, computed in fp32.

    reduction="batchmean" on [batch, seq, vocab]: summed over tokens and divided by the batch size,
    exactly as the original code (so the scale grows with the sequence length).
    chunked (default): the same loss and gradient as the plain F.kl_div formula (chunked=False) to fp
    rounding, without its full-size fp32 log-softmaxes; the teacher is a constant (no gradient).
    compiled: each chunk through torch.compile (--compile_layers; the loss sums in another order)."""
    if not chunked or teacher_logits.requires_grad:
        return F.kl_div(F.log_softmax(student_logits.float(), dim=-1), F.log_softmax(teacher_logits.float(), dim=-1),
                        reduction="batchmean", log_target=True)
    rows = max(1, KD_CHUNK_ELEMENTS // student_logits.shape[-1])
    return _ChunkedKL.apply(student_logits, teacher_logits, rows, 1 / student_logits.shape[0], compiled)


def compile_layers(models, **options):
    """torch.compile each decoder layer of the models in place (regional compilation: one graph serves every
    layer; state_dict keys unchanged). The quantizers take their branch-free formula (utils_quant) and the compiler
    fuses the layer's element-wise work; --compile_layers (off by default: the first steps compile, and under bf16
    autocast a fused kernel rounds to bf16 once where eager rounds after every op, so the quantizers see other
    inputs; TORCHINDUCTOR_EMULATE_PRECISION_CASTS=1 keeps eager's roundings: the student's logits bit for bit,
    ~15% slower)."""
    from models.quant_model import decoder_layers
    for model in models:
        if model is not None:
            for layer in decoder_layers(model):
                layer.compile(**options)


class KDTrainer(CpuFsdpMixin, Trainer):
    """Trainer whose training loss is kd_loss_scale * KL(teacher || student).

    The teacher is held beside the model: never in the optimizer, never saved. Under FSDP it is sharded
    like the student (shard_teacher, default) so each GPU keeps 1/N of it; otherwise (shard_teacher=False,
    as the original) every GPU holds a full copy. Without a teacher (--use_kd False) the model's own
    next-token loss is used.
    Evaluation always reports the next-token loss, so eval_loss gives perplexity.
    """

    def __init__(self, *args, teacher=None, kd_loss_scale=1.0, shard_teacher=True, w_range_lr=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_loss_scale = kd_loss_scale
        self.w_range_lr = w_range_lr
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            if not (shard_teacher and shard_frozen(teacher, self.accelerator)):
                teacher.to(self.args.device)
            self.loss_is_scaled_for_ga = False  # kd_loss is a per-batch value: let the Trainer divide by GA steps
        if not self.args.do_train and shard_frozen(self.model, self.accelerator):
            # evaluation alone: the Trainer would prepare() the model without an optimizer, which FSDP2 refuses;
            # shard it here like the teacher and register it as prepared
            register_prepared(self.accelerator, self.model)
        self.add_callback(ShardReport(teacher))
        self.compile_layers = getattr(self.args, "compile_layers", False)
        if self.compile_layers:
            compile_layers([self.model, teacher], backend=self.args.torch_compile_backend or "inductor",
                           mode=self.args.torch_compile_mode)

    def create_optimizer(self, model=None):
        """The stock optimizer, with the learned weight ranges (lsq / seq) in a group of their own: lr w_range_lr
        (None: the weights' learning rate), no weight decay (it would shrink the grids). The LR schedule scales
        every group alike."""
        optimizer = super().create_optimizer(model)
        if (optimizer.state or any(group.get("llmqat_weight_ranges") for group in optimizer.param_groups)):
            return optimizer  # built before (or already stepped): leave it
        ranges = {id(p) for n, p in (model or self.model).named_parameters() if n.endswith("weight_range")}
        moved = []
        for group in optimizer.param_groups:
            moved += [p for p in group["params"] if id(p) in ranges]
            group["params"] = [p for p in group["params"] if id(p) not in ranges]
        if moved:
            lr = self.args.learning_rate if self.w_range_lr is None else self.w_range_lr
            optimizer.add_param_group({"params": moved, "lr": lr, "weight_decay": 0.0, "llmqat_weight_ranges": True})
        return optimizer

    def autocast_smart_context_manager(self, cache_enabled=True):
        """bf16 autocast with --bf16 or --precision original, the same under FSDP as in one process."""
        return precision.autocast(self.args)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # no next-token loss (KD only), no KV cache (training never reads it back; a compiled layer would recompile)
        inputs = {**{k: v for k, v in inputs.items() if k != "labels"}, "use_cache": False}
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        outputs = model(**inputs)
        loss = self.kd_loss_scale * kd_loss(outputs.logits, teacher_logits, compiled=self.compile_layers)
        return (loss, outputs) if return_outputs else loss
