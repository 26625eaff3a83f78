"""Training loop details: gradient accumulation, skipping non-finite batches, wandb fallback."""

import logging
import sys

import pytest
import torch

from runtime import logs
from model.optim import lr_lambda
from pipeline.train import train


@pytest.mark.slow
def test_gradient_accumulation_takes_one_step_per_accum_batches(tmp_path, tiny_train_cfg):
    plain = train(tiny_train_cfg("train.batch_size=16"), tmp_path / "a")
    accum = train(tiny_train_cfg("train.batch_size=16", "train.accum_steps=2"), tmp_path / "b")
    # 8 photos + 8 sketches x 16 training classes = 256 images: 16 batches of 16
    assert plain["history"][0]["step"] == 16 and accum["history"][0]["step"] == 8


@pytest.mark.slow
def test_nonfinite_batches_are_skipped_and_counted(tmp_path, tiny_train_cfg, monkeypatch):
    from model.loss import ModalityAwareLoss

    real, calls = ModalityAwareLoss.__call__, {"n": 0}

    def every_other_nan(*a, **k):
        total, losses = real(*a, **k)
        calls["n"] += 1
        return (total * float("nan"), losses) if calls["n"] % 2 == 0 else (total, losses)

    monkeypatch.setattr(ModalityAwareLoss, "__call__", every_other_nan)
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
    assert logs.init_wandb(cfg, tmp_path, None) is None
    assert modes == ["online", "offline"]


def test_missing_wandb_logs_to_train_log_only(tmp_path, tiny_train_cfg, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    cfg = tiny_train_cfg("logger.wandb.mode=offline")
    with caplog.at_level(logging.WARNING):
        assert logs.init_wandb(cfg, tmp_path, None) is None
    assert "wandb is not installed" in caplog.text


def test_warmup_then_constant_or_linear():
    f = lr_lambda(warmup=4, total=10, schedule="constant")
    assert [f(s) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]
    g = lr_lambda(warmup=4, total=10, schedule="linear")
    assert g(0) == 0.25 and g(4) == 1.0 and g(7) == 0.5 and g(10) == 0.0


@pytest.mark.slow
def test_test_loss_selection_is_the_authors_and_is_labelled(tmp_path, tiny_train_cfg, monkeypatch):
    """train.select=test_loss keeps the epoch with the lowest weighted test-split loss (eval mode,
    fp32; ties go to the later epoch as in the authors' `<=`), and says so everywhere."""
    import pipeline.selection as selection_module
    from pipeline.infer import infer
    from pipeline.evaluate import evaluate
    from tests.conftest import compose_cfg

    losses = iter([0.7, 0.5, 0.5, 0.9])
    monkeypatch.setattr(selection_module, "split_loss", lambda *a, **k: next(losses))
    run = tmp_path / "run"
    result = train(
        tiny_train_cfg("train.epochs=4", "train.select=test_loss", "dataset.cls_ratio=1.0"), run
    )
    assert [h["score"] for h in result["history"]] == [-0.7, -0.5, -0.5, -0.9]
    best = torch.load(run / "model" / "best.pth", weights_only=True)
    assert best["epoch"] == 3 and best["selected_by"] == "test_loss"
    assert "TEST split" in (run / "train.log").read_text()
    assert "select: test_loss" in (run / "config.yaml").read_text()
    infer(compose_cfg("config-infer", [f"path={run}", "device=cpu", "num_workers=0"]))
    out = evaluate(
        compose_cfg("config-eval", [f"path={run}", "eval.device=cpu", "eval.report.enabled=false"])
    )
    assert out["checkpoint_chosen_on_test_data"] is True and out["inference"]["epoch"] == 3


@pytest.mark.slow
def test_split_loss_is_the_mean_of_the_batch_losses_in_eval_mode(tiny_train_cfg, demo_root):
    from data.index import make_splits
    from data.loader import open_image
    from model.backbone import build_model, loss_ratios
    from model.loss import ModalityAwareLoss
    from metrics.validation import split_loss

    cfg = tiny_train_cfg("train.batch_size=24")
    model, _, eval_tf, tok = build_model(cfg.model)
    rows = make_splits(cfg.dataset).test[:50]
    got = split_loss(model, rows, eval_tf, tok, loss_ratios(cfg.model), cfg, torch.device("cpu"))
    model.eval()
    expect = []
    with torch.no_grad():
        for s in range(0, 50, 24):
            part = rows[s : s + 24]
            images = torch.stack([eval_tf(open_image(r0 / r["img_path"])) for r0, r in part])
            z_img = model.encode_image(images)
            z_txt = model.encode_text(tok([r["text"] for _, r in part]))
            m1 = torch.tensor([r["m1"] for _, r in part])
            m2 = torch.tensor([r["m2"] for _, r in part])
            expect.append(
                ModalityAwareLoss(loss_ratios(cfg.model))(model, z_img, z_txt, m1, m2)[0].item()
            )
    assert got == pytest.approx(sum(expect) / len(expect), abs=1e-5)
