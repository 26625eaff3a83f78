"""Atomic file writes and safe checkpoint loading: a crash never leaves a half-written file."""

import csv
import errno
import io
import json
import os
import pickle
import re
import socket
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from runtime.errors import UserError


HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())  # in temporary names: no "." or "-"


class DiskFullError(UserError):
    pass


@contextmanager
def atomic_path(path):
    """Yield a temporary path in the target's folder; on success rename it over `path`. Stale
    temporary files of an earlier, interrupted save of the same file are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}-{HOST}.", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual permissions
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        reason = disk_full_reason(e)
        if reason is not None:
            kept = f"the previous {path.name} is intact" if path.exists() else "no file was written"
            raise DiskFullError(
                f"no space left on the device ({reason}) while writing {path}; nothing was "
                f"replaced: {kept}. Free some space (df -h {path.parent}) and run again."
            ) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# torch.save's C++ writer reports a full disk as a RuntimeError, not as ENOSPC:
# "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534" or
# "PytorchStreamWriter failed writing file data/0: file write failed".
TORCH_WRITE_FAILED = re.compile(r"unexpected pos \d+ vs \d+|PytorchStreamWriter failed writing")


def disk_full_reason(err):
    """Why a write failed for want of space (the OS's words, or torch's), or None."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return err.strerror
    if isinstance(err, RuntimeError) and TORCH_WRITE_FAILED.search(str(err)):
        return f"torch: {str(err).splitlines()[0][:120]}"
    return None


def remove_stale_temporaries(path):
    """Delete `.name.<pid>-<host>.*.tmp` files beside `path` whose writing process, on this machine,
    is gone. Another machine's (a folder shared by a cluster) may be a write in progress: kept."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid, _, host = tmp.name[len(path.name) + 2 :].split(".")[0].partition("-")
        if pid.isdigit() and host in (HOST, "") and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        raise UserError(
            f"{path}: no such file. Check the run folder (path=...) and the checkpoint mode (best "
            f"or last)."
        )
    if (
        not zipfile.is_zipfile(path) and path.open("rb").read(1) != b"\x80"
    ):  # neither format of torch.save
        raise damaged(path, ValueError("not a PyTorch file"))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise damaged(path, e) from None
        raise UnsafeCheckpointError(
            f"{path}: refused to load. The file holds Python objects other than tensors, numbers, "
            f"strings and plain containers, so loading it could run code. Only load checkpoints "
            f"you "
            f"trust, and re-save them as a state dict. (torch said: {str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise damaged(path, e) from None


def damaged(path, err):
    first = (str(err).splitlines() or [type(err).__name__])[0][:200]
    return UserError(
        f"{path} is damaged or truncated and cannot be read ({first}). It was not written "
        f"by a finished save of this project, or was cut when copied; copy it again or use "
        f"another file."
    )
