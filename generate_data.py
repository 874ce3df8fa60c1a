"""LLM-QAT data-free generation, one shard per GPU: the full-precision model writes its own training data.

    CUDA_VISIBLE_DEVICES=i python generate_data.py i [--model PATH] [--out_dir gen_data] ...
Writes <out_dir>/gen.chunk.XX.jsonl; rerun the same command to complete an interrupted shard.
All shards on all GPUs: sh run_generate.sh. Every flag: python generate_data.py --help.
"""
import logging

from utils.startup import imports_without_gc

with imports_without_gc():  # ~1.7 s less start-up (utils/startup.py)
    from utils.allocator import tune_cpu_allocator
    from utils.errors import cli
    from utils.generate import main as generate_main


def main(argv=None):
    tune_cpu_allocator()  # huge pages, freed memory reused on CPUs (utils/allocator.py)
    cli(lambda: generate_main(argv))


if __name__ == "__main__":
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    main()
