"""Bad images, bad splits and bad result files as a hostile user makes them: each is caught where
it enters, with one error line, and nothing is written half-way."""

import io
import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from data.check import check_dataset, format_report
from data.index import make_splits, validation_problem
from data.loader import open_image, unreadable
from pipeline.infer import infer
from pipeline.train import train
from pipeline.evaluate import evaluate
from tests.conftest import REPO, compose_cfg, folder_dataset
from tests.test_layouts import make_tree
from runtime.errors import UserError


def folder_cfg(root, **kw):
    return OmegaConf.create(
        dict(
            train_idx=["folder"],
            test_idx="folder",
            root=str(root),
            split=None,
            unseen_file=None,
            cls_ratio=1.0,
            split_seed=0,
            csv={},
            **kw,
        )
    )


def jpeg_bytes(size=(64, 48), **save):
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "JPEG", **save)
    return buf.getvalue()


def test_truncated_jpeg_is_caught_by_the_check_and_by_skip(tmp_path):
    root = make_tree(
        tmp_path / "d", ["sketch"], ["photo"], classes=["cow", "tree", "door"], real=True
    )
    (root / "unseen.txt").write_text("tree\n")
    bad = root / "photo" / "cow" / "photo_0.jpg"
    full = jpeg_bytes((256, 256))
    bad.write_bytes(full[: len(full) * 6 // 10])
    with Image.open(bad) as im:
        im.verify()  # what the old check did: this passes, the file is still unusable
    assert "truncated" in unreadable(bad)
    assert f"unreadable image {bad}" in format_report(
        check_dataset(folder_cfg(root), progress=False)
    )
    splits = make_splits(folder_cfg(root, on_bad_image="skip"))
    assert not any(r["img_path"] == "photo/cow/photo_0.jpg" for _, r in splits.train)


def test_exif_orientation_and_gif_first_frame(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    path = tmp_path / "rotated.jpg"
    path.write_bytes(jpeg_bytes((64, 48), exif=exif.tobytes()))
    assert open_image(path).size == (48, 64)
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    im = open_image(tmp_path / "anim.gif")
    assert im.mode == "RGB" and im.getpixel((0, 0))[0] > 200  # the first (red) frame


def test_gif_files_are_images_of_a_folder_dataset(tmp_path):
    root = make_tree(tmp_path / "d", ["sketch"], ["photo"], classes=["cow", "tree"], real=True)
    Image.new("RGB", (8, 8)).save(root / "photo" / "cow" / "extra.gif")
    (root / "unseen.txt").write_text("tree\n")
    report = check_dataset(folder_cfg(root), progress=False)
    assert not report.errors and not report.warnings and report.counts["train"]["cow"] == [3, 2]


def test_decompression_bomb_in_training_names_the_limit(tmp_path, tiny_train_cfg):
    with pytest.raises(
        UserError,
        match=r"larger than dataset.max_image_pixels=1000 .*raise dataset.max_image_pixels",
    ):
        train(tiny_train_cfg("dataset.max_image_pixels=1000"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    problem = unreadable(REPO / "docs" / "does-not-exist.png")
    assert problem and "cannot read image" in problem


def test_data_check_reports_bombs_and_counts_every_split_when_training_is_empty(tmp_path):
    root = make_tree(tmp_path / "d", ["sketch"], ["photo"], classes=["tree"], real=True)
    (root / "unseen.txt").write_text("tree\n")
    Image.new("RGB", (100, 100)).save(root / "photo" / "tree" / "big.png")
    text = format_report(check_dataset(folder_cfg(root, max_image_pixels=5000), progress=False))
    assert "big.png is larger than dataset.max_image_pixels=5000" in text
    assert "the training split is empty" in text and "test: 1 classes, 3 photos, 2 sketches" in text


@pytest.mark.slow
def test_a_loader_worker_error_is_one_line(tmp_path, demo_root):
    data = folder_dataset(demo_root, tmp_path / "d", ("apple", "star", "house", "kite"), ("kite",))
    bad = data / "photo" / "star" / sorted(p.name for p in (data / "photo" / "star").iterdir())[0]
    bad.write_bytes(b"broken")
    p = subprocess.run(
        [
            sys.executable,
            "train.py",
            "dataset=folder",
            f"dataset.root={data}",
            "model=tiny",
            "train.num_workers=2",
            "train.batch_size=8",
            "train.epochs=1",
            "device=cpu",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 1, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"cannot read image {bad}" in errors[0]
    assert "Traceback" not in p.stderr and "Caught" not in p.stderr
    # two steps were trained before the bad image: the folder keeps their train.log (issue 24,
    # a failed run that logged work is never removed), and no checkpoint claims more
    assert (tmp_path / "run" / "train.log").is_file()
    assert not (tmp_path / "run" / "model" / "last.pth").exists()


def splits_with(val_classes, val_rows):
    from data.index import Splits

    return Splits([], val_rows, [], [], val_classes, None, {})


@pytest.mark.slow
def test_validation_on_too_few_classes_falls_back_to_last(tmp_path, tiny_train_cfg):
    assert "fewer than 5" in validation_problem(splits_with(["a"], [(None, dict(cls="a", m1=0))]))
    rows = [(None, dict(cls=c, m1=m)) for c in "abcde" for m in (0, 1) if (c, m) != ("e", 1)]
    assert "['e'] lack sketches or photos" in validation_problem(splits_with(list("abcde"), rows))
    result = train(
        tiny_train_cfg("dataset.cls_ratio=0.9", "train.select=val_map"), tmp_path / "run"
    )
    assert (
        result["select"] == "last"
        and "falls back to the last epoch" in (tmp_path / "run" / "train.log").read_text()
    )
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.run.select == "last" and len(saved.run.val_classes) < 5
    report = check_dataset(
        tiny_train_cfg("dataset.cls_ratio=0.9").dataset,
        decode=False,
        progress=False,
        select="val_map",
    )
    assert any("train.select=val_map cannot work: only" in e for e in report.errors)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, demo_root):
    """A tiny run on a folder dataset whose unseen.txt a user can edit afterwards."""
    tmp = tmp_path_factory.mktemp("leak")
    data = folder_dataset(demo_root, tmp / "data")
    run = tmp / "run"
    train(
        compose_cfg(
            "config-train",
            [
                "dataset=folder",
                f"dataset.root={data}",
                "model=tiny",
                "train.epochs=1",
                "train.batch_size=16",
                "train.num_workers=0",
                "device=cpu",
                "dataset.cls_ratio=1.0",
                "logger.wandb.mode=disabled",
            ],
        ),
        run,
    )
    return run, data


@pytest.mark.slow
def test_a_test_split_that_shares_classes_with_training_is_refused_or_labelled(folder_run):
    run, data = folder_run
    (data / "unseen.txt").write_text("kite\napple\n")  # apple was a training class
    try:
        with pytest.raises(UserError, match=r"test class\(es\) \['apple'\] were training classes"):
            infer(compose_cfg("config-infer", [f"path={run}", "device=cpu", "num_workers=0"]))
        out = infer(
            compose_cfg(
                "config-infer",
                [f"path={run}", "device=cpu", "num_workers=0", "allow_class_overlap=true"],
            )
        )
        assert json.loads((out / "infer_meta.json").read_text())["classes_seen_in_training"] == [
            "apple"
        ]
        ecfg = [f"path={run}", "eval.device=cpu", "eval.report.enabled=false"]
        with pytest.raises(UserError, match=r"\['apple'\] were training classes"):
            evaluate(compose_cfg("config-eval", ecfg))
        result = evaluate(compose_cfg("config-eval", ecfg + ["allow_class_overlap=true"]))
        assert result["zero_shot"] is False and result["classes_seen_in_training"] == ["apple"]
    finally:
        (data / "unseen.txt").write_text("kite\nsun\n")


def test_result_files_name_what_they_scored(folder_run):
    run, _ = folder_run
    out = infer(compose_cfg("config-infer", [f"path={run}", "device=cpu", "num_workers=0"]))
    result = evaluate(
        compose_cfg("config-eval", [f"path={run}", "eval.device=cpu", "eval.report.enabled=false"])
    )
    assert result["zero_shot"] is True and result["inference"]["folder"] == str(out)
    assert (
        result["inference"]["selected_by"] == "last"
        and result["checkpoint_chosen_on_test_data"] is False
    )
    saved = json.loads((out / "eval_result.json").read_text())
    assert saved["inference"]["checkpoint"].endswith("model/best.pth")


def test_truncated_checkpoint_names_the_intact_other(folder_run, tmp_path):
    import shutil

    run, _ = folder_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("infer_output"))
    best = copy / "model" / "best.pth"
    best.write_bytes(best.read_bytes()[:1000])
    with pytest.raises(
        UserError,
        match=r"best.pth is damaged or truncated .*last.pth is intact: use it \(mode=last\)",
    ):
        infer(compose_cfg("config-infer", [f"path={copy}", "device=cpu", "num_workers=0"]))
    assert not (copy / "infer_output").exists()
    foreign = copy / "model" / "last.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}}, foreign)
    with pytest.raises(
        UserError, match=r"last.pth is not a ma-sbir checkpoint \(it holds \['state_dict'\]"
    ):
        infer(
            compose_cfg(
                "config-infer", [f"path={copy}", "mode=last", "device=cpu", "num_workers=0"]
            )
        )


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r[3].update(label="seven"), "m1, m2 and label must be integers"),
        (lambda r: r[3].update(m1="7"), "m1=7 is no image mode"),
        (lambda r: [x.pop("label") for x in r], "missing column(s) ['label']"),
    ],
)
def test_evaluate_refuses_an_edited_index(tmp_path, edit, message):
    from tests.test_evaluate import eval_cfg, fake_output
    from runtime.io import save_csv

    out, rows, _ = fake_output(tmp_path)
    rows = [dict(r) for r in rows]
    edit(rows)
    save_csv(
        rows,
        [c for c in ["img_path", "text", "m1", "m2", "label", "split"] if c in rows[0]],
        out / "index.csv",
    )
    with pytest.raises(
        UserError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]"),
    ):
        evaluate(eval_cfg(tmp_path))
    assert not (out / "eval_result.json").exists()


def test_evaluate_refuses_logits_of_the_wrong_width(tmp_path):
    from tests.test_evaluate import eval_cfg, fake_output

    out, _, img = fake_output(tmp_path)
    torch.save(torch.zeros(img.shape[0], 2, 4, 8), out / "converted_logits.pt")
    with pytest.raises(UserError, match=r"expected \[N,d\], \[N,d\] and \[N,2,n_mode,d\]"):
        evaluate(eval_cfg(tmp_path))
    assert not (out / "eval_result.json").exists()


def test_bad_chunk_size_never_overwrites_a_good_result(tmp_path):
    from tests.test_evaluate import eval_cfg, fake_output

    out, _, _ = fake_output(tmp_path)
    evaluate(eval_cfg(tmp_path))
    good = (out / "eval_result.json").read_text()
    with pytest.raises(UserError, match="eval.chunk_size=-1 must be"):
        evaluate(eval_cfg(tmp_path, "eval.chunk_size=-1"))
    assert (out / "eval_result.json").read_text() == good


def test_infer_reads_a_run_while_its_trainer_holds_the_lock(folder_run):
    from runs.folder import RunFolder

    run, _ = folder_run
    holder = RunFolder(run).claim(resume=True)  # as a trainer resuming it would
    try:
        out = infer(
            compose_cfg("config-infer", [f"path={run}", "device=cpu", "num_workers=0", "mode=last"])
        )
    finally:
        holder.release()
    assert (out / "img_logits.pt").is_file()


def test_the_folder_root_hint_names_the_key_that_exists(monkeypatch):
    from data.layouts import resolve_root

    monkeypatch.delenv("MA_SBIR_FOLDER", raising=False)
    with pytest.raises(UserError, match=r"Pass dataset.root=/path/to/data .*MA_SBIR_FOLDER") as err:
        resolve_root("folder", {})
    assert "dataset.root.folder" not in str(err.value)
    with pytest.raises(UserError, match=r"Pass dataset.root.sketchy=/path/to/data"):
        resolve_root("sketchy", {"sketchy": None})


def test_infer_again_removes_the_results_of_the_embeddings_it_replaces(folder_run):
    run, _ = folder_run
    out = infer(compose_cfg("config-infer", [f"path={run}", "device=cpu", "num_workers=0"]))
    evaluate(
        compose_cfg("config-eval", [f"path={run}", "eval.device=cpu", "eval.report.enabled=false"])
    )
    assert (out / "eval_result.json").is_file()
    infer(compose_cfg("config-infer", [f"path={run}", "device=cpu", "num_workers=0"]))
    assert not (out / "eval_result.json").exists()


def test_evaluate_on_a_folder_that_is_no_run(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="is not a run folder of train.py"):
        evaluate(compose_cfg("config-eval", [f"path={tmp_path}", "eval.device=cpu"]))


def test_table_and_check_refuse_bad_input_in_one_line(tmp_path, capsys):
    from data.check import main as check_main
    from metrics.table import main as table_main

    bad = tmp_path / "eval_result.json"
    bad.write_text('{"mAP@all": [0.1')
    with pytest.raises(UserError, match="is not readable JSON"):
        table_main([str(bad)])
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="is not an eval_result.json"):
        table_main([str(bad)])
    with pytest.raises(UserError, match="is a folder; give a file name"):
        table_main([str(bad), "--csv", str(tmp_path)])
    assert check_main(["--help"]) == 0 and "python -m data.check" in capsys.readouterr().out
    with pytest.raises(UserError, match="check.decode=true|false"):
        check_main(["dataset=demo", "check.decode=maybe"])
