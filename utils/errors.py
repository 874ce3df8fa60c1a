import os
import sys


class InputError(ValueError):
    """Bad user input (bit width, path, data): reported as one line, exit code 1, before work starts."""


def cli(main):
    """Run an entry point: an InputError becomes one `error:` line (from rank 0 only), exit 1, no traceback."""
    try:
        return main()
    except InputError as e:
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)
