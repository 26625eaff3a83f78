"""The entry points as a user runs them: bad input gives exit code 1, one readable message and
no partial output."""

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from model.checkpoint import check_compatible
from tests.conftest import REPO, compose_cfg, folder_dataset
from runtime.errors import UserError


def run(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_mistyped_config_key(tmp_path):
    p = run("train.py", "train.epoch=3", f"hydra.run.dir={tmp_path / 'r'}")
    assert p.returncode == 1 and "Could not override 'train.epoch'" in p.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "script, override, message",
    [
        (
            "train.py",
            "train.epochs=abc",
            "Value 'abc' of type 'str' could not be converted to Integer",
        ),
        ("infer.py", "batch_size=1.5", "could not be converted to Integer"),
        ("evaluate.py", "eval.generalized=maybe", "is not a valid bool"),
    ],
)
@pytest.mark.slow
def test_a_wrong_type_stops_each_entry_point_at_composition(tmp_path, script, override, message):
    p = (
        run(script, override, "path=x", f"hydra.run.dir={tmp_path / 'r'}")
        if script != "train.py"
        else run(script, override, f"hydra.run.dir={tmp_path / 'r'}")
    )
    assert p.returncode == 1 and override.split("=")[0] in p.stderr and message in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_missing_dataset_root_leaves_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MA_SBIR_SKETCHY", raising=False)
    p = run(
        "train.py",
        "dataset=sketchy",
        "logger.wandb.mode=disabled",
        f"hydra.run.dir={tmp_path / 'r'}",
    )
    assert p.returncode == 1
    assert (
        "error: no root folder given for dataset 'sketchy'. Pass dataset.root.sketchy=" in p.stderr
    )
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_infer_on_run_without_checkpoint(tmp_path):
    (tmp_path / "config.yaml").write_text("dataset: {test_idx: demo}\n")
    p = run("infer.py", f"path={tmp_path}")
    assert (
        p.returncode == 1 and "holds no trained model" in p.stderr and "Traceback" not in p.stderr
    )
    assert not (tmp_path / "infer_output").exists()


@pytest.mark.slow
def test_evaluate_without_infer_output(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "config.yaml").write_text("dataset: {test_idx: 2}\n")
    p = run("evaluate.py", f"path={tmp_path}", "dataset.test_idx=2")
    assert p.returncode == 1 and "run `python infer.py" in p.stderr


def test_checkpoint_from_another_model_config_is_refused():
    saved = {"model": {"backbone": "ma-tiny", "n_mode": 4}}
    with pytest.raises(UserError, match=r"model.n_mode: checkpoint 4, config 5"):
        check_compatible(
            saved, OmegaConf.create({"model": {"backbone": "ma-tiny", "n_mode": 5}}), "x.pth"
        )
    with pytest.raises(UserError, match=r"model.backbone: checkpoint 'ma-tiny', config 'ViT-B-32'"):
        check_compatible(
            saved, OmegaConf.create({"model": {"backbone": "ViT-B-32", "n_mode": 4}}), "x.pth"
        )


@pytest.mark.slow
def test_infer_with_checkpoint_not_matching_its_config(tmp_path, demo_root):
    from model.backbone import build_model

    cfg = compose_cfg(
        "config-train",
        ["model=tiny", "dataset=demo", f"dataset.root={demo_root}", "dataset.cls_ratio=1.0"],
    )
    state = build_model(cfg.model)[0].state_dict()
    state["modes.weight"] = torch.zeros(5, 128)  # weights of a 5-mode model
    (tmp_path / "model").mkdir()
    torch.save(
        dict(model=state, config=OmegaConf.to_container(cfg), epoch=1),
        tmp_path / "model" / "best.pth",
    )
    p = run("infer.py", f"path={tmp_path}", "num_workers=0")
    assert p.returncode == 1 and "does not fit the model its config describes" in p.stderr
    assert not (tmp_path / "infer_output").exists()


@pytest.mark.slow
def test_folder_dataset_train_infer_evaluate_from_the_command_line(tmp_path, demo_root):
    """A user's own folder: after training, infer and evaluate need only path=<run>."""
    import json

    data = folder_dataset(demo_root, tmp_path / "mydata")
    run_dir = tmp_path / "run"
    p = run(
        "train.py",
        "dataset=folder",
        f"dataset.root={data}",
        "model=tiny",
        "train.epochs=1",
        "train.batch_size=16",
        "train.num_workers=0",
        "dataset.cls_ratio=0.75",
        "device=cpu",
        "logger.wandb.mode=disabled",
        f"hydra.run.dir={run_dir}",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    p = run("infer.py", f"path={run_dir}", "num_workers=0", "device=cpu")
    assert p.returncode == 0, p.stderr[-2000:]
    p = run("evaluate.py", f"path={run_dir}", "eval.device=cpu")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "mAP@all" in p.stdout and "report.html" in p.stdout
    result = json.loads(
        (run_dir / "infer_output" / "best" / "folder" / "eval_result.json").read_text()
    )
    assert set(result["per_class_AP"]) == {"kite", "sun"} and result["n_queries"] == 16
