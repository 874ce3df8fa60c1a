"""Evaluate a model: perplexity over fixed windows and zero-shot accuracy (lm-eval-harness).

    python eval.py output/models/W4A8KV4 --tasks shakespeare_nextline       # a QAT checkpoint
    python eval.py /path/llama-7b-hf --w_bits 4 --a_bits 8 --kv_bits 4      # RTN baseline, no training
    python eval.py /path/llama-7b-hf --ppl_data wiki2.jsonl c4.jsonl --tasks paper
Every flag: python eval.py --help.
"""
from utils.startup import imports_without_gc

with imports_without_gc():  # ~1.7 s less start-up (utils/startup.py)
    from utils.allocator import tune_cpu_allocator
    from utils.errors import cli
    from utils.evaluate import main as evaluate_main


def main():
    tune_cpu_allocator()  # huge pages, freed memory reused on CPUs (utils/allocator.py)
    cli(evaluate_main)


if __name__ == "__main__":
    main()
