"""The GGUF export run in llama.cpp (llama-cpp-python), against the same checkpoint run by us.

    python tools/install_llama_cpp.py        # llama-cpp-python==0.3.36 built from source for this CPU: 7-30 min
    python benchmarks/llama_cpp_check.py --model output/models/W4A8KV4 [--fp_model assets/tiny_llama]

MODEL: a QAT checkpoint (train.py's output). It is exported with `export.py --format gguf`, the FP model
(--fp_model, default the checkpoint's teacher) is written as an F16 GGUF by the same writer, and both run in
llama.cpp. Reported: tokenization against the Hugging Face tokenizer on held-out lines; next-token logits on
a sample text against our model with the same weights and unquantized activations and KV cache (W-A16-KV16:
llama.cpp quantizes activations itself, to Q8_0 blocks, and keeps an f16 KV cache); perplexity over windows of
held-out text, fed the same token ids (target: within 1% of ours at W-A16-KV16); greedy tokens/s of the QAT
GGUF, the F16 GGUF and our PyTorch compressed-tensors export. The last line is `llama_cpp_check <json>`.
llama.cpp runs in a child process: if it crashes (a build for another CPU, AMX kernels), the check ends with one
`error: llama.cpp crashed (SIGSEGV) ...` line naming the likely cause and the fix.

Without llama-cpp-python it stops at once with one line (`error: ... needs llama-cpp-python ...`), unless
--ours_only: the parts that need no llama.cpp (the three exports, our W-A16-KV16 perplexity over the same
windows, our export's tokens/s), the same last line with those keys only (the suite runs `--quick --ours_only`).
"""
import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.export import export  # noqa: E402
from models.export_gguf import export_gguf  # noqa: E402
from models.gguf_writer import write_gguf  # noqa: E402
from models.quant_model import QuantSetting, load_model, read_config  # noqa: E402
from models.utils_quant import QuantizeLinear  # noqa: E402
from utils.constants import EMBEDDED_EVAL, EMBEDDED_MODEL  # noqa: E402
from utils.data import read_texts  # noqa: E402
from utils.child import run_in_child  # noqa: E402
from utils.errors import InputError, cli  # noqa: E402
from utils.model_zoo import resolve_model  # noqa: E402

SAMPLE = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."


def weights_only(model):
    """Our model with the QAT weights and float activations and KV cache (what llama.cpp is given)."""
    for m in model.modules():
        if isinstance(m, QuantizeLinear):
            m.a_bits = m.out_bits = 32
    return model


def llama(path, n_ctx, threads):
    from llama_cpp import Llama
    return Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 verbose=False)


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


def nll(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]), reduction="sum").item()


def windows(tokenizer, path, seq_len, n):
    ids = tokenizer("\n\n".join(read_texts(path))).input_ids
    return [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:n]


CRASH_HINT = ("a llama.cpp built for another CPU, or its AMX kernels (a native build segfaults on its first eval on "
              "the AMX Xeon); reinstall with python tools/install_llama_cpp.py, which picks portable flags for this "
              "CPU (docs/export.md)")


def cpp_measure(job):
    """Everything llama.cpp computes, run in a child process (utils.child: a crash there is one error line): the
    tokenization of held-out lines and of the sample, the sample's logits, the windows' summed NLL, and the greedy
    tokens/s of the QAT and F16 GGUFs."""
    llm = llama(job["qat_gguf"], job["n_ctx"], job["threads"])
    out = {"lines": [llm.tokenize(t.encode(), add_bos=job["add_bos"], special=False) for t in job["lines"]],
           "sample": llm.tokenize(SAMPLE.encode(), add_bos=job["add_bos"], special=False),
           "sample_logits": llama_logits(llm, job["sample"]).numpy(),
           "nll": sum(nll(llama_logits(llm, ids), ids) for ids in job["windows"])}

    def generate(model):
        def run(n):
            model.reset()
            for k, _ in enumerate(model.generate(job["prompt"], temp=0.0, top_k=1)):
                if k + 1 >= n:
                    break
        return run

    out["tok_s_gguf"] = tokens_per_second(generate(llm), job["new_tokens"])
    del llm
    out["tok_s_fp16_gguf"] = tokens_per_second(generate(llama(job["fp_gguf"], job["n_ctx"], job["threads"])),
                                               job["new_tokens"])
    return out


