"""The compute device, seeding and mixed precision of train, infer, evaluate and search."""

import random
from contextlib import nullcontext

import numpy as np
import torch

from runtime.errors import UserError


def pick_device(name="auto"):
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(
            f"unknown device {name!r} ({e}). Use auto, cpu, cuda or cuda:<index>."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"device {name!r} asked for, but PyTorch sees no CUDA GPU here. "
            f"Use device=auto (GPU when present, else CPU) or device=cpu."
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise UserError(
            f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible."
        )
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
