"""The perplexity sets of GPTQ-style evaluation, written as {"text"} jsonl for --eval_data_local_path.

Each set is ONE jsonl line holding the whole joined text, because GPTQ tokenizes the joined split as a
single string (one BOS in front) and cuts the tokens into consecutive seqlen windows; utils/data.py
tokenizes each jsonl text with a BOS prefix, concatenates and cuts into consecutive blocks, so one line
gives the same token stream and the same windows (for the same tokenizer and block length).

- wiki2.jsonl: WikiText-2 raw, test split ("wikitext", "wikitext-2-raw-v1"), "\\n\\n".join(rows)
  (GPTQ datautils.get_wikitext2: tokenizer("\\n\\n".join(testdata['text']))).
- c4.jsonl: allenai/c4 en/c4-validation.00000-of-00008.json.gz, " ".join of the first 1100 documents
  (GPTQ get_c4_new / the "c4" of most later papers; GPTQ's older get_c4 samples random windows instead).
  GPTQ then keeps the first 256*seqlen tokens, i.e. the first 256 windows of seqlen tokens here:
  eval.py --seq_len 2048 --max_windows 256 (train.py: --max_eval_samples 256, but its blocks are <= 1024).

Sources, in order: the local file named by a flag, else the Hugging Face hub via datasets.load_dataset.
All sets are read before anything is written; each is written to a temporary file renamed into place.
"""
import argparse
import gzip
import os

from utils.errors import InputError
from utils.data import text_of, write_texts

WIKI_ROWS = 4358  # rows of the wikitext-2-raw-v1 test split (lines of wiki.test.raw)
WIKI_DIR_FILES = ("wiki.test.raw", "wikitext-2-raw/wiki.test.raw", "wikitext-2-raw-v1/wiki.test.raw",
                  "test-00000-of-00001.parquet", "wikitext-2-raw-v1/test-00000-of-00001.parquet")
C4_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_DOCS = 1100
HUB_HELP = {  # how to supply the files by hand
    "wiki2": "get wiki.test.raw (in wikitext-2-raw-v1.zip) or wikitext-2-raw-v1/test-00000-of-00001.parquet "
             "(hub dataset Salesforce/wikitext) and pass --wikitext_file PATH or --wikitext_dir DIR",
    "c4": f"get {C4_FILE} (hub dataset allenai/c4) and pass --c4_file PATH",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="prepare_eval_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=".", help="where wiki2.jsonl / c4.jsonl go (default: the current "
                   "directory; run_train.sh reads wiki2.jsonl from the repo root)")
    p.add_argument("--which", nargs="+", choices=("wiki2", "c4"), default=["wiki2", "c4"], help="sets to write")
    p.add_argument("--wikitext_file", help="wiki.test.raw, or a .parquet/.arrow of the test split")
    p.add_argument("--wikitext_dir", help=f"a directory holding one of {', '.join(WIKI_DIR_FILES)}")
    p.add_argument("--c4_file", help="c4-validation.00000-of-00008.json.gz (or the same json lines uncompressed)")
    return p.parse_args(argv)


def main(argv=None):
    """prepare_eval_data.py: the command line in, one prepare() call."""
    a = parse_args(argv)
    return prepare(a.out_dir, a.which, a.wikitext_file, a.wikitext_dir, a.c4_file)


def table_texts(path):
    """The 'text' column of a parquet file or an arrow file (datasets' cache files are arrow streams)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if path.endswith(".parquet"):
        table = pq.read_table(path, columns=["text"])
    else:
        with pa.memory_map(path) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(source).read_all()
    return table.column("text").to_pylist()


def raw_rows(path):
    """The rows the HF wikitext loader makes of wiki.test.raw: it iterates the file in text mode (universal
    newlines, so not str.splitlines, which also splits at \\x0b, \\x1c, \\u2028...), keeps each line with its
    "\\n" and turns whitespace-only lines into ""."""
    with open(path, encoding="utf-8") as f:
        return [row if row.strip() else "" for row in f]


def json_texts(path, limit):
    """The 'text' of the first `limit` json lines (gzip or not: told by the magic bytes, not the name)."""
    with open(path, "rb") as f:
        zipped = f.read(2) == b"\x1f\x8b"
    texts = []
    with (gzip.open if zipped else open)(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if len(texts) == limit:
                break
            if line.strip():
                try:
                    texts.append(text_of(line))
                except ValueError as e:
                    raise ValueError(f"line {n}: {e}") from None
    return texts


def local_file(which, wikitext_file, wikitext_dir, c4_file):
    if which == "c4":
        return c4_file
    if wikitext_file or not wikitext_dir:
        return wikitext_file
    found = [p for p in (os.path.join(wikitext_dir, f) for f in WIKI_DIR_FILES) if os.path.isfile(p)]
    if not found:
        raise InputError(f"--wikitext_dir {wikitext_dir!r}: none of {', '.join(WIKI_DIR_FILES)} in it")
    return found[0]


def read_local(path, which):
    if not os.path.isfile(path):
        raise InputError(f"{which}: {path!r}: no such file")
    try:
        if path.endswith((".parquet", ".arrow")):
            rows = table_texts(path)
        else:
            rows = raw_rows(path) if which == "wiki2" else json_texts(path, C4_DOCS)
    except (OSError, ValueError, KeyError, UnicodeDecodeError, EOFError) as e:  # pyarrow errors are ValueErrors
        raise InputError(f"{which}: {path}: cannot read it ({type(e).__name__}: {e})") from None
    return rows[:C4_DOCS] if which == "c4" else rows


def hub_unavailable(datasets):
    """Why the hub cannot be used, or None. Offline mode is left to datasets (fails in ms, or serves its
    cache); otherwise one 5 s request first, as datasets retries an unreachable hub for ~25 s or more."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session
    if datasets.config.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE or HF_DATASETS_OFFLINE, as datasets reads them
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=5)  # the hub's own client: its proxies and endpoint
    except Exception as e:
        return f"{constants.ENDPOINT} unreachable ({type(e).__name__}: {e}; HF_HUB_OFFLINE=1 uses a cached copy)"
    return None


