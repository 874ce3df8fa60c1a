"""LLM-QAT training: FP teacher -> fake-quantized student, distilled on the training blocks."""
import json
import logging
import math
import os
import shutil

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint

from models.quant_model import load_model
from utils.data import load_blocks
from utils.errors import InputError
from utils.fsdp import weights_from_rank0
from utils.io import atomic_write, commit_dir
from utils.kd_trainer import KDTrainer
from utils.model_zoo import resolve_model

logger = logging.getLogger("llm_qat")


def setup_logging(training_args):
    level = logging.INFO if training_args.process_index == 0 else logging.WARNING
    if training_args.log_level != "passive":  # --log_level warning: a quiet run (reproduce_tiny.sh)
        level = training_args.get_process_log_level()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level)
    transformers.utils.logging.set_verbosity(level)


def check_inputs(model_args, training_args, final_dir):
    """Fail before any work: bad bits, missing model, or a saved model that would be overwritten."""
    model_args.quant_setting()
    if not os.path.isfile(os.path.join(model_args.input_model_filename, "config.json")):
        raise InputError(f"--input_model_filename {model_args.input_model_filename!r}: "
                         "not a local Hugging Face model directory (no config.json)")
    if training_args.do_train and os.path.exists(final_dir):
        raise InputError(f"{final_dir} exists; remove it or pass another --output_model_filename")


def block_sizes(model_max_length, config):
    """Training blocks of model_max_length, capped by the model's context; eval blocks of at most 1024."""
    limit = getattr(config, "max_position_embeddings", model_max_length)
    train = min(model_max_length, limit)
    if train < model_max_length:
        logger.info("model_max_length %d > the model's context %d: using blocks of %d", model_max_length, limit, train)
    return train, min(train, 1024)


def run(model_args, data_args, training_args, callbacks=None):
    setup_logging(training_args)
    model_args.input_model_filename = resolve_model(model_args.input_model_filename)
    final_dir = os.path.join(model_args.local_dir, "models", model_args.output_model_filename)
    check_inputs(model_args, training_args, final_dir)
    path = model_args.input_model_filename
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_len, eval_len = block_sizes(training_args.model_max_length, config)
    train_data = eval_data = None
    if training_args.do_train:
        train_data = load_blocks(data_args.train_data_local_path, tokenizer, train_len,
                                 data_args.max_train_samples, "train")
    if training_args.do_eval:
        eval_data = load_blocks(data_args.eval_data_local_path, tokenizer, eval_len, data_args.max_eval_samples, "eval")
    if not data_args.shuffle:
        training_args.train_sampling_strategy = "sequential"

    compute_dtype = torch.bfloat16 if training_args.bf16 else torch.float32
    empty = weights_from_rank0(training_args)  # this rank gets its weights from rank 0 while FSDP shards
    if empty:
        logger.warning("rank %d: building the models without weights; rank 0 broadcasts them",
                       training_args.process_index)
    student = load_model(path, dtype=getattr(torch, model_args.load_dtype), empty=empty)
    if model_args.qat:
        model_args.quant_setting().apply(student)
    teacher = None
    if model_args.use_kd and training_args.do_train:
        teacher = load_model(path, dtype=compute_dtype, empty=empty and model_args.shard_teacher)
    logger.info("student: %s", student)

    trainer = KDTrainer(model=student, teacher=teacher, kd_loss_scale=model_args.kd_loss_scale,
                        shard_teacher=model_args.shard_teacher, args=training_args,
                        train_dataset=train_data, eval_dataset=eval_data, callbacks=callbacks)

    if training_args.do_train:
        resume = training_args.resume_from_checkpoint
        if resume is None and os.path.isdir(training_args.output_dir):
            resume = last_complete_checkpoint(training_args.output_dir)
            if resume:
                logger.info("resuming from %s", resume)
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.log_metrics("train", result.metrics)
        save_student(trainer, tokenizer, final_dir)

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["perplexity"] = math.exp(metrics["eval_loss"])
        metrics["eval_blocks"], metrics["eval_block_len"] = len(eval_data), eval_len
        trainer.log_metrics("eval", metrics)
        if trainer.is_world_process_zero() and os.path.isdir(final_dir):
            with atomic_write(os.path.join(final_dir, "eval_results.json")) as f:
                json.dump(metrics, f, indent=2)
        logger.info("perplexity %.4f on %s (%d blocks of %d tokens)", metrics["perplexity"],
                    data_args.eval_data_local_path, len(eval_data), eval_len)
    return trainer


def last_complete_checkpoint(output_dir):
    """The newest checkpoint-N that was written to the end (trainer_state.json, the Trainer's last file, and
    the model), or None. A torn newer one (a run killed while saving) is named and moved aside, not deleted."""
    while (path := get_last_checkpoint(output_dir)) is not None:
        files = set(os.listdir(path))
        if "trainer_state.json" in files and ({"model.safetensors", "pytorch_model.bin"} & files
                                               or any(f.startswith("pytorch_model_fsdp") for f in files)):
            return path
        aside = os.path.join(output_dir, "torn-" + os.path.basename(path))
        logger.warning("%s is incomplete (killed while saving?): moved to %s; resuming from the one before",
                       path, aside)
        if os.path.exists(aside):
            shutil.rmtree(aside)
        os.replace(path, aside)
    return None


def drop_tied_copy(model_dir, config):
    """FSDP's gathered state dict holds tied embeddings twice (lm_head.weight beside embed_tokens): keep one,
    as save_pretrained does without FSDP, so the file has the model's size and reloads tied."""
    path = os.path.join(model_dir, "model.safetensors")
    if not (config.get_text_config().tie_word_embeddings and os.path.isfile(path)):
        return
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(path, "pt") as f:
        keys, metadata = list(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    head = next((k for k in keys if k.endswith("lm_head.weight")), None)
    embed = next((k for k in keys if k.endswith("embed_tokens.weight")), None)
    if head and embed and torch.equal(tensors[head], tensors[embed]):
        del tensors[head]
        save_file(tensors, path, metadata=metadata)


def save_student(trainer, tokenizer, final_dir):
    """Save the student (safetensors, config with w/a/kv bits, tokenizer) atomically: every rank takes part in
    the save into one hidden temporary directory (the same name on all ranks), rank 0 commits it by a rename."""
    parent, name = os.path.split(os.path.abspath(final_dir))
    tmp_dir = os.path.join(parent, f".{name}.tmp-save")
    if trainer.is_world_process_zero() and os.path.exists(tmp_dir):
        shutil.rmtree(tmp_dir)  # left by a run killed while saving
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True  # the Trainer turned it off
    trainer.save_model(tmp_dir)  # every rank takes part: FSDP gathers the full state dict
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(tmp_dir)
        drop_tied_copy(tmp_dir, trainer.accelerator.unwrap_model(trainer.model).config)
        commit_dir(tmp_dir, final_dir)
        logger.info("saved the student to %s", final_dir)
    trainer.accelerator.wait_for_everyone()
