import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data.demo import generate  # noqa: E402


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small copy of the demo dataset (8 photos and 8 sketches per class)."""
    return generate(tmp_path_factory.mktemp("data") / "demo", n_photo=8, n_sketch=8)


def compose_cfg(name, overrides=()):
    with initialize_config_dir(config_dir=str(REPO / "setting"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


@pytest.fixture
def tiny_train_cfg(demo_root):
    """The real training config, shrunk: tiny model, small demo data, 1 epoch, CPU."""
    def make(*overrides):
        return compose_cfg("config-train", [
            "dataset=demo", "model=tiny", f"dataset.root={demo_root}", "train.epochs=1",
            "train.batch_size=32", "train.num_workers=0", "train.warmup_steps=2", "device=cpu",
            "logger.wandb.mode=disabled", "eval.chunk_size=64", *overrides])
    return make


def folder_dataset(demo_root, data, classes=("apple", "star", "house", "moon", "kite", "sun"), unseen=("kite", "sun")):
    """A user's own folder dataset (photo/<cls>, sketch/<cls>, unseen.txt) made of demo classes."""
    import shutil
    for sub in ("photo", "sketch"):
        for cls in classes:
            shutil.copytree(demo_root / sub / cls, data / sub / cls)
    (data / "unseen.txt").write_text("".join(f"{c}\n" for c in unseen))
    return data
