"""Atomic writes, for files and directories: a temporary name in the same directory, fsynced, renamed into place.
Readers see the old file (or no directory) or the whole new one, never a part; on any error the temporary is
removed and the old file stays. Temporary names start with a dot and end in .tmp (or .tmp-<pid> for
directories), so nothing that globs *.jsonl or a model directory picks them up; leftovers of killed runs are
removed by the next write of the same path."""
import contextlib
import glob
import os
import shutil
import tempfile


def _remove_leftovers(pattern):
    for old in glob.glob(pattern):
        pid = old.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            continue  # another live process is writing it
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.unlink(old)


def _alive(pid):
    if pid == os.getpid():
        return False  # our own leftover (a previous call that failed)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_write(path, mode="w"):
    """Yield a file to write `path` through (text in UTF-8 unless mode has "b")."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)
    _remove_leftovers(os.path.join(directory, f".{glob.escape(name)}.*.tmp-*"))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=f".tmp-{os.getpid()}")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it private
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path, replace_empty=True):
    """Yield a temporary directory that becomes `path` when the block ends without error. An existing
    non-empty `path` is never replaced (FileExistsError); an empty one is, with replace_empty."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    _remove_leftovers(os.path.join(parent, f".{glob.escape(name)}.tmp-*"))
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp)
    try:
        yield tmp
        commit_dir(tmp, path, replace_empty)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def commit_dir(tmp, path, replace_empty=True):
    """Make the finished temporary directory tmp become path: files 0644 (safetensors writes 0600) and fsynced,
    then one rename. A non-empty path is never replaced (FileExistsError, tmp left for the caller)."""
    for root, _, files in os.walk(tmp):
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
    if os.path.isdir(path) and replace_empty and not os.listdir(path):
        os.rmdir(path)
    try:
        os.rename(tmp, path)  # fails on a non-empty directory: never overwrites one
    except OSError as e:
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists and is not empty; not overwriting it") from e
        raise
