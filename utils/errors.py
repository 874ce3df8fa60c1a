import errno
import os
import sys

from models.errors import InputError  # noqa: F401  (the one error type of bad input, re-exported)

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# how libraries report a failed write without an errno: safetensors names the OS error, torch.save does not
FULL_DISK_TEXT = ("No space left on device", "Disk quota exceeded")
# torch.save's PytorchStreamWriter: "file write failed", or a short write seen as "unexpected pos N vs M"
WRITE_FAILED_TEXT = ("file write failed", "inline_container.cc")


def disk_full(e):
    """(the exception behind e or its causes that reports a full disk, confirmed) or None: an OSError with
    ENOSPC / EDQUOT or a library's message naming one (confirmed), or torch.save's bare "file write failed"
    (not confirmed: it gives no reason, and a full disk is the usual one)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in DISK_FULL or any(t in str(e) for t in FULL_DISK_TEXT):
            return e, True
        if any(t in str(e) for t in WRITE_FAILED_TEXT):
            return e, False
        e = e.__cause__ or e.__context__
    return None


def close_progress_bars():
    """Close the bars an exception left open now, so that tqdm does not redraw them after the error line as the
    interpreter exits (the error line stays the last line). tqdm lists its live bars only in `_instances`."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def cli(main):
    """Run an entry point: an InputError, or a full disk, becomes one `error:` line (from rank 0 only), exit 1, no
    traceback. Every writer goes through a temporary file or directory, so what a full disk interrupted is not
    left where a rerun would trust it: free some space and rerun the same command."""
    def fail(line):
        close_progress_bars()
        sys.exit(f"error: {line}" if os.environ.get("RANK", "0") == "0" else 1)

    try:
        return main()
    except InputError as e:
        fail(e)
    except Exception as e:
        found = disk_full(e)
        if found is None:
            raise
        full, confirmed = found
        if confirmed:
            what = "no space left on device" + (f" writing {full.filename}" if getattr(full, "filename", None) else "")
        else:
            reason = str(full).strip().splitlines()[-1] if str(full).strip() else type(full).__name__
            what = f"a write failed ({reason}), most likely no space left on device"
        fail(f"{what}; free some space and rerun the same command (it resumes from what was complete)")
