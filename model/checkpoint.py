"""Self-describing checkpoints: state dicts, config and counters only, written atomically,
loaded with weights_only=True."""

import random
from pathlib import Path

import numpy as np
import torch

from runtime.io import load_torch, save_torch
from runs.folder import RunFolder
from runtime.errors import UserError

# Model settings a checkpoint's weights depend on.
ARCH_KEYS = ("backbone", "n_mode")


def save_checkpoint(state, path):
    """Atomic save; on a full disk the message says that the previous file is still intact."""
    save_torch(state, path)


def _other(path):
    """The run's other checkpoint (best <-> last) when it exists."""
    run = RunFolder(path.parent.parent)
    other = {run.last: run.best, run.best: run.last}.get(path)
    return other if other is not None and other.is_file() else None


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        run = path.parent.parent
        have = sorted(p.name for p in path.parent.glob("*.pth")) if path.parent.is_dir() else []
        raise UserError(
            f"no checkpoint {path}. "
            + (
                f"The run has {have}; pick one with mode=best|last."
                if have
                else f"{run} holds no trained model: train first "
                f"(python train.py ...), or check path=..."
            )
        )
    other = _other(path)
    hint = f" The other checkpoint {other} is intact: use it (mode={other.stem})." if other else ""
    try:
        ckpt = load_torch(path)
    except UserError as e:
        raise UserError(f"{e}{hint}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        what = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(
            f"{path} is not a ma-sbir checkpoint (it holds {what}, not 'model' and 'config'). "
            f"Checkpoints of the authors' code convert with python -m model.convert.{hint}"
        )
    return ckpt


def check_compatible(saved_cfg, cfg, path):
    """Refuse to load weights into a model built with different architecture settings."""
    saved, now = saved_cfg.get("model", {}), cfg.get("model", {})
    diff = [
        f"model.{k}: checkpoint {saved.get(k)!r}, config {now.get(k)!r}"
        for k in ARCH_KEYS
        if str(saved.get(k)) != str(now.get(k))
    ]
    if diff:
        raise UserError(
            f"checkpoint {path} was trained with another model config ({'; '.join(diff)}). "
            f"Use the checkpoint's settings or start a new run."
        )


def rng_state():
    """Python, numpy, torch and CUDA generator states, as tensors and lists (weights_only-safe)."""
    return dict(
        python=list(random.getstate()[1]),
        python_pos=random.getstate()[2],
        numpy=torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        numpy_pos=int(np.random.get_state()[2]),
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    )


def set_rng_state(s):
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])
