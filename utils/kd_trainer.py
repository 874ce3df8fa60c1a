"""Knowledge distillation from the frozen full-precision teacher, on the stock Trainer API."""
import torch
import torch.nn.functional as F
from transformers import Trainer

from utils.fsdp import CpuFsdpMixin, ShardReport


def kd_loss(student_logits, teacher_logits):
    """KL(softmax(teacher) || softmax(student)) over the vocabulary, no temperature, computed in fp32.

    reduction="batchmean" on [batch, seq, vocab]: summed over tokens and divided by the batch size,
    exactly as the original code (so the scale grows with the sequence length)."""
    return F.kl_div(F.log_softmax(student_logits.float(), dim=-1), F.log_softmax(teacher_logits.float(), dim=-1),
                    reduction="batchmean", log_target=True)


class KDTrainer(CpuFsdpMixin, Trainer):
    """Trainer whose training loss is kd_loss_scale * KL(teacher || student).

    The teacher is a plain module held beside the model: never wrapped by FSDP/DDP, never in the
    optimizer, never saved. Without a teacher (--use_kd False) the model's own next-token loss is used.
    Evaluation always reports the next-token loss, so eval_loss gives perplexity.
    """

    def __init__(self, *args, teacher=None, kd_loss_scale=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(ShardReport())
        self.kd_loss_scale = kd_loss_scale
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False).to(self.args.device)
            self.loss_is_scaled_for_ga = False  # kd_loss is a per-batch value: let the Trainer divide by GA steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = {k: v for k, v in inputs.items() if k != "labels"}  # no next-token loss: KD only
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        outputs = model(**inputs)
        loss = self.kd_loss_scale * kd_loss(outputs.logits, teacher_logits)
        return (loss, outputs) if return_outputs else loss
