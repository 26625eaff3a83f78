"""The pretrained-CLIP baseline (infer.py baseline=true): an ordinary run folder whose model is the
backbone with no training, inferred into; evaluate.py, search.py and the results table take it,
with converted results null and the reason beside them; it never writes into another folder."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from config.schema import compose_config
from data.demo import generate
from gallery.search import Searcher
from infer import wants_baseline
from metrics.table import main as table_main
from model.backbone import build_model
from pipeline.baseline import CONVERTED_NULL_REASON, baseline
from pipeline.evaluate import evaluate
from runtime.device import seed_everything
from runtime.errors import UserError
from runs.folder import MARKER, RunFolder, resume_config
from runtime.io import load_torch
from tests.conftest import REPO
from tests.search_fixtures import make_gallery, random_run, search_cfg
from tests.test_evaluate import eval_cfg


BASE = ["dataset=demo", "model=tiny", "num_workers=0", "device=cpu"]


def baseline_cfg(demo_root, path, *extra):
    return compose_config(
        "config-baseline", [*BASE, f"dataset.root={demo_root}", f"path={path}", *extra]
    )


@pytest.fixture(scope="module")
def base(demo_root, tmp_path_factory):
    """A baseline folder made by the command line the README gives."""
    path = tmp_path_factory.mktemp("b") / "base"
    cmd = [sys.executable, "infer.py", "baseline=true", "dataset=demo", "model=tiny"]
    cmd += [f"dataset.root={demo_root}", f"path={path}", "num_workers=0", "device=cpu"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return path


@pytest.mark.slow  # the module's baseline is made by a second process
def test_the_baseline_is_the_untrained_backbone_as_a_run(base, demo_root):
    ckpt = load_torch(base / "model" / "best.pth")
    assert ckpt["selected_by"] == "baseline" and ckpt["epoch"] is None
    assert ckpt["config"]["baseline"] is True
    seed_everything(0)  # the run's seed: the same draw as the baseline's build
    model, _, eval_tf, _ = build_model(compose_config("config-train", ["model=tiny"]).model)
    fresh = model.state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in ckpt["model"].items())
    out = base / "infer_output" / "best" / "demo"
    rows = (out / "index.csv").read_text().splitlines()
    first = rows[1].split(",")[0]
    img = load_torch(out / "img_logits.pt")
    with Image.open(demo_root / first) as im:
        x = eval_tf(im.convert("RGB"))[None]
    with torch.no_grad():
        want = model.eval().encode_image(x)[0]
    assert torch.allclose(img[0], want, atol=1e-5)
    assert (base / "config.yaml").is_file() and (base / ".ma-sbir-run").is_file()


@pytest.mark.slow  # the module's baseline is made by a second process
def test_evaluate_writes_converted_as_null_with_the_reason(base):
    result = evaluate(eval_cfg(base))
    saved = json.loads((base / "infer_output" / "best" / "demo" / "eval_result.json").read_text())
    assert saved["converted_null_reason"] == CONVERTED_NULL_REASON
    for key in ("mAP@all", "mAP@200", "p@100", "p@200"):
        assert isinstance(saved[key][0], float) and saved[key][1] is None
    fg = saved["fine_grained"]
    assert fg["acc@1"][1] is None and 0 <= fg["acc@1"][0] <= 1
    assert fg["unseen"]["acc@5"][1] is None
    assert all(r[1] is None for r in fg["own_photo_rank"].values())
    assert all(v[1] is None for v in saved["per_class_AP"].values())
    assert all(t["converted"] is None for t in saved["top10_retrieved"].values())
    assert result["mAP@all"][0] == saved["mAP@all"][0]


@pytest.mark.slow  # the module's baseline is made by a second process
def test_generalized_evaluation_of_a_baseline(base, demo_root):
    baseline(baseline_cfg(demo_root, base, "dataset.generalized=true"))
    out = evaluate(eval_cfg(base, "eval.generalized=true"))
    assert out["generalized"] and out["n_gallery"] > 6 * 8 and out["mAP@all"][1] is None


@pytest.mark.slow  # the module's baseline is made by a second process
def test_search_and_the_table_take_a_baseline(base, demo_root, tmp_path, capsys):
    gallery = make_gallery(tmp_path / "g", demo_root)
    s = Searcher(search_cfg(base, gallery, f"index.cache_dir={tmp_path / 'idx'}"), progress=False)
    assert s.mode_of("converted") == "original"
    with Image.open(next((demo_root / "sketch" / "kite").iterdir())) as im:
        sketch = im.convert("RGB")
    z = s.embed_image(sketch, "sketch", "converted")
    assert np.allclose(z, s.embed_image(sketch, "sketch", "original"))
    assert len(s.search(z, 3)) == 3
    evaluate(eval_cfg(base))
    assert table_main([str(base), "--csv", str(tmp_path / "t.csv")]) == 0
    text = capsys.readouterr().out
    assert "| random init, no training | baseline | default | original |" in text  # model=tiny
    assert "| converted |" not in text  # a baseline has no converted row


@pytest.mark.slow  # the module's baseline is made by a second process
def test_a_second_call_reuses_the_baseline_and_another_setting_is_refused(
    base, demo_root, tmp_path
):
    evaluate(eval_cfg(base))
    out = base / "infer_output" / "best" / "demo"
    kept = {
        p: p.stat().st_mtime_ns for p in [base / "model" / "best.pth", out / "eval_result.json"]
    }
    baseline(baseline_cfg(demo_root, base))  # the same setting: nothing re-made, results kept
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    with pytest.raises(UserError, match=r"baseline of another setting \(model.n_mode=4 there"):
        baseline(baseline_cfg(demo_root, base, "model.n_mode=5"))
    other = generate(tmp_path / "other", n_photo=2, n_sketch=2)
    with pytest.raises(UserError, match=r"the dataset root \S+ there, \S+/other asked"):
        baseline(
            compose_config(
                "config-baseline", [*BASE[:2], f"dataset.root={other}", f"path={base}", *BASE[2:]]
            )
        )
    with pytest.raises(UserError, match="is a pretrained-CLIP baseline .* not a training run"):
        resume_config(base)


def test_a_trained_run_or_a_users_folder_is_never_written(demo_root, tmp_path):
    run = random_run(tmp_path / "trained")  # a run folder's shape: model/best.pth, config.yaml
    (run / "config.yaml").write_text("seed: 0\n")
    files = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="holds a trained run .model/best.pth was selected by None"):
        baseline(baseline_cfg(demo_root, run))
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == files
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not empty"):
        baseline(baseline_cfg(demo_root, mine))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_weights_that_cannot_be_loaded_leave_nothing_behind(demo_root, tmp_path):
    path = tmp_path / "nope"
    with pytest.raises(UserError, match="weight file '/nonexistent/w.pt'"):
        baseline(baseline_cfg(demo_root, path, "model.pretrained=/nonexistent/w.pt"))
    assert not path.exists()


def test_baseline_on_the_command_line():
    assert wants_baseline(["path=x"]) == (False, ["path=x"])
    assert wants_baseline(["baseline=true", "dataset=demo"]) == (
        True,
        ["baseline=true", "dataset=demo"],
    )
    assert wants_baseline(["+baseline=true"]) == (True, ["baseline=true"])
    assert wants_baseline(["path=r", "baseline=false"]) == (False, ["path=r"])


def test_a_file_as_path_or_a_missing_dataset_is_one_line_before_any_weights(demo_root, tmp_path):
    afile = tmp_path / "f"
    afile.write_text("mine")
    with pytest.raises(UserError, match=r"path=.*/f is a file; pass path=<a new folder>"):
        baseline(baseline_cfg(demo_root, afile))
    assert afile.read_text() == "mine"
    cfg = compose_config("config-baseline", [f"path={tmp_path / 'b'}", "device=cpu"])
    with pytest.raises(UserError, match="no root folder given for dataset 'sketchy'"):
        baseline(cfg)  # the default ViT-B-32 weights are never asked for
    assert not (tmp_path / "b").exists()


@pytest.mark.slow  # the module's baseline is made by a second process
def test_the_report_shows_each_sketchs_own_photo_and_its_rank(base):
    import re

    evaluate(eval_cfg(base, "eval.report.enabled=true", "eval.report.n_queries=1000"))
    out = base / "infer_output" / "best" / "demo"
    page = (out / "report.html").read_text()
    ranks = json.loads((out / "eval_result.json").read_text())["fine_grained"]["own_photo_rank"]
    own = r"data-query='([^']+)'><p>[^<]*</p>\s*<div class='own'>[^\n]*?gallery: original (\d+)"
    shown = re.findall(own, page)
    assert len(shown) == len(ranks) > 0  # every paired sketch, with the rank evaluate.py found
    assert all(ranks[q][0] == int(r) for q, r in shown)
    assert "Fine-grained: each sketch's own photo" in page and "converted: n/a" in page


def test_a_start_killed_before_best_pth_is_completed_by_the_next(demo_root, tmp_path):
    """A kill -9 leaves the marker (and maybe config.yaml); the rerun completes the baseline. A
    live holder is named; a train.py run without best.pth is never touched."""
    path = tmp_path / "k"
    path.mkdir()
    (path / MARKER).write_text('{"pid": 999999}')
    holder = RunFolder(path).claim(resume=True)  # another process making this baseline now
    with pytest.raises(UserError, match="is in use by process"):
        baseline(baseline_cfg(demo_root, path))
    holder.release()
    (path / "config.yaml").write_text("baseline: true\nmodel: {backbone: ma-t")  # cut by the kill
    baseline(baseline_cfg(demo_root, path))
    assert load_torch(path / "model" / "best.pth")["selected_by"] == "baseline"
    assert (path / "infer_output" / "best" / "demo" / "index.csv").is_file()
    trained = tmp_path / "t"
    trained.mkdir()
    (trained / MARKER).write_text("{}")
    (trained / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(UserError, match="is a run of train.py without model/best.pth"):
        baseline(baseline_cfg(demo_root, trained))
    assert sorted(p.name for p in trained.iterdir()) == [MARKER, "config.yaml"]
