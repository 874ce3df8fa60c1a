"""reproduce_tiny.sh: the paper's table at small scale, on the embedded model (--model tiny, default) or on
the real SmolLM2-135M (--model smollm2; results/smollm2_table.*).

Rows: FP; RTN (the same quantizers, no training); SmoothQuant (alpha 0.5) and GPTQ weights, both
calibrated on the generated text, then the same quantizers, no training; LLM-QAT (KD on the model's own
greedy-then-sampled text); QAT-real (KD on the same number of tokens of the real text the model was
pretrained on) at W-A-KV 4-8-4, 4-8-8, 4-16-16, 8-8-4, 8-8-8; and at 4-8-4 the generation ablation: pure
sampling and pure greedy instead of the hybrid. Every trained row sees exactly the same number of tokens, so
LLM-QAT vs QAT-real is the paper's generated-vs-real ablation. Each row is held-out perplexity on
three plays the model never saw plus zero-shot accuracy on the local shakespeare_nextline task.

Every finished step is kept under --work_dir (generated shards, students, one json per row), so a
rerun resumes; the table, its json and a plot go to --out_dir. SmolLM2 rows train with checkpoints every
save_steps (a row killed mid-training continues from its last complete checkpoint), and every finished row's
json is also kept in --out_dir/<table>_rows/, so a run finished over several sessions (fresh work
directories) keeps what earlier ones computed.
"""
import argparse
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from utils.data import read_texts, write_texts
from utils.errors import InputError
from models.baselines import BASELINES
from models.quant_model import QuantSetting
from utils.constants import EMBEDDED_EVAL, EMBEDDED_MODEL, REPO
from utils.evaluate import evaluate, write_json

BITS = ("4-8-4", "4-8-8", "4-16-16", "8-8-4", "8-8-8")
DATA = REPO / "assets" / "data"
REAL_TEXT = str(DATA / "shakespeare_train.jsonl")
MODERN_TEXT = str(DATA / "handbook_train.jsonl")  # tools/get_modern_text.py: the handbook's training chapters
TASK = "shakespeare_nextline"
MODERN_TASK = "pydocs_nextsentence"


class Row(NamedTuple):
    """One row of the table: method, W-A-KV label, training data (None: training-free; "calib": calibrated on the
    generated text; else a generation mode or a key of Profile.real_texts), and the seed of its data order and
    samples (0: the table's row; others: the replicas that measure how much a rerun moves it)."""
    method: str
    bits: str
    data: str = None
    seed: int = 0

    @property
    def setting(self):
        return QuantSetting.parse(self.bits)

    @property
    def learned(self):
        """LLM-QAT with learned weight scales (bits ending -lsq / -seq)."""
        return self.setting.w_quantizer != "absmax"

    @property
    def slug(self):
        name = self.method.replace(" ", "_").replace("(", "").replace(")", "")
        return f"{name}_{self.bits}" + (f"_seed{self.seed}" if self.seed else "")


@dataclass(frozen=True)
class Profile:
    """One model's reproduction: which rows, which texts, and the full / quick settings."""
    model: str  # a path or a packaged model's name (utils.model_zoo)
    table: str  # output file stem
    title: str
    bits: tuple
    ppl_texts: dict  # name -> jsonl; the first is the table's "Held-out ppl" column
    settings: dict  # "full" / "quick" -> dict (see SETTINGS)
    # generation modes: greedy prefix lengths (start id included) per start id; None: max_length (never samples)
    generation: dict = field(default_factory=lambda: {"hybrid": (3,), "sampling": (1,), "greedy": (None,)})
    gen_dtype: str = "float32"
    train_bf16: bool = False  # bf16 autocast with fp32 master weights (CPUs with native bf16)
    eval_dtype: str = "float32"
    tasks: tuple = (TASK,)  # zero-shot tasks; the first is the table's "acc"
    real_texts: dict = field(default_factory=lambda: {"real": REAL_TEXT})  # QAT-real's training texts by data key
    modern_bits: tuple = ()  # the settings of QAT-real (modern)
    seeds: tuple = (0,)  # every seed of the seeded rows at 4-8-4
    seeded: tuple = ()  # the methods rerun with every seed
    low_bits: tuple = ()  # below 4 bits (issue 24): RTN, GPTQ and LLM-QAT with the paper's weight quantizer
    learned_bits: tuple = ()  # LLM-QAT with learned weight scales (lsq) at these settings
    per_text: bool = True  # rows keep ppl_by_text / acc_by_task / cpu, and are kept in <out_dir>/<table>_rows


