"""Never lose a run: resume equals a straight run; SIGTERM saves last.pth; non-finite loss stops."""

import os
import signal

import pytest
import torch

from pipeline.train import train
from runs.folder import resume_config
from runtime.errors import UserError


def weights(run):
    return torch.load(run / "model" / "last.pth", weights_only=True)["model"]


@pytest.mark.slow
def test_resume_equals_straight_run(tmp_path, tiny_train_cfg):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(tiny_train_cfg("train.epochs=2"), straight)
    train(tiny_train_cfg("train.epochs=1"), stopped)
    assert torch.load(stopped / "model" / "last.pth", weights_only=True)["epoch"] == 1
    result = train(resume_config(stopped, ["train.epochs=2", f"resume={stopped}"]), stopped)
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    a, b = weights(straight), weights(stopped)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    log = (stopped / "train.log").read_text()
    assert "resumed from" in log and "epoch 2 done" in log


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_and_exits(tmp_path, tiny_train_cfg):
    run = tmp_path / "run"

    original = torch.optim.AdamW.step

    def step_then_signal(self, *a, **k):
        out = original(self, *a, **k)
        if not getattr(step_then_signal, "sent", False):  # a kill after the first step
            step_then_signal.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    torch.optim.AdamW.step = step_then_signal
    try:
        with pytest.raises(SystemExit) as stop:
            train(tiny_train_cfg("train.epochs=3"), run)
    finally:
        torch.optim.AdamW.step = original
    assert stop.value.code == 128 + signal.SIGTERM
    ckpt = torch.load(run / "model" / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["batch_in_epoch"] == 1 and ckpt["step"] == 1
    result = train(resume_config(run, ["train.epochs=1"]), run)
    assert result["history"][-1]["epoch"] == 1


@pytest.mark.slow
def test_nonfinite_loss_stops_with_a_message_and_keeps_last_good(
    tmp_path, tiny_train_cfg, monkeypatch
):
    run = tmp_path / "run"
    train(tiny_train_cfg(), run)
    good = weights(run)
    from model.loss import ModalityAwareLoss

    real = ModalityAwareLoss.__call__

    def poisoned(*a, **k):
        total, losses = real(*a, **k)
        return total * float("nan"), losses

    monkeypatch.setattr(ModalityAwareLoss, "__call__", poisoned)
    with pytest.raises(UserError, match=r"non-finite loss at epoch 2, step \d+: total=nan, clip="):
        train(resume_config(run, ["train.epochs=2"]), run)
    for k, v in weights(run).items():
        assert torch.equal(v, good[k])


@pytest.mark.slow
def test_resume_continues_the_same_wandb_run(tmp_path, tiny_train_cfg, monkeypatch):
    wandb = pytest.importorskip("wandb")  # a declared dependency; optional at run time
    calls = []

    class FakeRun:
        id = "run-abc123"

        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    def fake_init(**kwargs):
        calls.append(kwargs)
        return FakeRun()

    monkeypatch.setattr(wandb, "init", fake_init)
    run = tmp_path / "run"
    train(tiny_train_cfg("logger.wandb.mode=offline"), run)
    train(resume_config(run, ["train.epochs=2"]), run)
    assert calls[0]["id"] is None and calls[1]["id"] == "run-abc123"
    assert calls[1]["resume"] == "allow" and calls[1]["dir"] == str(run)


@pytest.mark.slow
def test_sigterm_mid_epoch_with_workers_resumes_exactly(tmp_path, tiny_train_cfg):
    """Augmentation draws from (seed, epoch, sample index), so loader workers do not change the
    stream: SIGTERM in the middle of an epoch, then resume, equals a straight run."""
    cfg = ("train.epochs=1", "train.batch_size=16", "train.num_workers=2", "dataset.augment=true")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(tiny_train_cfg(*cfg), straight)
    original, calls = torch.optim.AdamW.step, {"n": 0}

    def signal_at_step_5(self, *a, **k):
        out = original(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    torch.optim.AdamW.step = signal_at_step_5
    try:
        with pytest.raises(SystemExit):
            train(tiny_train_cfg(*cfg), stopped)
    finally:
        torch.optim.AdamW.step = original
    assert torch.load(stopped / "model" / "last.pth", weights_only=True)["batch_in_epoch"] == 5
    train(resume_config(stopped, []), stopped)
    a, b = weights(straight), weights(stopped)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.slow
def test_a_stop_inside_an_accumulation_window_resumes_exactly(
    tmp_path, tiny_train_cfg, monkeypatch
):
    """SIGTERM on the first micro-batch of a window: the run finishes the window, saves at its
    boundary, and the resumed run equals a straight one."""
    from model.loss import ModalityAwareLoss

    cfg = ("train.epochs=1", "train.batch_size=16", "train.accum_steps=2")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(tiny_train_cfg(*cfg), straight)
    real, calls = ModalityAwareLoss.__call__, {"n": 0}

    def signal_on_third_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(ModalityAwareLoss, "__call__", signal_on_third_batch)
    with pytest.raises(SystemExit):
        train(tiny_train_cfg(*cfg), stopped)
    monkeypatch.setattr(ModalityAwareLoss, "__call__", real)
    ckpt = torch.load(stopped / "model" / "last.pth", weights_only=True)
    assert ckpt["batch_in_epoch"] == 4 and ckpt["step"] == 2
    train(resume_config(stopped, []), stopped)
    a, b = weights(straight), weights(stopped)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