def tokens_per_second(generate, n_new):
    generate(2)  # warm up (first-call allocations)
    start = time.perf_counter()
    generate(n_new)
    return n_new / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="QAT checkpoint (default, and --quick: the embedded model with RTN "
                   "W4A8KV4 weights, saved as a QAT checkpoint)")
    p.add_argument("--fp_model", default=None, help="the FP model for the F16 GGUF (default: the checkpoint's teacher)")
    p.add_argument("--ppl_data", default=EMBEDDED_EVAL)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work_dir", default="output/llama_cpp_check")
    p.add_argument("--quick", action="store_true", help="4 windows, 16 new tokens (the test)")
    p.add_argument("--ours_only", action="store_true", help="only what needs no llama.cpp: the exports, our "
                   "perplexity and our export's tokens/s")
    args = p.parse_args(argv)
    cpp = not args.ours_only
    if cpp and importlib.util.find_spec("llama_cpp") is None:
        sys.exit("error: llama_cpp_check.py needs llama-cpp-python (pip install llama-cpp-python==0.3.36, a ~25-30 "
                 "min source build; see docs/export.md), or --ours_only for the parts that need no llama.cpp")
    if args.quick:
        args.windows, args.new_tokens = 4, 16
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model
    if model_dir is not None:
        model_dir = resolve_model(model_dir)
    else:
        model_dir = work / "rtn_W4A8KV4"
        if not (model_dir / "config.json").is_file():
            m = QuantSetting(4, 8, 4).apply(AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL))
            m.config.llmqat_teacher = EMBEDDED_MODEL
            m.save_pretrained(model_dir)
            AutoTokenizer.from_pretrained(EMBEDDED_MODEL).save_pretrained(model_dir)
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    fp_dir = resolve_model(args.fp_model or getattr(config, "llmqat_teacher", None) or EMBEDDED_MODEL)
    name = QuantSetting.from_config(config).name
    qat_gguf = work / "gguf" / f"{name}.gguf"
    if not qat_gguf.is_file():
        export_gguf(model_dir, work / "gguf")
    fp_gguf = work / "fp16.gguf"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not fp_gguf.is_file():
        write_gguf(AutoModelForCausalLM.from_pretrained(fp_dir), tokenizer, fp_gguf, np.float16)
    ct_dir = work / "compressed_tensors"
    if not ct_dir.is_dir():
        export(model_dir, ct_dir)
    ours = weights_only(load_model(str(model_dir)).eval())
    result = {"model": str(model_dir), "setting": name, "gguf_mb": round(qat_gguf.stat().st_size / 1e6, 2),
              "fp16_gguf_mb": round(fp_gguf.stat().st_size / 1e6, 2)}
    sample = tokenizer(SAMPLE).input_ids
    lines = [t for text in read_texts(args.ppl_data)[:20] for t in text.splitlines() if t.strip()][:200]
    ppl_windows = windows(tokenizer, args.ppl_data, args.seq_len, args.windows)
    if not ppl_windows:
        raise InputError(f"{args.ppl_data}: fewer tokens than one window of --seq_len {args.seq_len}")
    prompt = sample[:8]
    if cpp:  # llama.cpp in a child process: a crash there is one error line, not a dead benchmark
        theirs = run_in_child("benchmarks.llama_cpp_check:cpp_measure", {
            "qat_gguf": str(qat_gguf), "fp_gguf": str(fp_gguf), "n_ctx": args.seq_len, "threads": args.threads,
            "add_bos": tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id], "lines": lines, "sample": sample,
            "windows": ppl_windows, "new_tokens": args.new_tokens, "prompt": prompt}, "llama.cpp", CRASH_HINT)
        # tokenization: held-out lines, llama.cpp's tokenizer vs Hugging Face's
        same = [ids == tokenizer(t).input_ids for t, ids in zip(lines, theirs["lines"])]
        result["tokens_equal_share"] = round(sum(same) / len(same), 4)
        result["tokens_equal"] = theirs["sample"] == sample
        # next-token logits on the sample, same ids
        cpp_logits = torch.from_numpy(theirs["sample_logits"])
        with torch.no_grad():
            mine = ours(torch.tensor([sample])).logits[0]
        result["max_logit_diff"] = round((cpp_logits - mine).abs().max().item(), 4)
        result["max_logit_diff_rel"] = round(result["max_logit_diff"] / mine.std().item(), 4)
        result["top1_agree"] = round((cpp_logits.argmax(-1) == mine.argmax(-1)).float().mean().item(), 4)

    # perplexity over the same windows of token ids
    nll_ours = count = 0
    for ids in ppl_windows:
        with torch.no_grad():
            nll_ours += nll(ours(torch.tensor([ids])).logits[0], ids)
        count += len(ids) - 1
    result["ppl_ours_w_only"] = round(math.exp(nll_ours / count), 4)
    if cpp:
        result["ppl_llama_cpp"] = round(math.exp(theirs["nll"] / count), 4)
        result["ppl_rel_diff"] = round(result["ppl_llama_cpp"] / result["ppl_ours_w_only"] - 1, 5)
    result["ppl_windows"] = count // (args.seq_len - 1)

    # greedy decoding speed: the QAT GGUF, the F16 GGUF (measured in the child), our PyTorch export
    if cpp:
        result["tok_s_gguf"] = round(theirs["tok_s_gguf"], 1)
        result["tok_s_fp16_gguf"] = round(theirs["tok_s_fp16_gguf"], 1)
    exported = load_model(str(ct_dir))
    ids = torch.tensor([prompt])
    result["tok_s_pytorch_export"] = round(tokens_per_second(lambda n: exported.generate(
        ids, max_new_tokens=n, min_new_tokens=n, do_sample=False), args.new_tokens), 1)
    if cpp:
        result["speedup_vs_fp16_gguf"] = round(result["tok_s_gguf"] / result["tok_s_fp16_gguf"], 2)
        result["speedup_vs_pytorch_export"] = round(result["tok_s_gguf"] / result["tok_s_pytorch_export"], 2)
    result["threads"], result["cpu"] = args.threads, os.uname().machine
    for k, v in result.items():
        print(f"{k}: {v}")
    print("llama_cpp_check " + json.dumps(result))
    return result


if __name__ == "__main__":
    cli(main)
