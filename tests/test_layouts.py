"""Every supported on-disk layout, seed CSVs, the checker, and one clear error per bad input."""

import logging

import pytest
from omegaconf import OmegaConf
from PIL import Image

from data.check import check_dataset, format_report
from data.check import main as check_main
from data.index import build_index, make_splits
from data.loader import PromptTable, SketchPhotoDataset
from runtime.errors import UserError

CLASSES = ["cow", "door", "fire hydrant", "tree"]


def make_tree(root, sketch_dirs, photo_dirs, classes=CLASSES, ext=("png", "jpg"), n=2, real=False):
    for dirs, e in ((sketch_dirs, ext[0]), (photo_dirs, ext[1])):
        for d in dirs:
            for cls in classes:
                folder = root / d / cls
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    path = folder / f"{d.replace('/', '_')}_{i}.{e}"
                    if real:
                        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(path)
                    else:
                        path.touch()
    return root


def cfg_for(name, root, split_file, **kw):
    kw.setdefault("csv", {})
    return OmegaConf.create(
        dict(
            train_idx=[name],
            test_idx=name,
            root={name: str(root)},
            split=None,
            unseen_file=str(split_file),
            cls_ratio=1.0,
            split_seed=0,
            **kw,
        )
    )


LAYOUTS = [
    ("sketchy", ["sketch/tx_000000000000"], ["extended_photo"]),
    ("sketchy", ["sketch/tx_000000000000"], ["photo/tx_000000000000"]),
    ("tuberlin", ["png"], ["ImageResized"]),
    ("tuberlin", ["sketches"], ["images"]),
    ("tuberlin", ["train/sketch", "test/sketch"], ["train/photo", "test/photo"]),
    ("quickdraw", ["sketch"], ["images"]),
    ("quickdraw", ["sketches"], ["images"]),
    ("quickdraw", ["QuickDraw_sketches_final"], ["QuickDraw_images_final"]),
]


@pytest.mark.parametrize("name,sketch_dirs,photo_dirs", LAYOUTS)
def test_layout_variants(tmp_path, name, sketch_dirs, photo_dirs):
    root = make_tree(tmp_path / "data", sketch_dirs, photo_dirs)
    split = tmp_path / "unseen.txt"
    split.write_text("fire_hydrant\ntree\n")
    ix = build_index(name, cfg_for(name, root, split))
    assert ix.seen == ["cow", "door"] and ix.unseen == ["fire_hydrant", "tree"]
    per_class = 2 * len(sketch_dirs)
    test = ix.rows_of(ix.unseen)
    assert (
        sum(r["m1"] == 1 for r in test) == 2 * per_class
        and sum(r["m1"] == 0 for r in test) == 2 * per_class
    )
    hydrant = next(r for r in test if r["cls"] == "fire_hydrant")
    assert (
        "fire hydrant" in hydrant["text"] and hydrant["img_path"].split("/")[-2] == "fire hydrant"
    )


def test_sketchy_counts_extended_photos_once(tmp_path):
    root = make_tree(
        tmp_path, ["sketch/tx_000000000000"], ["extended_photo", "photo/tx_000000000000"]
    )
    split = tmp_path / "u.txt"
    split.write_text("tree\n")
    ix = build_index("sketchy", cfg_for("sketchy", root, split))
    assert all(r["img_path"].startswith(("extended_photo/", "sketch/")) for r in ix.rows)


def test_environment_variable_gives_the_root(tmp_path, monkeypatch):
    root = make_tree(tmp_path, ["sketch"], ["images"])
    split = tmp_path / "u.txt"
    split.write_text("tree\n")
    monkeypatch.setenv("MA_SBIR_QUICKDRAW", str(root))
    dcfg = cfg_for("quickdraw", root, split)
    dcfg.root = {"quickdraw": None}
    assert build_index(1, dcfg).root == root


def test_wrong_layout_is_a_clear_error(tmp_path):
    make_tree(tmp_path, ["drawings"], ["pictures"])
    with pytest.raises(
        UserError, match=r"does not look like sketchy: no photo folder.*extended_photo"
    ):
        build_index("sketchy", cfg_for("sketchy", tmp_path, tmp_path / "u.txt"))


