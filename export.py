"""Export a QAT checkpoint as a real low-bit one: packed integer weights with per-channel scales.

    python export.py MODEL_DIR OUT_DIR
MODEL_DIR: a model saved by train.py (config.json with w_bits, a_bits, kv_bits). OUT_DIR: a compressed-tensors
`pack-quantized` checkpoint (int8, int4 two per byte, ... int1), checked against the QAT model's logits before it
is written; the last line printed is `max_logit_diff <x> size_ratio <y>`. Load it with
models.export.load_exported(OUT_DIR).
"""
import argparse

from models.export import export
from utils.errors import cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="QAT checkpoint directory")
    p.add_argument("out_dir", help="where to write the packed checkpoint (must not exist, or be empty)")
    args = p.parse_args(argv)
    cli(lambda: export(args.model_dir, args.out_dir))


if __name__ == "__main__":
    main()
