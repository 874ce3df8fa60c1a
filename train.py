"""LLM-QAT: quantization-aware training with knowledge distillation from the full-precision model.

    torchrun --nproc_per_node 8 train.py --input_model_filename /path/llama-7b-hf --w_bits 4 --a_bits 8 --kv_bits 4 ...
Usually launched through run_train.sh W A KV. Every flag: python train.py --help.
"""
from utils.startup import imports_without_gc

with imports_without_gc():  # ~1.7 s less start-up (utils/startup.py)
    from utils.allocator import tune_cpu_allocator
    from utils.errors import cli
    from utils.process_args import process_args
    from utils.train_qat import run


def main():
    tune_cpu_allocator()  # huge pages, freed memory reused on CPUs (utils/allocator.py)
    cli(lambda: run(*process_args()))


if __name__ == "__main__":
    main()
