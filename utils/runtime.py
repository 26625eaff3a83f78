"""Device, seeding, precision and logging helpers shared by train, infer and evaluate."""
import logging
import os
import random
import signal
import sys
from contextlib import nullcontext

import numpy as np
import torch

log = logging.getLogger("ma_sbir")


def pick_device(name="auto"):
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device {name!r} ({e}). Use auto, cpu, cuda or cuda:<index>.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU here. "
                        f"Use device=auto (GPU when present, else CPU) or device=cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible.")
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device, precision):
    """The one autocast helper: bf16/fp16 mixed precision on CUDA, plain fp32 elsewhere."""
    dtype = amp_dtype(precision)
    if device.type != "cuda" or dtype is None:
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def amp_dtype(precision):
    """The autocast dtype of a precision name (None for fp32); a clear error for any other name."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
    if precision not in dtypes:
        raise UserError(f"unknown precision {precision!r}. Use one of {sorted(dtypes)}.")
    return dtypes[precision]


def setup_logging(log_file=None):
    """Log to stderr and, when given, to a file (the run's train.log)."""
    log.disabled = False  # Hydra's logging set-up may disable loggers created before it
    log.setLevel(logging.INFO)
    log.propagate = False
    fmt = logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if log_file is not None:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        log.addHandler(fh)
    return log


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


def init_wandb(cfg, run_dir, run_id):
    """wandb as configured; never fails a run for lack of network or login (falls back)."""
    from omegaconf import OmegaConf
    mode = cfg.logger.wandb.mode
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; logging to train.log only.")
        return None
    kwargs = dict(project=cfg.logger.wandb.project, name=cfg.logger.wandb.name,
                  dir=str(run_dir), id=run_id, resume="allow",
                  config=OmegaConf.to_container(cfg, resolve=True))
    for try_mode in dict.fromkeys([mode, "offline"]):
        try:
            return wandb.init(mode=try_mode, settings=wandb.Settings(init_timeout=60), **kwargs)
        except Exception as e:  # no network, no API key, service start failure
            log.warning(f"wandb mode={try_mode} failed ({type(e).__name__}: {e}); "
                        f"{'trying offline' if try_mode != 'offline' else 'logging to train.log only'}.")
    return None
