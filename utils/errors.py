class InputError(ValueError):
    """Bad user input (bit width, path, data): reported as one line, exit code 1, before work starts."""
