"""Run native code that may crash (llama.cpp) in a child Python process: a segfault there becomes one error line
naming the signal and the likely cause, not a dead benchmark.

    result = run_in_child("benchmarks.llama_cpp_check:cpp_measure", payload, "llama.cpp", hint)

The child (python -m utils.child IN OUT) imports module:function, calls it on the unpickled payload and pickles the
result to OUT; the parent reads it back.
"""
import importlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile

from utils.constants import REPO
from utils.errors import InputError


class ChildFailed(InputError):
    """The child died on a signal or exited with an error: one line (cli prints it as `error: ...`)."""


def run_in_child(target, payload, what, hint=""):
    """target(payload) ("module:function", importable from the repository root) in a fresh interpreter; its result.
    A signal (SIGSEGV, SIGILL, ...) or a non-zero exit raises ChildFailed naming `what`, the signal or the child's
    last error line, and `hint` (for a signal: the likely cause and the fix)."""
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "in.pkl"), os.path.join(tmp, "out.pkl")
        with open(inp, "wb") as f:
            pickle.dump((target, payload), f)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
        proc = subprocess.run([sys.executable, "-m", "utils.child", inp, out], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            raise ChildFailed(f"{what} crashed ({name}) in its child process" + (f": {hint}" if hint else ""))
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            raise ChildFailed(f"{what} failed in its child process: {lines[-1] if lines else f'exit {proc.returncode}'}")
        with open(out, "rb") as f:
            return pickle.load(f)


def main(inp, out):
    with open(inp, "rb") as f:
        target, payload = pickle.load(f)
    module, function = target.split(":")
    result = getattr(importlib.import_module(module), function)(payload)
    with open(out, "wb") as f:
        pickle.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
