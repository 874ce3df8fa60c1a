"""Paths every stage shares: the repository, the embedded model and its texts, the merged generated corpus."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = str(REPO / "assets" / "tiny_llama")
EMBEDDED_TRAIN = str(REPO / "assets" / "data" / "shakespeare_train_small.jsonl")
EMBEDDED_EVAL = str(REPO / "assets" / "data" / "shakespeare_eval.jsonl")
GENERATED = str(Path("gen_data") / "all_gen.jsonl")  # merge_gen_data.py's output, relative to the working directory
