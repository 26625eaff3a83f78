"""Training loop details: gradient accumulation, skipping non-finite batches, wandb fallback."""
import logging
import sys

import pytest
import torch

from utils import runtime
from model.optim import lr_lambda
from model.trainer import train


def test_gradient_accumulation_takes_one_step_per_accum_batches(tmp_path, tiny_train_cfg):
    plain = train(tiny_train_cfg("train.batch_size=16"), tmp_path / "a")
    accum = train(tiny_train_cfg("train.batch_size=16", "train.accum_steps=2"), tmp_path / "b")
    # 8 photos + 8 sketches x 16 training classes = 256 images: 16 batches of 16
    assert plain["history"][0]["step"] == 16 and accum["history"][0]["step"] == 8


def test_nonfinite_batches_are_skipped_and_counted(tmp_path, tiny_train_cfg, monkeypatch):
    import model.modality as modality
    real, calls = modality.compute_losses, {"n": 0}

    def every_other_nan(*a, **k):
        total, losses = real(*a, **k)
        calls["n"] += 1
        return (total * float("nan"), losses) if calls["n"] % 2 == 0 else (total, losses)
    monkeypatch.setattr(modality, "compute_losses", every_other_nan)
    result = train(tiny_train_cfg("train.batch_size=32", "train.on_nonfinite=skip"), tmp_path / "r")
    assert result["history"][0]["step"] == 4  # 8 batches, every second one skipped
    assert "non-finite loss at step" in (tmp_path / "r" / "train.log").read_text()
    state = torch.load(tmp_path / "r" / "model" / "last.pth", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_wandb_falls_back_instead_of_failing(tmp_path, tiny_train_cfg, monkeypatch):
    wandb = pytest.importorskip("wandb")  # a declared dependency; optional at run time
    modes = []

    def no_network(mode, **kwargs):
        modes.append(mode)
        raise wandb.errors.CommError("network unreachable")
    monkeypatch.setattr(wandb, "init", no_network)
    cfg = tiny_train_cfg("logger.wandb.mode=online")
    assert runtime.init_wandb(cfg, tmp_path, None) is None
    assert modes == ["online", "offline"]


def test_missing_wandb_logs_to_train_log_only(tmp_path, tiny_train_cfg, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    cfg = tiny_train_cfg("logger.wandb.mode=offline")
    with caplog.at_level(logging.WARNING):
        assert runtime.init_wandb(cfg, tmp_path, None) is None
    assert "wandb is not installed" in caplog.text


def test_warmup_then_constant_or_linear():
    f = lr_lambda(warmup=4, total=10, schedule="constant")
    assert [f(s) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]
    g = lr_lambda(warmup=4, total=10, schedule="linear")
    assert g(0) == 0.25 and g(4) == 1.0 and g(7) == 0.5 and g(10) == 0.0