TINY = Profile(
    EMBEDDED_MODEL, "tiny_table", "the embedded 4M-parameter LLaMA", BITS, {"shakespeare_eval": EMBEDDED_EVAL}, {
        # start ids: range(*start_ids) for every mode. Zero-shot: lm-eval's HFLM, one whole sequence per choice, as
        # every committed row was scored (a quantized model's scores move with any change of rounding, so one table
        # keeps one scorer); shared_context: utils/shared_context.py (each context once)
        "full": dict(start_ids=(0, 2048), gen_length=256, blocks=1536, epochs=1, lr=2e-5, eval_windows=None,
                     limit=None),
        "quick": dict(start_ids=(320, 384), gen_length=128, blocks=24, epochs=3, lr=2e-5, eval_windows=48, limit=30,
                      shared_context=True),
    }, eval_dtype="auto", per_text=False)
SMOLLM2 = Profile(
    "smollm2", "smollm2_table", "SmolLM2-135M (a real pretrained LLaMA)", ("4-8-4", "4-8-8", "4-16-16", "8-8-8"),
    {"shakespeare_eval": EMBEDDED_EVAL, "milton_areopagitica": str(DATA / "milton_areopagitica.jsonl"),
     "handbook_heldout": str(DATA / "handbook_heldout.jsonl"), "pydocs_heldout": str(DATA / "pydocs_heldout.jsonl")},
    {
        # start ids: range(*start_ids) for the hybrid (3 sequences per id: j = 3, 4, 5), range(*ablation_ids)
        # for the one-sequence-per-id ablations, so every corpus has about the same number of sequences
        "full": dict(start_ids=(0, 49152, 96), ablation_ids=(0, 49152, 32), gen_length=256, blocks=600, epochs=1,
                     lr=None, tune_blocks=120, lr_candidates=(2e-5, 1e-4, 3e-4), eval_windows=64, limit=200,
                     save_steps=50),
        "quick": dict(start_ids=(0, 49152, 1536), ablation_ids=(0, 49152, 512), gen_length=64, blocks=8, epochs=1,
                      lr=None, tune_blocks=4, lr_candidates=(2e-5, 1e-4), eval_windows=4, limit=8, save_steps=4,
                      shared_context=True),
    },
    generation={"hybrid": (3, 4, 5), "sampling": (1,), "greedy": (None,)},
    gen_dtype="bfloat16", train_bf16=True, eval_dtype="float32", tasks=(TASK, MODERN_TASK),
    real_texts={"real": REAL_TEXT, "real_modern": MODERN_TEXT}, modern_bits=("4-8-4", "4-8-8", "4-16-16", "8-8-8"),
    seeds=(0, 1, 2), seeded=("LLM-QAT", "QAT-real (modern)", "QAT-real"), low_bits=("3-16-16", "3-8-8", "2-16-16"),
    learned_bits=("4-8-4-lsq", "3-16-16-lsq", "3-8-8-lsq", "2-16-16-lsq"))
PROFILES = {"tiny": TINY, "smollm2": SMOLLM2}
SETTINGS = TINY.settings


