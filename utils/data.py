"""Training and evaluation data: jsonl {"text": ...} files -> fixed-length token blocks.

Texts are tokenized with BOS and no EOS, concatenated in file order, and cut into blocks of
`block_size` tokens; the remainder is dropped (as the original). Blocks form a map-style dataset, so
the Trainer's sampler shuffles them (the original's IterableDataset never shuffled).
"""
import glob
import json
import logging
import os

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from utils.errors import InputError
from utils.io import atomic_write
from utils.shards import complete_lines

logger = logging.getLogger(__name__)


class DataError(InputError):
    """Bad input data; the message names the file (and line)."""


def expand_paths(spec):
    """A path, a glob, a directory (its *.jsonl) or a comma-separated list of those -> sorted files."""
    paths = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.jsonl")))
        elif glob.has_magic(part):
            found = sorted(glob.glob(part))
        else:
            found = [part] if os.path.exists(part) else []
        if not found:
            raise DataError(f"data path {part!r}: no such file (or no file matches)")
        paths += found
    return paths


def text_of(line):
    """The 'text' of one jsonl line; ValueError unless the line is a JSON object with a string 'text'."""
    obj = json.loads(line)
    text = obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise ValueError("no string 'text' field")
    return text


def write_texts(path, texts):
    """Texts as {"text"} jsonl lines, written atomically: readers see the old file or the whole new one."""
    with atomic_write(path) as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)


def read_texts(path):
    """Texts of one jsonl file. A torn last line (a live generation shard) is skipped with a warning, as
    utils.shards says; any other bad line, or bytes that are not UTF-8, is an error naming the file and line."""
    texts = []
    try:
        with open(path, "rb") as f:
            lines, _ = complete_lines(f, path)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    for n, line in lines:
        if not line.strip():
            continue
        try:
            texts.append(text_of(line.decode("utf-8")))
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise DataError(f"{path}:{n}: not a JSON object with a string 'text' field ({e})") from None
    if not texts:
        raise DataError(f"{path}: no text lines (empty file?)")
    return texts


def tokenize_texts(texts, tokenizer, desc="tokenizing"):
    """Token ids of all texts concatenated, each text prefixed with BOS (when the tokenizer has one)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    chunks, step = [], 1000
    for i in tqdm(range(0, len(texts), step), desc=desc, unit_scale=step, disable=len(texts) <= step):
        batch = tokenizer(texts[i:i + step], add_special_tokens=False)["input_ids"]
        chunks.append(torch.tensor([t for seq in batch for t in bos + seq], dtype=torch.long))
    return torch.cat(chunks)


class BlockDataset(Dataset):
    """Consecutive, non-overlapping blocks of token ids; labels are the inputs (the model shifts them)."""

    def __init__(self, ids, block_size):
        n = len(ids) // block_size
        self.blocks = ids[: n * block_size].view(n, block_size)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def load_blocks(spec, tokenizer, block_size, max_samples=None, what="train"):
    paths = expand_paths(spec)
    texts = [t for p in paths for t in read_texts(p)]
    ids = tokenize_texts(texts, tokenizer, desc=f"tokenizing {what} data")
    data = BlockDataset(ids, block_size)
    if len(data) == 0:
        raise DataError(f"{what} data {', '.join(paths)}: {len(ids)} tokens, fewer than one block of {block_size}")
    if max_samples is not None:
        data.blocks = data.blocks[:max_samples]
    logger.info("%s data: %d files, %d texts, %d tokens -> %d blocks of %d",
                what, len(paths), len(texts), len(ids), len(data), block_size)
    return data
