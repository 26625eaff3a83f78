"""pytest fixtures: the metric engine's two rankers, the small generated demo dataset, the real
configs composed and shrunk (model=tiny), a user folder dataset."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data.demo import generate  # noqa: E402
from metrics import rank_kernel  # noqa: E402
from config.schema import compose_config  # noqa: E402


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small copy of the demo dataset (8 photos and 8 sketches per class)."""
    return generate(tmp_path_factory.mktemp("data") / "demo", n_photo=8, n_sketch=8)


def compose_cfg(name, overrides=()):
    return compose_config(name, overrides)


def tiny_model_cfg(**values):
    """model=tiny of the real config, with `values` as model.<key>=<value> overrides."""
    return compose_cfg(
        "config-train",
        ["model=tiny"] + [f"model.{k}={'null' if v is None else v}" for k, v in values.items()],
    ).model


@pytest.fixture
def tiny_train_cfg(demo_root):
    """The real training config, shrunk: tiny model, small demo data, 1 epoch, CPU."""

    def make(*overrides):
        return compose_cfg(
            "config-train",
            [
                "dataset=demo",
                "model=tiny",
                f"dataset.root={demo_root}",
                "train.epochs=1",
                "train.batch_size=32",
                "train.num_workers=0",
                "train.warmup_steps=2",
                "device=cpu",
                "logger.wandb.mode=disabled",
                "eval.chunk_size=64",
                *overrides,
            ],
        )

    return make


def folder_dataset(
    demo_root,
    data,
    classes=("apple", "star", "house", "moon", "kite", "sun"),
    unseen=("kite", "sun"),
):
    """A user's own folder dataset (photo/<cls>, sketch/<cls>, unseen.txt) made of demo classes."""
    import shutil

    for sub in ("photo", "sketch"):
        for cls in classes:
            shutil.copytree(demo_root / sub / cls, data / sub / cls)
    (data / "unseen.txt").write_text("".join(f"{c}\n" for c in unseen))
    return data


@pytest.fixture(params=["kernel", "torch"])
def ranker(request, monkeypatch):
    """The engine with its CPU kernel (numba), and with the torch ranking that a GPU runs."""
    if request.param == "torch":
        monkeypatch.setattr(rank_kernel, "kernel", lambda: None)
    else:
        assert rank_kernel.kernel() is not None, (
            "numba is in requirements.txt: the kernel must compile"
        )
    return request.param
