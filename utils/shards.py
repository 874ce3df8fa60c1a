"""The generation shard format, known here only: names, the settings sidecar, and the torn-line policy.

    <gen_dir>/gen.chunk.XX.jsonl       one {"text", "start_id", "prefix_length"} line per sequence, append-only
    <gen_dir>/gen.chunk.XX.meta.json   the settings the shard was started with (and num_sequences)

Torn lines: a last line without a newline that does not parse is an unfinished write (a shard still being
written, or a run killed mid-line). It is never data: the generator cuts it when it resumes; readers (the
merge, the training data) skip it with a warning naming the file. A last line that parses is whole (the
generator adds its newline back). Any other bad line is an error.
"""
import errno
import fcntl
import glob
import json
import logging
import os
import re

from utils.errors import InputError
from utils.io import atomic_write

logger = logging.getLogger("llm_qat.shards")
SHARD_NAME = re.compile(r"gen\.chunk\.(\d+)\.jsonl$")
GLOB = "gen.chunk.*.jsonl"


def shard_path(gen_dir, shard):
    return os.path.join(gen_dir, f"gen.chunk.{shard:02d}.jsonl")


def meta_path(path):
    return path[: -len(".jsonl")] + ".meta.json"


def shard_number(path):
    """The shard number in a shard file's name, or None."""
    m = SHARD_NAME.search(os.path.basename(path))
    return int(m.group(1)) if m else None


def shard_paths(gen_dir):
    """Every shard present, in shard order (numeric: 2 before 10)."""
    found = [(n, p) for p in glob.glob(os.path.join(gen_dir, GLOB)) if (n := shard_number(p)) is not None]
    return [p for _, p in sorted(found)]


def read_meta(path):
    """A shard's sidecar settings, or None."""
    try:
        with open(meta_path(path), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def complete_lines(f, path):
    """(line number, bytes) of every whole line of a binary file, and the byte size they take. The policy
    above: a last line without a newline that parses as JSON is whole (a file saved without a final newline,
    or a kill between a record and its newline); one that does not is torn and skipped with a warning."""
    lines, size = [], 0
    for n, line in enumerate(f, 1):
        if not line.endswith(b"\n"):
            try:
                json.loads(line)
            except ValueError:
                logger.warning("%s:%d: skipping an unfinished last line (%d bytes): a shard still being written, "
                               "or a killed run (rerun generate_data.py for this shard to complete it)",
                               path, n, len(line))
                break
        lines.append((n, line))
        size += len(line)
    return lines, size


class ShardFile:
    """gen.chunk.XX.jsonl, append-only under an exclusive lock, and its sidecar."""

    def __init__(self, out_dir, shard):
        self.path = shard_path(out_dir, shard)
        self.meta_path = meta_path(self.path)
        self.fd = None

    def check_meta(self, meta):
        """A shard resumes only with the settings it was started with (else its lines would mix two corpora)."""
        old = read_meta(self.path) if os.path.exists(self.meta_path) else None
        for key, value in (meta.items() if old is not None else ()):
            if old.get(key) != value:
                raise InputError(f"{self.path} was started with {key}={old.get(key)!r}, not {value!r}: "
                                 "rerun with the same arguments, or use another --out_dir")

    def scan(self, expected):
        """(start id, prefix length) pairs already written, and the byte size of the complete lines."""
        done = set()
        if not os.path.exists(self.path):
            return done, 0
        with open(self.path, "rb") as f:
            lines, good_size = complete_lines(f, self.path)
        for n, line in lines:
            try:
                record = json.loads(line)
                key = (record["start_id"], record["prefix_length"])
                if not isinstance(record["text"], str):
                    raise TypeError("'text' is not a string")
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{self.path}:{n}: not a generated line ({e}); "
                                 "move the file away to regenerate the shard") from None
            if key not in expected or key in done:
                raise InputError(f"{self.path}:{n}: (start id, prefix length) {key} is "
                                 f"{'a duplicate' if key in done else 'not in this shard'}: the file "
                                 "was written with other arguments; use another --out_dir")
            done.add(key)
        return done, good_size

    def open(self, expected, meta):
        """Lock the shard for this process, cut a torn last line, write the sidecar; returns the pairs done."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel even on kill -9
        except BlockingIOError:
            raise InputError(f"{self.path} is being written by another process (same shard running twice?)") from None
        done, good_size = self.scan(expected)
        torn = os.fstat(self.fd).st_size - good_size
        if torn:
            logger.info("%s: dropping a torn last line (%d bytes) left by an interrupted run", self.path, torn)
            os.ftruncate(self.fd, good_size)
        if good_size and os.pread(self.fd, 1, good_size - 1) != b"\n":
            os.write(self.fd, b"\n")  # killed between a record and its newline: the record is whole
        if not os.path.exists(self.meta_path):
            with atomic_write(self.meta_path) as f:
                json.dump(meta, f, indent=1)
        return done

    def append(self, record):
        # One write() per line on an O_APPEND file: a kill leaves whole lines, or one torn last line.
        data = (json.dumps(record) + "\n").encode("utf-8")
        if os.write(self.fd, data) != len(data):  # a short write (full disk): the rerun cuts the torn line
            raise OSError(errno.ENOSPC, "short write (disk full?)", self.path)

    def sync(self):
        os.fsync(self.fd)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
