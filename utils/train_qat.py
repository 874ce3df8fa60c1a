"""LLM-QAT training: FP teacher -> fake-quantized student, distilled on the training blocks."""
import hashlib
import json
import logging
import math
import os
import shutil

import torch
import transformers
from transformers import AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint

from models.quant_model import load_model, read_config
from utils import precision
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
    # the Trainer's INFO lines stay; the config dump of every from_pretrained (4 per run) does not
    for name in ("configuration_utils", "modeling_utils", "generation.configuration_utils", "tokenization_utils_base"):
        transformers.utils.logging.get_logger(f"transformers.{name}").setLevel(max(level, logging.WARNING))


def check_inputs(model_args, training_args, final_dir):
    """Fail before any work: bad bits, or a saved model that would be overwritten (the model: resolve_model).
    Returns the student's QuantSetting."""
    setting = model_args.quant_setting()
    if training_args.do_train and os.path.exists(final_dir):
        raise InputError(f"{final_dir} exists; remove it or pass another --output_model_filename")
    return setting


def block_sizes(model_max_length, config):
    """Training blocks of model_max_length, capped by the model's context; eval blocks of at most 1024."""
    if model_max_length < 2:
        raise InputError(f"--model_max_length {model_max_length}: must be >= 2 (tokens per training block)")
    limit = getattr(config, "max_position_embeddings", model_max_length)
    train = min(model_max_length, limit)
    if train < model_max_length:
        logger.info("model_max_length %d > the model's context %d: using blocks of %d", model_max_length, limit, train)
    return train, min(train, 1024)


def run(model_args, data_args, training_args, callbacks=None):
    setup_logging(training_args)
    model_args.input_model_filename = resolve_model(model_args.input_model_filename, "--input_model_filename")
    final_dir = os.path.join(model_args.local_dir, "models", model_args.output_model_filename)
    setting = check_inputs(model_args, training_args, final_dir)
    path = model_args.input_model_filename
    config = read_config(path)
    tokenizer = AutoTokenizer.from_pretrained(path, config=config)  # config.json read once, above
    train_len, eval_len = block_sizes(training_args.model_max_length, config)
    train_data = eval_data = None
    if training_args.do_train:
        train_data = load_blocks(data_args.train_data_local_path, tokenizer, train_len,
                                 data_args.max_train_samples, "train")
    if training_args.do_eval:
        eval_data = load_blocks(data_args.eval_data_local_path, tokenizer, eval_len, data_args.max_eval_samples, "eval")
    if not data_args.shuffle:
        training_args.train_sampling_strategy = "sequential"

    empty = weights_from_rank0(training_args)  # this rank gets its weights from rank 0 while FSDP shards
    if empty:
        logger.warning("rank %d: building the models without weights; rank 0 broadcasts them",
                       training_args.process_index)
    # one precision policy for every launch (utils/precision.py)
    student = load_model(path, dtype=getattr(torch, model_args.load_dtype), empty=empty, config=config,
                         **precision.model_kwargs(training_args))
    if model_args.qat:
        setting.apply(student, init_scales=not empty)
    teacher = None
    if model_args.use_kd and training_args.do_train:
        teacher = load_model(path, dtype=precision.teacher_dtype(training_args),
                             empty=empty and model_args.shard_teacher, config=config,
                             **precision.model_kwargs(training_args))
    logger.info("student: %s", student)

    trainer = KDTrainer(model=student, teacher=teacher, kd_loss_scale=model_args.kd_loss_scale,
                        shard_teacher=model_args.shard_teacher, w_range_lr=training_args.w_range_lr, args=training_args,
                        train_dataset=train_data, eval_dataset=eval_data, callbacks=callbacks)

    if training_args.do_train:
        identity = run_identity(setting, model_args, data_args, training_args, train_data)
        with training_args.main_process_first(desc="choosing the checkpoint to resume"):
            resume = choose_resume(training_args, identity)  # rank 0 first: every rank then sees the same files
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.log_metrics("train", result.metrics)
        save_student(trainer, tokenizer, final_dir, teacher=path)

    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["perplexity"] = math.exp(metrics["eval_loss"])
        metrics["eval_blocks"], metrics["eval_block_len"] = len(eval_data), eval_len
        trainer.log_metrics("eval", metrics)
        # beside the student this run trained; an evaluation alone (--do_train False) never overwrites a trained
        # model's results: it writes into its own output_dir
        where = final_dir if training_args.do_train else training_args.output_dir
        if trainer.is_world_process_zero():
            with atomic_write(os.path.join(where, "eval_results.json")) as f:
                json.dump(metrics, f, indent=2)
        logger.info("perplexity %.4f on %s (%d blocks of %d tokens)", metrics["perplexity"],
                    data_args.eval_data_local_path, len(eval_data), eval_len)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # torchrun's ranks: a process group left to interpreter exit can abort a finished rank at teardown
        # ("terminate called without an active exception", seen once under load after a complete run)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return trainer