def rows_to_run(profile=TINY):
    """Every Row, in table order: the table's rows (seed 0), then the seeded replicas."""
    bits = profile.bits
    rows = [Row("FP", "32-32-32")] + [Row("RTN", b) for b in bits]
    rows += [Row("SmoothQuant", b, "calib") for b in bits] + [Row("GPTQ", b, "calib") for b in bits]
    rows += [Row("LLM-QAT", b, "hybrid") for b in bits] + [Row("QAT-real", b, "real") for b in bits]
    rows += [Row("QAT-real (modern)", b, "real_modern") for b in profile.modern_bits]
    rows += [Row("LLM-QAT (pure sampling)", "4-8-4", "sampling"), Row("LLM-QAT (pure greedy)", "4-8-4", "greedy")]
    first = {r.method: r for r in rows if r.bits == "4-8-4"}
    rows += [first[m]._replace(seed=k) for k in profile.seeds[1:] for m in profile.seeded]
    for b in profile.low_bits:  # GPTQ where its grid stays put when re-quantized (not the 2-bit 2 mean|w| grid)
        gptq = [Row("GPTQ", b, "calib")] if QuantSetting.parse(b).w_bits in BASELINES["GPTQ"].w_bits else []
        rows += [Row("RTN", b), *gptq, Row("LLM-QAT", b, "hybrid")]
    rows += [Row("LLM-QAT", b, "hybrid") for b in profile.learned_bits]
    return rows


HEADLINE = ("FP", "RTN", "LLM-QAT", "QAT-real (modern)", "QAT-real", "GPTQ", "SmoothQuant")


def run_order(rows):
    """The order rows are computed in: the 4-8-4 comparison first, FP, RTN and LLM-QAT leading (a run cut short
    still has the headline), then the seeded replicas, the ablations, then the other settings in table order."""
    def key(row):
        if row.method == "FP" or (row.bits == "4-8-4" and row.method in HEADLINE and not row.seed):
            return (0, HEADLINE.index(row.method))
        low = row.setting.w_bits < 4 or row.learned
        return (4 if low else 1 if row.seed else 2 if row.bits == "4-8-4" else 3, rows.index(row))
    return sorted(rows, key=key)


def slug(method, bits, seed=0):
    return Row(method, bits, seed=seed).slug


def generated_text(mode, s, work, profile=TINY, seed=0):
    """Generate this mode's sequences (greedy prefix lengths per start id, sampled with seed), shuffled with the
    same seed into one training file (resumable: the shard completes, then the merge)."""
    from utils.generate import generate_shard
    from utils.merge import merge_shards
    tag = mode + (f"_seed{seed}" if seed else "")
    out = os.path.join(work, f"gen_{tag}.jsonl")
    if not os.path.exists(out):
        ids = range(*s["start_ids"] if mode == "hybrid" or "ablation_ids" not in s else s["ablation_ids"])
        gen_dir = os.path.join(work, f"gen_{tag}")
        prefixes = [j or s["gen_length"] for j in profile.generation[mode]]
        # the shard's file number is that of the original's n_vocab slicing (an earlier work dir resumes)
        shard = ids.start // len(ids) if ids.step == 1 else 0
        generate_shard(profile.model, ids, gen_dir, shard, prefixes, s["gen_length"], seed=seed,
                       dtype=profile.gen_dtype)
        merge_shards(gen_dir, out, shuffle=True, seed=seed)
    return out


def real_text(work, key="real", profile=TINY, seed=0):
    """A real text (Profile.real_texts[key]), shuffled with seed (so the first blocks sample all of it)."""
    out = os.path.join(work, key + (f"_seed{seed}" if seed else "") + ".jsonl")
    if not os.path.exists(out):
        texts = read_texts(profile.real_texts[key])
        random.Random(seed).shuffle(texts)
        write_texts(out, texts)
    return out


def model_name(method, bits, seed=0, lr=None, range_lr=None):
    """The trained student's directory name under <work>/models (and its checkpoints')."""
    return (slug(method, bits, seed) + ("" if lr is None else f"_lr{lr:g}")
            + ("" if range_lr is None else f"_rangelr{range_lr:g}"))