def test_builtin_splits_and_unknown_split(tmp_path):
    from data.layouts import read_class_list, split_file

    assert len(read_class_list(split_file("sketchy", None))) == 21
    assert len(read_class_list(split_file("sketchy", "sketchy_25"))) == 25
    assert len(read_class_list(split_file("tuberlin", None))) == 30
    assert len(read_class_list(split_file("tuberlin", "tuberlin_sake30"))) == 30
    assert len(read_class_list(split_file("quickdraw", None))) == 30
    with pytest.raises(UserError, match="unknown split 'sketchy_99'.*sketchy_21"):
        split_file("sketchy", "sketchy_99")


def test_tuberlin_sake_split_matches_the_download_spelling(tmp_path):
    """SAKE's list names classes as TU-Berlin's folders do ('bottle opener', 'frying-pan')."""
    from data.layouts import read_class_list, split_file

    sake = read_class_list(split_file("tuberlin", "tuberlin_sake30"))
    folders = ["airplane", "zebra", "bottle opener", "frying-pan", "t-shirt", "hot air balloon"]
    folders += [
        c for c in sake if c not in ("bottle_opener", "frying-pan", "t-shirt", "hot_air_balloon")
    ]
    root = make_tree(tmp_path, ["png"], ["ImageResized"], classes=folders, n=1)
    dcfg = cfg_for("tuberlin", root, None)
    dcfg.split, dcfg.unseen_file = "tuberlin_sake30", None
    ix = build_index("tuberlin", dcfg)
    assert ix.seen == ["airplane", "zebra"] and len(ix.unseen) == 30
    assert {r["img_path"].split("/")[-2] for r in ix.rows_of(ix.unseen)} == set(folders[2:])
    assert set(sake) != set(read_class_list(split_file("tuberlin", None)))


def write_csv(path, rows):
    path.write_text(
        "img_path,text,m1,m2,label\n" + "".join(",".join(map(str, r)) + "\n" for r in rows)
    )
    return path


def test_seed_csvs_load(tmp_path):
    root = make_tree(
        tmp_path / "d",
        ["sketch/tx_000000000000"],
        ["extended_photo"],
        classes=["cow", "tree"],
        n=1,
        real=True,
    )
    train = write_csv(
        tmp_path / "train.csv",
        [
            ("extended_photo/cow/extended_photo_0.jpg", "a photo of a cow.", 0, 3, 1),
            (
                "sketch/tx_000000000000/cow/sketch_tx_000000000000_0.png",
                "a photo of a cow.",
                1,
                3,
                1,
            ),
        ],
    )
    test = write_csv(
        tmp_path / "test.csv",
        [
            ("extended_photo/tree/extended_photo_0.jpg", "a photo of a tree.", 0, 3, 2),
            (
                "sketch/tx_000000000000/tree/sketch_tx_000000000000_0.png",
                "a photo of a tree.",
                1,
                3,
                2,
            ),
        ],
    )
    dcfg = cfg_for(
        "sketchy", root, tmp_path / "unused.txt", csv=dict(train=str(train), test=str(test))
    )
    dcfg.unseen_file = None
    splits = make_splits(dcfg)
    assert [r["cls"] for _, r in splits.test] == ["tree", "tree"] and len(splits.train) == 2


@pytest.mark.parametrize("bad_path", ["../outside.png", "/etc/passwd"])
def test_csv_path_leaving_root_is_rejected(tmp_path, bad_path):
    test = write_csv(tmp_path / "test.csv", [(bad_path, "a photo of a x.", 1, 3, 1)])
    dcfg = cfg_for("sketchy", tmp_path, tmp_path / "u.txt", csv=dict(train=None, test=str(test)))
    with pytest.raises(UserError, match=r"test.csv line 2: image path .* leaves the dataset root"):
        build_index("sketchy", dcfg)


