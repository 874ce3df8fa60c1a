"""Export a QAT checkpoint as a real low-bit one.

    python export.py MODEL_DIR OUT_DIR                  # compressed-tensors pack-quantized (vLLM, transformers)
    python export.py MODEL_DIR OUT_DIR --format gguf    # OUT_DIR/<W4A8KV4>.gguf for llama.cpp
MODEL_DIR: a model saved by train.py (config.json with w_bits, a_bits, kv_bits, w_group_size).
compressed-tensors: packed integer weights (int8, int4 two per byte, ... int1) with per-channel or per-group
scales, checked against the QAT model's logits before it is written; the last line printed is
`max_logit_diff <x> size_ratio <y>`. Load it with models.quant_model.load_model(OUT_DIR).
gguf: decoder linears as Q4_0 (1-4 bits) or Q8_0 (5-8 bits) blocks of the QAT grid, read back and checked
against the QAT model's weights before it is written; the last line printed is `max_rel_weight_err <x>`.
"""
import argparse

from utils.errors import cli
from utils.model_zoo import resolve_model
from utils.startup import imports_without_gc

FORMATS = ("compressed-tensors", "gguf")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="QAT checkpoint directory")
    p.add_argument("out_dir", help="where to write the export (must not exist, or be empty)")
    p.add_argument("--format", choices=FORMATS, default="compressed-tensors")
    args = p.parse_args(argv)
    with imports_without_gc():  # ~1.7 s less start-up (utils/startup.py)
        if args.format == "gguf":
            from models.export_gguf import export_gguf as run
        else:
            from models.export import export as run
    cli(lambda: run(resolve_model(args.model_dir), args.out_dir))


if __name__ == "__main__":
    main()
