"""Self-describing checkpoints: state dicts, config and counters only, written atomically,
loaded with weights_only=True."""
from pathlib import Path

from utils.io import load_torch, save_torch
from utils.runtime import UserError

# Model settings a checkpoint's weights depend on.
ARCH_KEYS = ("backbone", "n_mode")


def save_checkpoint(state, path):
    save_torch(state, path)


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        run = path.parent.parent
        have = sorted(p.name for p in path.parent.glob("*.pth")) if path.parent.is_dir() else []
        raise UserError(
            f"no checkpoint {path}. " + (f"The run has {have}; pick one with mode=best|last."
                                         if have else f"{run} holds no trained model: train first "
                                         f"(python train.py ...), or check path=..."))
    ckpt = load_torch(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a ma-sbir checkpoint (no 'model' and 'config' entries).")
    return ckpt


def check_compatible(saved_cfg, cfg, path):
    """Refuse to load weights into a model built with different architecture settings."""
    saved, now = saved_cfg.get("model", {}), cfg.get("model", {})
    diff = [f"model.{k}: checkpoint {saved.get(k)!r}, config {now.get(k)!r}"
            for k in ARCH_KEYS if str(saved.get(k)) != str(now.get(k))]
    if diff:
        raise UserError(f"checkpoint {path} was trained with another model config ({'; '.join(diff)}). "
                        f"Use the checkpoint's settings or start a new run.")
