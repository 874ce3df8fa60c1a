class InputError(ValueError):
    """Bad user input (bit width, path, data): reported as one line, exit code 1, before work starts.
    Defined here so that models/ needs nothing from utils/; utils.errors.cli turns it into the line."""