def train(method, bits, data, s, work, profile=TINY, lr=None, seed=0, range_lr=None):
    """LLM-QAT training through train.py's own code path; returns the student's directory and seconds.
    With save_steps, Trainer checkpoints go to <work>/checkpoints/<row> and a rerun resumes from the last one.
    The seed sets the Trainer's (data order)."""
    from utils.process_args import DataArguments, ModelArguments, TrainingArguments, complete_args
    from utils.train_qat import run
    name = model_name(method, bits, seed, lr, range_lr)
    model_dir = os.path.join(work, "models", name)
    if os.path.isdir(model_dir):
        return model_dir, None
    setting = QuantSetting.parse(bits)
    saving = dict(save_strategy="no")
    if s.get("save_steps"):
        saving = dict(save_strategy="steps", save_steps=s["save_steps"], save_total_limit=1)
    start = time.time()
    run(*complete_args(
        ModelArguments(input_model_filename=profile.model, output_model_filename=name, local_dir=work, qat=True,
                       w_bits=setting.w_bits, a_bits=setting.a_bits, kv_bits=setting.kv_bits, use_kd=True,
                       kd_loss_scale=1.0, w_quantizer=setting.w_quantizer, w_group_size=setting.w_group_size),
        DataArguments(train_data_local_path=data, max_train_samples=s["blocks"]),
        TrainingArguments(do_train=True, do_eval=False, model_max_length=256, per_device_train_batch_size=4,
                          num_train_epochs=s["epochs"], learning_rate=lr or s["lr"], lr_scheduler_type="cosine",
                          warmup_steps=0, weight_decay=0.0, seed=seed, logging_steps=10, report_to="none",
                          bf16=profile.train_bf16, log_level="warning", **saving,
                          **({"w_range_lr": range_lr or s.get("chosen_range_lr")} if setting.w_quantizer != "absmax"
                             else {}),
                          **({"max_steps": s["max_steps"]} if s.get("max_steps") else {}),  # past the data: repeats
                          **({} if torch.cuda.is_available() else dict(use_cpu=True, dataloader_pin_memory=False)))))
    shutil.rmtree(os.path.join(work, "checkpoints", name), ignore_errors=True)  # the student is saved: free the disk
    return model_dir, time.time() - start


def row_path(row, work):
    return os.path.join(work, "rows", row.slug + ".json")


def evaluate_row(model, s, profile, setting=None, baseline=None, calib_data=None, texts=None, tasks=None):
    """eval.py's evaluate() on a model: perplexity on each text and each zero-shot task (default: the profile's)."""
    texts = list(profile.ppl_texts) if texts is None else texts
    tasks = list(profile.tasks) if tasks is None else tasks
    return evaluate(model, setting, baseline, alpha=0.5 if baseline == "SmoothQuant" else None,
                    ppl_data=[profile.ppl_texts[t] for t in texts], seq_len=256, tasks=",".join(tasks) or None,
                    batch_size=8, dtype=profile.eval_dtype, shared_context=s.get("shared_context", False),
                    max_windows=s["eval_windows"] or None, limit=s["limit"] or None, calib_data=calib_data)


def saved_row(row, work, keep_dir=None):
    """A row finished before: under the work directory, or kept in keep_dir by an earlier session; else None."""
    path = row_path(row, work)
    for p in (path, keep_dir and os.path.join(keep_dir, os.path.basename(path))):
        if p and os.path.exists(p):
            with open(p) as f:
                return json.load(f)
    return None


def missing(saved, profile):
    """(texts, tasks) of the profile a saved row was not scored on (rows from before a text or task was added)."""
    texts = saved.get("ppl_by_text") or {next(iter(profile.ppl_texts)): saved["ppl"]}
    accs = saved.get("acc_by_task") or {profile.tasks[0]: saved["acc"]}
    return [t for t in profile.ppl_texts if t not in texts], [t for t in profile.tasks if t not in accs]


def training_text(row, s, work, profile):
    if row.data in profile.real_texts:
        return real_text(work, row.data, profile, row.seed)
    return generated_text(row.data, s, work, profile, row.seed)


