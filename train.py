"""LLM-QAT: quantization-aware training with knowledge distillation from the full-precision model.

    torchrun --nproc_per_node 8 train.py --input_model_filename /path/llama-7b-hf --w_bits 4 --a_bits 8 --kv_bits 4 ...
Usually launched through run_train.sh W A KV. Every flag: python train.py --help.
"""
import os
import sys

from utils.errors import InputError
from utils.process_args import process_args
from utils.train_qat import run


def main():
    try:
        run(*process_args())
    except InputError as e:  # one line, from one rank, no traceback
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)


if __name__ == "__main__":
    main()
