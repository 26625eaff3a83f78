"""The image cache learns the input geometry from open_clip's configs, not from a built model:
`python -m data.cache` with the default (pretrained ViT-B-32) model builds offline, no weights."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.cache import geometry_key, pixel_ops
from data.geometry import preprocess_config, transforms
from model.backbone import create_backbone
from runtime.errors import UserError

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("backbone,pretrained", [("ma-tiny", None), ("ViT-B-32", "openai")])
def test_geometry_is_what_the_built_model_preprocesses_with(backbone, pretrained):
    train_tf, eval_tf = transforms(backbone, pretrained)
    _, built_train, built_eval, _ = create_backbone(backbone, pretrained, load_weights=False)
    assert repr(train_tf) == repr(built_train)
    assert geometry_key(pixel_ops(eval_tf)) == geometry_key(pixel_ops(built_eval))


def test_a_pretrained_tag_brings_its_own_normalisation_and_resize():
    cfg = preprocess_config("ViT-B-16-SigLIP", "webli")  # open_clip: mean = std = 0.5, squash
    assert (cfg.mean, cfg.std, cfg.resize_mode) == ((0.5,) * 3, (0.5,) * 3, "squash")
    assert preprocess_config("ma-tiny").size == (64, 64)


def test_an_unknown_backbone_is_one_clear_error():
    with pytest.raises(UserError, match="unknown backbone 'ViT-Q-99'"):
        transforms("ViT-Q-99")


@pytest.mark.slow
def test_data_cache_with_the_default_model_needs_no_weights_and_no_network(demo_root, tmp_path):
    empty = tmp_path / "home"  # no open_clip / Hugging Face cache: any weight read would fail
    env = dict(
        os.environ,
        HOME=str(empty),
        HF_HOME=str(empty / "hf"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        XDG_CACHE_HOME=str(empty / "cache"),
    )
    cache = tmp_path / "cache"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "data.cache",
            "dataset=demo",
            f"dataset.root={demo_root}",
            f"dataset.cache={cache}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert any(cache.rglob("*.u8")), "no shard written"
