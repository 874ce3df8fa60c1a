"""The fault sweep's killer: run an entry point and SIGKILL this very process at a named point, so that a test
kills at a deterministic moment (never after some elapsed time).

    python tests/workers/kill_at.py POINT[:N] SCRIPT [ARGS...]

POINT: replace     models.io about to rename a finished temporary file into place (merge, eval's json)
       commit_dir  a finished temporary directory about to be renamed into place (export, the saved student)
       append      generation about to append a sequence to its shard
       training_step  the Trainer about to run a training step (killed mid-run, between checkpoints)
       trainer_state  the Trainer about to write trainer_state.json, the last file of a checkpoint (the model
                   and optimizer are written: the checkpoint is torn)
N: kill at the N-th time the point is reached (default 1).
"""
import os
import runpy
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
point, _, nth = sys.argv[1].partition(":")
nth = int(nth or 1)
script, sys.argv = sys.argv[2], sys.argv[2:]
seen = 0


def reached(*args, **kwargs):
    global seen
    seen += 1
    if seen == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)


if point == "replace":
    import types
    import models.io as io
    original = os.replace
    io.os = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    io.os.replace = reached
elif point == "commit_dir":
    import models.io as io
    original = io.commit_dir
    io.commit_dir = reached
    import utils.train_qat
    utils.train_qat.commit_dir = reached
elif point == "append":  # generation: before the N-th sequence is appended to its shard
    from utils.shards import ShardFile
    original = ShardFile.append
    ShardFile.append = reached
elif point == "training_step":
    from transformers import Trainer
    original = Trainer.training_step
    Trainer.training_step = reached
elif point == "trainer_state":
    from transformers.trainer_callback import TrainerState
    original = TrainerState.save_to_json
    TrainerState.save_to_json = reached
else:
    sys.exit(f"kill_at.py: unknown point {point!r}")
runpy.run_path(os.path.join(REPO, script) if not os.path.isabs(script) else script, run_name="__main__")
