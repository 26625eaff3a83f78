"""SIGINT / SIGTERM handling: a stop request the training loop answers at its next step, and the
handlers used while a run is being set up."""

import signal


class StopRequested:
    """SIGINT / SIGTERM set a flag; the training loop saves last.pth at the next step and exits."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def sigterm_handler(handler):
    """Install a SIGTERM handler and return the previous one (None off the main thread)."""
    try:
        return signal.signal(signal.SIGTERM, handler) if handler is not None else None
    except ValueError:  # not the main thread: signals are the main thread's
        return None


def exit_on_sigterm(signum, frame):
    """SIGTERM while a run is being set up: an exception, so that the failed start is cleaned up."""
    raise SystemExit(128 + signum)
