import os
import sys

from models.errors import InputError  # noqa: F401  (the one error type of bad input, re-exported)


def cli(main):
    """Run an entry point: an InputError becomes one `error:` line (from rank 0 only), exit 1, no traceback."""
    try:
        return main()
    except InputError as e:
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)
