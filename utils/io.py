"""Atomic file writes and safe checkpoint loading: a crash never leaves a half-written file."""
import csv
import io
import json
import os
import pickle
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from utils.runtime import UserError


@contextmanager
def atomic_path(path):
    """Yield a temporary path in the target's folder; on success rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_torch(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_json(obj, path):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, allow_nan=True))


def save_text(text, path):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_csv(rows, columns, path):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    save_text(buf.getvalue(), path)


class UnsafeCheckpointError(UserError):
    pass


def load_torch(path, map_location="cpu"):
    """torch.load with weights_only=True; a file that needs arbitrary code gets a clear refusal."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file. Check the run folder (path=...) and the checkpoint mode (best or last).")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path}: refused to load. The file holds Python objects other than tensors, numbers, "
            f"strings and plain containers, so loading it could run code. Only load checkpoints you "
            f"trust, and re-save them as a state dict. (torch said: {str(e).splitlines()[0]})"
        ) from None