def test_corrupt_image_named_by_loader_and_checker(tmp_path):
    root = make_tree(
        tmp_path / "d", ["sketch"], ["photo"], classes=["cow", "tree", "door"], real=True
    )
    (root / "unseen.txt").write_text("tree\n")
    bad = root / "photo" / "tree" / "photo_1.jpg"
    bad.write_bytes(b"not a jpeg at all")
    (root / "photo" / "cow" / "notes.txt").write_text("hello")
    dcfg = OmegaConf.create(
        dict(
            train_idx=["folder"],
            test_idx="folder",
            root=str(root),
            split=None,
            unseen_file=None,
            cls_ratio=1.0,
            split_seed=0,
            csv={},
        )
    )
    splits = make_splits(dcfg)
    ds = SketchPhotoDataset(splits.test, lambda im: im, PromptTable(splits.test, lambda t: t))
    i = next(
        k for k, (_, r) in enumerate(splits.test) if r["img_path"].endswith("tree/photo_1.jpg")
    )
    with pytest.raises(UserError, match=f"cannot read image {bad}"):
        ds[i]
    report = check_dataset(dcfg, progress=False)
    text = format_report(report)
    assert f"unreadable image {bad}" in text and "notes.txt" in text
    assert "test: 1 classes, 2 photos, 2 sketches" in text


def test_checker_exit_codes_and_empty_class(tmp_path, capsys):
    root = make_tree(
        tmp_path / "d", ["sketch"], ["photo"], classes=["cow", "tree", "door"], real=True
    )
    (root / "unseen.txt").write_text("tree\n")
    assert check_main(["dataset=folder", f"dataset.root={root}"]) == 0
    for f in (root / "sketch" / "tree").iterdir():
        f.unlink()
    assert check_main(["dataset=folder", f"dataset.root={root}", "check.decode=false"]) == 1
    assert "['tree'] have no sketch images" in capsys.readouterr().out


def test_sake_cname_cid_files_read_as_class_lists(tmp_path):
    from data.layouts import read_class_list

    f = tmp_path / "cname_cid_zero.txt"
    f.write_text("fire hydrant 0\nteddy-bear 1\ntree\n")
    assert read_class_list(f) == ["fire_hydrant", "teddy-bear", "tree"]


def test_csv_row_with_missing_image_errors_or_is_skipped(tmp_path):
    root = make_tree(tmp_path / "d", ["sketch"], ["photo"], classes=["tree"], n=1)
    test = write_csv(
        tmp_path / "test.csv",
        [
            ("photo/tree/photo_0.jpg", "a photo of a tree.", 0, 3, 1),
            ("photo/tree/gone.png", "a photo of a tree.", 0, 3, 1),
        ],
    )
    dcfg = cfg_for("sketchy", root, tmp_path / "u.txt", csv=dict(train=None, test=str(test)))
    with pytest.raises(
        UserError, match=r"test.csv line 3: image .*gone.png does not exist.*on_bad_image=skip"
    ):
        build_index("sketchy", dcfg)
    dcfg.on_bad_image = "skip"
    ix = build_index("sketchy", dcfg)
    assert [r["img_path"] for r in ix.rows] == ["photo/tree/photo_0.jpg"] and ix.skipped == [
        "photo/tree/gone.png"
    ]


def test_on_bad_image_skip_leaves_out_and_counts_corrupt_images(tmp_path):
    root = make_tree(
        tmp_path / "d", ["sketch"], ["photo"], classes=["cow", "tree", "door"], real=True
    )
    (root / "unseen.txt").write_text("tree\n")
    (root / "photo" / "cow" / "photo_0.jpg").write_bytes(b"garbage")
    dcfg = OmegaConf.create(
        dict(
            train_idx=["folder"],
            test_idx="folder",
            root=str(root),
            split=None,
            unseen_file=None,
            cls_ratio=1.0,
            split_seed=0,
            csv={},
            on_bad_image="skip",
        )
    )
    records, handler = [], logging.Handler()
    handler.emit = records.append
    logging.getLogger("ma_sbir").addHandler(handler)
    try:
        splits = make_splits(dcfg)
    finally:
        logging.getLogger("ma_sbir").removeHandler(handler)
    said = [r.getMessage() for r in records]
    assert any(
        "left out 1 unreadable training image(s)" in m and "photo_0.jpg" in m for m in said
    ), said
    assert len(splits.train) == 7 and not any(
        r["img_path"] == "photo/cow/photo_0.jpg" for _, r in splits.train
    )
