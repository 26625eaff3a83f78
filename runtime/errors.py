"""UserError, the error caused by input (config, data, files), and the entry points' wrapper that
prints it as one line and exits 1."""

import sys


class UserError(Exception):
    """An error caused by input (config, data, files): printed as one paragraph, exit code 1."""


def user_message(err):
    """The message of a UserError, also when a DataLoader worker raised it: torch re-raises it in
    the main process wrapped in the worker's traceback, whose last line is the message."""
    text = str(err)
    if text.startswith("Caught ") and "Original Traceback" in text:
        text = text.rsplit("UserError: ", 1)[-1].strip()
    return text


def run_cli(fn, *args):
    """Run an entry point's function; a UserError prints one readable message and exits 1."""
    try:
        return fn(*args)
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(1)