RUN_FILE = "llmqat_run.json"  # in output_dir: the identity of the run its checkpoints belong to


def run_identity(setting, model_args, data_args, training_args, train_data):
    """What makes a run this run: the model, the training blocks, the setting and the recipe. A checkpoint is
    resumed only by a run of the same identity."""
    a = training_args
    return {"model": os.path.abspath(model_args.input_model_filename), "qat": model_args.qat,
            "setting": setting.name + ("-post-rope" if setting.kv_post_rope else ""),
            "use_kd": model_args.use_kd, "kd_loss_scale": model_args.kd_loss_scale, "load_dtype": model_args.load_dtype,
            "train_blocks": [len(train_data), train_data.blocks.shape[1],
                             hashlib.sha256(train_data.blocks.numpy().tobytes()).hexdigest()[:16]],
            "shuffle": data_args.shuffle, "seed": a.seed, "learning_rate": a.learning_rate,
            "lr_scheduler_type": str(a.lr_scheduler_type), "warmup_steps": a.warmup_steps,
            "weight_decay": a.weight_decay, "num_train_epochs": a.num_train_epochs, "max_steps": a.max_steps,
            "global_batch": a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size,
            "optim": str(a.optim), "bf16": a.bf16,
            **({"precision": a.precision} if a.precision != "default" else {}),  # default: as recorded before it
            **({"w_range_lr": a.w_range_lr} if setting.w_quantizer != "absmax" else {})}


def choose_resume(training_args, identity):
    """The checkpoint to resume: --resume_from_checkpoint, else the newest complete one in output_dir if it was
    written by a run of this identity (a different run's is refused with one line); None: start fresh and
    record this run's identity."""
    out = training_args.output_dir
    record = os.path.join(out, RUN_FILE)
    resume = training_args.resume_from_checkpoint
    if resume is None and os.path.isdir(out):
        resume = last_complete_checkpoint(out)
        if resume:
            old = None
            if os.path.isfile(record):
                with open(record, encoding="utf-8") as f:
                    old = json.load(f)
            if old != identity:
                diff = sorted(k for k in identity if old is None or old.get(k) != identity[k])
                what = "an unrecorded run" if old is None else f"another run ({', '.join(diff)} differ)"
                raise InputError(f"{resume} was written by {what}; not resuming it. Start fresh: remove {out}, or "
                                 "pass another --output_model_filename / --output_dir")
            logger.info("resuming from %s", resume)
    if not resume and training_args.process_index == 0:
        with atomic_write(record) as f:
            json.dump(identity, f, indent=1)
    return resume


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


def save_student(trainer, tokenizer, final_dir, teacher):
    """Save the student (safetensors, config with w/a/kv bits, tokenizer) atomically: every rank takes part in
    the save into one hidden temporary directory (the same name on all ranks), rank 0 commits it by a rename."""
    parent, name = os.path.split(os.path.abspath(final_dir))
    tmp_dir = os.path.join(parent, f".{name}.tmp-save")
    if trainer.is_world_process_zero() and os.path.exists(tmp_dir):
        shutil.rmtree(tmp_dir)  # left by a run killed while saving
    trainer.accelerator.wait_for_everyone()
    config = trainer.accelerator.unwrap_model(trainer.model).config
    config.use_cache = True  # the Trainer turned it off
    config.llmqat_teacher = os.path.abspath(teacher)  # where the student came from (eval.py's default text)
    trainer.save_model(tmp_dir)  # every rank takes part: FSDP gathers the full state dict
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(tmp_dir)
        drop_tied_copy(tmp_dir, trainer.accelerator.unwrap_model(trainer.model).config)
        commit_dir(tmp_dir, final_dir)
        logger.info("saved the student to %s", final_dir)
    trainer.accelerator.wait_for_everyone()
