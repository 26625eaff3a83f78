"""evaluate.py on an infer_output folder alone; its errors; the generalized (GZS-SBIR) gallery."""

import json

import numpy as np
import pytest
import torch

from pipeline.evaluate import evaluate
from metrics.engine import retrieval_metrics, summarize
from tests.conftest import compose_cfg
from runtime.io import save_csv
from runtime.errors import UserError


def fake_output(run, n_cls=3, per=4, seen_photos=0, d=16, seed=0, key="2"):
    """infer_output/best/<key>/ with random embeddings, as infer.py lays it out; no config, no
    checkpoint."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_cls):
        for m in (0, 1):
            rows += [
                dict(
                    img_path=f"x/c{c}/{m}_{i}.png",
                    text=f"a photo of a c{c}.",
                    m1=m,
                    m2=3,
                    label=100 + c,
                    split="test",
                )
                for i in range(per)
            ]
    rows += [
        dict(img_path=f"x/s/{i}.png", text="a photo of a s.", m1=0, m2=3, label=1, split="seen")
        for i in range(seen_photos)
    ]
    n = len(rows)
    img = torch.nn.functional.normalize(
        torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32)), dim=1
    )
    out = run / "infer_output" / "best" / key
    out.mkdir(parents=True)
    torch.save(img, out / "img_logits.pt")
    torch.save(img.clone(), out / "txt_logits.pt")
    torch.save(img[:, None, None, :].expand(n, 2, 4, d).clone(), out / "converted_logits.pt")
    save_csv(rows, ["img_path", "text", "m1", "m2", "label", "split"], out / "index.csv")
    return out, rows, img


def eval_cfg(run, *extra):
    return compose_cfg(
        "config-eval", [f"path={run}", "eval.device=cpu", "eval.report.enabled=false", *extra]
    )


def test_evaluate_needs_only_the_infer_output_folder(tmp_path):
    out, rows, img = fake_output(tmp_path)
    result = evaluate(eval_cfg(tmp_path, "dataset.test_idx=2"))
    m1 = np.array([r["m1"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    expect = summarize(
        retrieval_metrics(
            img[m1 == 1], img[m1 == 0], labels[m1 == 1], labels[m1 == 0], progress=False
        )[0]
    )
    assert result["mAP@all"][0] == pytest.approx(expect["default/AP@all"])
    assert result["mAP@all"][1] == pytest.approx(
        expect["default/AP@all"]
    )  # converted == image here
    saved = json.loads((out / "eval_result.json").read_text())
    assert saved["n_queries"] == 12 and saved["n_gallery"] == 12
    # the only dataset folder is found without dataset.test_idx too
    assert evaluate(eval_cfg(tmp_path))["mAP@all"] == result["mAP@all"]


def test_mismatched_lengths_are_a_clear_error(tmp_path):
    out, rows, img = fake_output(tmp_path)
    torch.save(img[:-1], out / "img_logits.pt")
    with pytest.raises(UserError, match="index.csv has 24 rows but the logits have"):
        evaluate(eval_cfg(tmp_path))
    assert not (out / "eval_result.json").exists()


def test_non_finite_embeddings_are_a_clear_error(tmp_path):
    out, rows, img = fake_output(tmp_path)
    img[5, 3] = float("nan")
    torch.save(img, out / "img_logits.pt")
    with pytest.raises(
        UserError, match=r"img_logits.pt: 1 of 24 embeddings are NaN.*first: x/c0/1_1.png"
    ):
        evaluate(eval_cfg(tmp_path))
    assert not (out / "eval_result.json").exists()


def test_missing_file_is_a_clear_error(tmp_path):
    out, *_ = fake_output(tmp_path)
    (out / "converted_logits.pt").unlink()
    with pytest.raises(UserError, match=r"lacks \['converted_logits.pt'\]"):
        evaluate(eval_cfg(tmp_path))


def test_missing_folder_says_to_run_infer(tmp_path):
    fake_output(tmp_path)
    with pytest.raises(UserError, match="run `python infer.py"):
        evaluate(eval_cfg(tmp_path, "dataset.test_idx=0"))


def test_generalized_gallery_adds_seen_photos(tmp_path):
    """GZS-SBIR outputs live in <dataset>-gzs/ beside the zero-shot ones; neither replaces the
    other."""
    fake_output(tmp_path, seed=1)
    out, rows, img = fake_output(tmp_path, seen_photos=5, key="2-gzs")
    zs = evaluate(eval_cfg(tmp_path))
    gz = evaluate(eval_cfg(tmp_path, "eval.generalized=true"))
    assert zs["n_gallery"] == 12 and gz["n_gallery"] == 17 and gz["generalized"]
    assert zs["inference"]["folder"].endswith("best/2") and gz["inference"]["folder"].endswith(
        "best/2-gzs"
    )
    assert (
        json.loads((tmp_path / "infer_output/best/2/eval_result.json").read_text())["n_gallery"]
        == 12
    )
    m1 = np.array([r["m1"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    q = m1 == 1
    expect = summarize(
        retrieval_metrics(img[q], img[m1 == 0], labels[q], labels[m1 == 0], progress=False)[0]
    )
    assert gz["mAP@all"][0] == pytest.approx(expect["default/AP@all"])


def test_generalized_without_seen_photos_says_how(tmp_path):
    fake_output(tmp_path)
    with pytest.raises(UserError, match="dataset.generalized=true"):
        evaluate(eval_cfg(tmp_path, "eval.generalized=true"))
    fake_output(tmp_path, key="2-gzs")
    with pytest.raises(UserError, match="dataset.generalized=true"):
        evaluate(eval_cfg(tmp_path, "eval.generalized=true"))