def read_hub(which):
    """Rows as GPTQ loads them from the hub: (rows, None), or (None, why not)."""
    import datasets
    if (why := hub_unavailable(datasets)) is not None:
        return None, why
    datasets.logging.set_verbosity_error()
    if which == "c4":
        calls = [(("allenai/c4",), {"data_files": {"validation": C4_FILE}, "split": "validation"})]
    else:  # GPTQ's name; the hub redirects it, but an older offline cache may hold either
        calls = [((name, "wikitext-2-raw-v1"), {"split": "test"}) for name in ("wikitext", "Salesforce/wikitext")]
    whys = []
    for call_args, kwargs in calls:
        try:
            ds = datasets.load_dataset(*call_args, **kwargs)
        except Exception as e:  # ConnectionError offline without a cache, or whatever the hub answers
            whys.append(f"load_dataset({', '.join(map(repr, call_args))}): {type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0]}")
            continue
        if which == "c4":
            ds = ds.select(range(min(C4_DOCS, len(ds))))
        return list(ds["text"]), None
    return None, whys[0]  # GPTQ's call


def joined(which, rows):
    if which == "wiki2":
        if len(rows) != WIKI_ROWS:
            print(f"note: wiki2 has {len(rows)} rows, the wikitext-2-raw-v1 test split has {WIKI_ROWS}")
        if any("<unk>" in r for r in rows):
            print("note: wiki2 contains <unk>: this looks like the tokenized wikitext-2-v1, not the raw one")
        return "\n\n".join(rows)
    if len(rows) < C4_DOCS:
        print(f"note: c4 has {len(rows)} documents, GPTQ uses the first {C4_DOCS}")
    return " ".join(rows)


def prepare(out_dir=".", which=("wiki2", "c4"), wikitext_file=None, wikitext_dir=None, c4_file=None):
    """Write <out_dir>/<set>.jsonl for each set in which (wiki2, c4), from local files or the hub; returns
    {set: output path}."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--out_dir {out_dir!r} is not a directory")
    if wikitext_file and wikitext_dir:
        raise InputError("give --wikitext_file or --wikitext_dir, not both")
    sets = list(dict.fromkeys(which))
    texts, sources, failures = {}, {}, []
    for which in sets:  # read everything first: a failure writes nothing
        path = local_file(which, wikitext_file, wikitext_dir, c4_file)
        if path:
            rows, sources[which] = read_local(path, which), path
        else:
            rows, why = read_hub(which)
            if rows is None:
                flags = "--c4_file" if which == "c4" else "--wikitext_file/--wikitext_dir"
                failures.append(f"{which}: no {flags} given, and the Hugging Face hub failed ({why}); "
                                f"{HUB_HELP[which]}")
                continue
            sources[which] = "the Hugging Face hub"
        texts[which] = (joined(which, rows), len(rows))
    if failures:
        raise InputError("; ".join(failures))
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for which, (text, n_rows) in texts.items():
        written[which] = os.path.join(out_dir, f"{which}.jsonl")
        write_texts(written[which], [text])  # one line, atomically
        print(f"wrote {written[which]}: 1 line, {len(text)} characters from {n_rows} rows of {sources[which]}")
    return written