def cpu_name():
    """The CPU a row was computed on (fp32 matmuls that round differently between CPUs move A8/KV4 rows)."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), None)
    except OSError:
        name = None
    return f"{name or 'unknown CPU'}, {torch.get_num_threads()} threads"


DATA_LABEL = {None: "none", "real": "real text", "real_modern": "real text (modern)",
              "calib": "calibration: generated (hybrid)"}


def scores(r, profile):
    """ppl_by_text and acc_by_task of an evaluate() result, rounded."""
    return ({name: round(v["ppl"], 4) for name, v in r["ppl"].items()},
            {name: round(v["acc"], 4) for name, v in r["tasks"].items()})


def row_result(row, s, work, profile=TINY, keep_dir=None):
    """A row's json: computed, or saved before; a saved row lacking a text or task of the profile is scored on
    those (a trained row's student is trained again if it is gone, and the new run replaces the row whole)."""
    path = row_path(row, work)
    kept = None if keep_dir is None else os.path.join(keep_dir, os.path.basename(path))
    setting = None if row.method == "FP" else row.setting
    baseline = None if row.method == "FP" else row.method
    student = os.path.join(work, "models", model_name(row.method, row.bits, row.seed, s.get("chosen_lr")))

    def calib():  # generated only when a calibrated row is computed (a saved row needs none)
        return [generated_text("hybrid", s, work, profile)] if row.data == "calib" else None

    if (saved := saved_row(row, work, keep_dir)) is not None:
        texts, tasks = missing(saved, profile)
        if not texts and not tasks:
            return saved
        if row.data in (None, "calib") or os.path.isdir(student):
            args = (student, s, profile) if row.data not in (None, "calib") else (profile.model, s, profile, setting,
                                                                                   baseline, calib())
            by_text, by_task = scores(evaluate_row(*args, texts=texts, tasks=tasks), profile)
            saved["ppl_by_text"] = {**saved.get("ppl_by_text", {}), **by_text}
            saved["acc_by_task"] = {**saved.get("acc_by_task", {profile.tasks[0]: saved["acc"]}), **by_task}
            saved["scored_later"] = sorted({*saved.get("scored_later", ()), *texts, *tasks, "cpu: " + cpu_name()})
            for p in filter(None, (path, kept)):
                write_json(p, saved)
            return saved
    train_seconds = None
    if row.data in (None, "calib"):  # the training-free rows; calibrated on the generated text LLM-QAT trains on
        r = evaluate_row(profile.model, s, profile, setting, baseline, calib())
    else:
        model, train_seconds = train(row.method, row.bits, training_text(row, s, work, profile), s, work, profile,
                                     s.get("chosen_lr"), row.seed)
        r = evaluate_row(model, s, profile)
    first = next(iter(profile.ppl_texts))
    ppl, task = r["ppl"][first], r["tasks"][profile.tasks[0]]
    out = {"method": row.method, "bits": row.bits, "ppl": round(ppl["ppl"], 4), "acc": round(task["acc"], 4),
           "acc_norm": None if task.get("acc_norm") is None else round(task["acc_norm"], 4),
           "data": DATA_LABEL.get(row.data, f"generated ({row.data})"),
           "train_tokens": None if row.data in (None, "calib") else s["blocks"] * 256 * s["epochs"],
           "train_seconds": None if train_seconds is None else round(train_seconds, 1),
           "eval_windows": ppl["windows"], "task_docs": task["n"]}
    if row.seed:
        out["seed"] = row.seed
    if row.learned:
        out["w_range_lr"] = s.get("chosen_range_lr")
    if profile.per_text:
        out["ppl_by_text"], out["acc_by_task"] = scores(r, profile)
        out["cpu"] = cpu_name()
    for p in filter(None, (path, kept)):
        write_json(p, out)
    return out


def tune(s, work, profile, keep_dir, key, bits, candidates, **fixed):
    """One training hyperparameter (key: lr or range_lr), chosen on the validation text (milton_valid) only: LLM-QAT
    at bits for tune_blocks blocks with each candidate; the lowest validation perplexity wins. Kept in
    <key>_choice.json beside the rows; a grid that grew trains only its new candidates."""
    path = os.path.join(keep_dir or os.path.join(work, "rows"), f"{key}_choice.json")
    choice = {"tried": {}}
    if os.path.exists(path):
        with open(path) as f:
            choice = json.load(f)
    tried = choice["tried"]
    todo = [value for value in candidates if f"{value:g}" not in tried]
    if not todo:
        return choice
    data = generated_text("hybrid", s, work, profile)
    short = {**s, "blocks": s["tune_blocks"], "save_steps": None}
    for value in todo:
        model, _ = train("tune_LLM-QAT", bits, data, short, work, profile, **{**fixed, key: value})
        r = evaluate(model, ppl_data=[str(DATA / "milton_valid.jsonl")], seq_len=256, dtype=profile.eval_dtype,
                     max_windows=s["eval_windows"] or None)
        tried[f"{value:g}"] = round(r["ppl"]["milton_valid"]["ppl"], 4)
        print(f"{key} {value:g}: milton_valid ppl {tried[f'{value:g}']} after {s['tune_blocks']} blocks ({bits})",
              flush=True)
    choice = {"tried": tried, "blocks": s["tune_blocks"], key: float(min(tried, key=tried.get)), "text": "milton_valid"}
    if bits != "4-8-4":
        choice["bits"] = bits
    write_json(path, choice)
    return choice


def choose_lr(s, work, profile, keep_dir):
    """The learning rate of every trained row: tuned at LLM-QAT 4-8-4."""
    return tune(s, work, profile, keep_dir, "lr", "4-8-4", s["lr_candidates"])


def choose_range_lr(s, work, profile, keep_dir):
    """The learned ranges' learning rate (--w_range_lr) of every learned-scale row: tuned at the first learned
    setting below 4 bits (the weights' learning rate fixed at the chosen one), candidates x0.01 to x10 of it (x0.01
    added after x0.1 won the first grid)."""
    bits = next(b for b in profile.learned_bits if QuantSetting.parse(b).w_bits < 4)
    return tune(s, work, profile, keep_dir, "range_lr", bits, [s["chosen_lr"] * f for f in (0.01, 0.1, 1, 10)],
                lr=s["chosen_lr"])


def select_rows(plan, spec):
    """The rows of the plan that --rows names (all without it); a name that matches none is one error line."""
    if spec is None:
        return set(plan)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    chosen = {r for r in plan if r.slug in names or r.method in names}
    unknown = [n for n in names if not any(n in (r.slug, r.method) for r in plan)]
    if unknown or not chosen:
        raise InputError(f"--rows {spec!r}: no row named {', '.join(unknown) or spec!r}; rows: "
                         + ", ".join(r.slug for r in plan))
    return chosen


def spread(rows, method, bits, text):
    """(mean, min, max, n) of a text's perplexity over the seeds of a row; None without one."""
    vals = [r["ppl_by_text"][text] for r in rows if r["method"] == method and r["bits"] == bits
            and text in r.get("ppl_by_text", {})]
    return None if not vals else (sum(vals) / len(vals), min(vals), max(vals), len(vals))


def compare(a, b):
    """'below' / 'above' / 'tie' for two spreads: a difference inside either's seed range is a tie."""
    if a is None or b is None:
        return None
    if a[3] == 1 and b[3] == 1:
        return "below" if a[0] < b[0] else "above"
    return "below" if a[2] < b[1] else "above" if a[1] > b[2] else "tie"


def recovery_range(rows, text):
    """(min, max, n) of the gap LLM-QAT 4-8-4 recovers on a text over its seeds (FP and RTN do not depend on one)."""
    def one(method):
        return next((r["ppl_by_text"].get(text) for r in rows if r["method"] == method and r["bits"] in
                     ("32-32-32", "4-8-4") and not r.get("seed") and "ppl_by_text" in r), None)
    fp, rtn = one("FP"), one("RTN")
    qat = [r["ppl_by_text"][text] for r in rows if r["method"] == "LLM-QAT" and r["bits"] == "4-8-4"
           and text in r.get("ppl_by_text", {})]
    if None in (fp, rtn) or not qat or rtn <= fp:
        return None
    got = [(rtn - q) / (rtn - fp) for q in qat]
    return min(got), max(got), len(got)


def targets(rows, profile=TINY):
    """The targets, measured on the rows there are: gap recovery at 4-8-4 (per text), LLM-QAT 8-8-8 against FP,
    LLM-QAT against GPTQ / SmoothQuant / QAT-real per setting, the generation ablation's order."""
    def ppl(method, bits, text=None):
        r = next((r for r in rows if r["method"] == method and r["bits"] == bits and not r.get("seed")), None)
        return None if r is None else r["ppl"] if text is None else r.get("ppl_by_text", {}).get(text)

    def recovery(text=None):
        fp, rtn, qat = ppl("FP", "32-32-32", text), ppl("RTN", "4-8-4", text), ppl("LLM-QAT", "4-8-4", text)
        return None if None in (fp, rtn, qat) or rtn <= fp else (rtn - qat) / (rtn - fp)

    fp, q8 = ppl("FP", "32-32-32"), ppl("LLM-QAT", "8-8-8")
    out = {"recovered_gap_4-8-4": recovery(), "llm_qat_8-8-8_over_fp": None if None in (fp, q8) else q8 / fp}
    if not profile.per_text:
        return out
    out["recovered_gap_4-8-4_by_text"] = {t: recovery(t) for t in profile.ppl_texts}
    for other in ("GPTQ", "SmoothQuant", "QAT-real", "QAT-real (modern)"):
        out[f"llm_qat_beats_{other}"] = {b: None if None in (ppl("LLM-QAT", b), ppl(other, b))
                                         else ppl("LLM-QAT", b) < ppl(other, b) for b in profile.bits}
    out["seeds_4-8-4"] = {m: {t: spread(rows, m, "4-8-4", t) for t in profile.ppl_texts} for m in profile.seeded}
    out["recovered_gap_4-8-4_seeds"] = {t: recovery_range(rows, t) for t in profile.ppl_texts}
    first = next(iter(profile.ppl_texts))
    out["ablation_vs_seeds"] = {m: compare(spread(rows, "LLM-QAT", "4-8-4", first), spread(rows, m, "4-8-4", first))
                                for m in ("LLM-QAT (pure sampling)", "LLM-QAT (pure greedy)")}
    out["llm_qat_vs_4-8-4"] = {other: {t: compare(spread(rows, "LLM-QAT", "4-8-4", t), spread(rows, other, "4-8-4", t))
                                       for t in profile.ppl_texts} for other in profile.seeded[1:]}
    order = [ppl("LLM-QAT", "4-8-4"), ppl("LLM-QAT (pure sampling)", "4-8-4"), ppl("LLM-QAT (pure greedy)", "4-8-4")]
    out["ablation_in_paper_order"] = None if None in order else order[0] <= order[1] <= order[2]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="reproduce_tiny.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PROFILES), default="tiny", help="tiny: the embedded model "
                   "(results/tiny_table.*); smollm2: SmolLM2-135M (results/smollm2_table.*; hours on 2 CPU cores)")
    p.add_argument("--quick", action="store_true", help="a few minutes, fewer steps and documents (CI)")
    p.add_argument("--out_dir", default=None, help="table, json and plot (default: results, results/quick)")
    p.add_argument("--work_dir", default=None, help="generated data, students, row results; a rerun resumes "
                   "(default: output/reproduce_<model>[_quick])")
    p.add_argument("--settings", default=None, help="JSON overriding settings of the mode, e.g. "
                   "'{\"blocks\": 400}' (recorded in the work directory's settings.json)")
    p.add_argument("--rows", default=None, help="compute only these rows: a comma list of row names "
                   "(LLM-QAT_4-8-4, LLM-QAT_4-8-4_seed1) or methods ('QAT-real (modern)'); the report shows every "
                   "finished row")
    p.add_argument("--report_only", action="store_true", help="write the table from the rows finished so far "
                   "(the others marked pending); computes nothing")
    args = p.parse_args(argv)
    profile = PROFILES[args.model]
    mode = "quick" if args.quick else "full"
    s = dict(profile.settings[mode])
    s.update(json.loads(args.settings or "{}"))
    out_dir = args.out_dir or str(REPO / "results" / ("quick" if args.quick else ""))
    default_work = f"reproduce_{args.model}{'_quick' if args.quick else ''}"
    work = os.path.abspath(args.work_dir or str(REPO / "output" / default_work))
    keep_dir = None if not profile.per_text else os.path.join(out_dir, f"{profile.table}_rows")
    os.makedirs(work, exist_ok=True)
    meta = {"mode": mode, **s} if not profile.per_text else {"model": args.model, "mode": mode, **s}
    for directory in filter(None, (work, keep_dir)):
        meta_path = os.path.join(directory, "settings.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                if json.load(f) != json.loads(json.dumps(meta)):
                    raise InputError(f"{directory} holds a run with other settings; remove it or pick another "
                                     "--work_dir / --out_dir")
        elif not args.report_only:
            write_json(meta_path, meta)
    plan, start = rows_to_run(profile), time.time()
    chosen = select_rows(plan, args.rows)
    results = {}
    for k, row in enumerate(run_order(plan), 1):
        saved = saved_row(row, work, keep_dir)
        if args.report_only or row not in chosen:
            if saved is not None:
                results[row] = saved
            continue
        done = saved is not None and missing(saved, profile) == ([], [])
        if not done and row.data not in (None, "calib") and s.get("lr") is None and "chosen_lr" not in s:
            choice = choose_lr(s, work, profile, keep_dir)  # before the first trained row
            s["chosen_lr"], s["lr_choice"] = choice["lr"], choice
            print(f"learning rate {choice['lr']:g} (milton_valid ppl {choice['tried']})", flush=True)
        if not done and row.learned and "chosen_range_lr" not in s:
            choice = choose_range_lr(s, work, profile, keep_dir)  # before the first learned-scale row
            s["chosen_range_lr"], s["range_lr_choice"] = choice["range_lr"], choice
            print(f"range learning rate {choice['range_lr']:g} (milton_valid ppl {choice['tried']})", flush=True)
        cached = " (done before)" if done else ""
        print(f"[{k}/{len(plan)}] {row.slug}{cached} ({time.time() - start:.0f} s so far)", flush=True)
        results[row] = row_result(row, s, work, profile, keep_dir)
    for key in ("lr", "range_lr"):  # the choices of earlier sessions, for the report
        choice_path = keep_dir and os.path.join(keep_dir, f"{key}_choice.json")
        if f"{key}_choice" not in s and choice_path and os.path.exists(choice_path):
            with open(choice_path) as f:
                s[f"{key}_choice"] = json.load(f)
            s[f"chosen_{key}"] = s[f"{key}_choice"][key]
    rows = [results[r] for r in plan if r in results]
    pending = [r for r in plan if r not in results]
    if not rows:  # a report of nothing would replace the committed table with an empty one
        raise InputError(f"no finished rows under {work}" + (f" or {keep_dir}" if keep_dir else "")
                         + "; nothing written (run the table, or pass the --work_dir of a run)")
    from utils.report import write_report
    write_report(rows, targets(rows, profile), mode, s, out_dir, profile, pending)
    print(f"{len(rows)} rows in {time.time() - start:.0f} s -> {out_dir}/{profile.table}.md, .json, .png"
          + (f" ({len(pending)} pending)" if pending else ""))
    return rows
