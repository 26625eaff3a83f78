"""Demo data, the folder layout, splits and their errors."""

import hashlib
import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from data.layouts import resolve_name
from data.demo import POSES, UNSEEN, draw_photo, generate
from data.index import build_index, make_splits
from runtime.errors import UserError


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_is_deterministic_and_laid_out_like_real_data(tmp_path):
    a = generate(tmp_path / "a", n_photo=2, n_sketch=2)
    b = generate(tmp_path / "b", n_photo=2, n_sketch=2)
    assert digest(a) == digest(b)
    classes = sorted(p.name for p in (a / "photo").iterdir())
    assert len(classes) >= 20 and set(UNSEEN) < set(classes)
    assert sorted(p.name for p in (a / "sketch").iterdir()) == classes
    assert (a / "unseen.txt").read_text().split() == UNSEEN
    assert len(list((a / "sketch" / "star").glob("*.png"))) == 2


def test_wide_demo_poses_place_small_objects_anywhere_and_unknown_ones_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    wide = [draw_photo("star", rng, with_pose=True, poses="wide")[1] for _ in range(200)]
    scale, shift = np.array([p[0] for p in wide]), np.abs([p[2:4] for p in wide])
    assert 0.3 <= scale.min() and scale.max() <= 0.5 and 0.25 < shift.max() <= 0.3
    v2 = [draw_photo("star", rng, with_pose=True)[1] for _ in range(50)]  # the default
    assert min(p[0] for p in v2) >= 0.6 and np.abs([p[2:4] for p in v2]).max() <= 0.12
    root = generate(tmp_path / "w", n_photo=2, n_sketch=4, poses="wide")
    assert json.loads((root / "demo.json").read_text())["poses"] == "wide"
    with pytest.raises(UserError, match=r"demo poses 'bent' unknown; choose one of v2, wide"):
        generate(tmp_path / "x", n_photo=2, n_sketch=2, poses="bent")
    assert not (tmp_path / "x").exists() and set(POSES) == {"v2", "wide"}


def dcfg(root, **kw):
    return OmegaConf.create(
        dict(
            train_idx=["folder"],
            test_idx="folder",
            root=str(root),
            split=None,
            unseen_file=None,
            cls_ratio=0.8,
            split_seed=0,
            csv={},
            **kw,
        )
    )


def test_zero_shot_split_keeps_unseen_classes_out_of_training(demo_root):
    splits = make_splits(dcfg(demo_root))
    test_classes = {r["cls"] for _, r in splits.test}
    assert test_classes == set(UNSEEN)
    assert not test_classes & set(splits.train_classes + splits.val_classes)
    assert not {r["cls"] for _, r in splits.train} & test_classes
    assert len(splits.val_classes) == round(0.2 * 19) and splits.val
    first = build_index("folder", dcfg(demo_root))
    row = next(r for r in first.rows if r["cls"] == "kite" and r["m1"] == 1)
    assert row["text"] == "a photo of a kite." and row["m2"] == 3
    assert row["img_path"].startswith("sketch/kite/")
    # labels: seen classes sorted first, then unseen in split-file order, counted from 1
    assert row["label"] == len(first.seen) + 1 + UNSEEN.index("kite")


def test_names_and_indices():
    assert [resolve_name(i) for i in (0, 1, 2, "Sketchy", "demo")] == [
        "tuberlin",
        "quickdraw",
        "sketchy",
        "sketchy",
        "demo",
    ]
    with pytest.raises(UserError, match="unknown dataset 7"):
        resolve_name(7)


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist.*dataset.root"):
        build_index("folder", dcfg(tmp_path / "nope"))


def test_unknown_class_in_split_file(tmp_path, demo_root):
    bad = tmp_path / "unseen.txt"
    bad.write_text("kite\nunicorn\n")
    with pytest.raises(UserError, match=r"\['unicorn'\]"):
        build_index("folder", OmegaConf.merge(dcfg(demo_root), {"unseen_file": str(bad)}))


def test_empty_training_split_is_an_error(tmp_path, demo_root):
    every = tmp_path / "all.txt"
    every.write_text("\n".join(p.name for p in (demo_root / "photo").iterdir()))
    with pytest.raises(UserError, match="training split is empty"):
        make_splits(OmegaConf.merge(dcfg(demo_root), {"unseen_file": str(every), "cls_ratio": 1.0}))
