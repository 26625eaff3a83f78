"""evaluate.py's "fine_grained" block from an infer_output whose index.csv pairs sketches with
their photos (infer.py's photo column), checked against a brute-force oracle; and its switches."""

import json

import numpy as np
import pytest
import torch

from pipeline.evaluate import evaluate
from runtime.errors import UserError
from runtime.io import save_csv
from tests.test_evaluate import eval_cfg, fake_output

COLUMNS = ["img_path", "text", "m1", "m2", "label", "photo", "split"]


def paired_output(run, n_cls=3, per=5, d=8, seed=0):
    """Per class: `per` photos c<c>/p<i>.png, a sketch c<c>/p<i>-1.png of each of the first
    per - 1 photos (the last photo has no sketch: still in no gallery), one free sketch, and one
    sketch naming a photo that is not in the split (left out, counted)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_cls):
        base = dict(text=f"a photo of a c{c}.", m2=3, label=100 + c, split="test")
        rows += [dict(base, img_path=f"x/c{c}/p{i}.png", m1=0, photo="") for i in range(per)]
        rows += [
            dict(base, img_path=f"x/c{c}/p{i}-1.png", m1=1, photo=f"x/c{c}/p{i}.png")
            for i in range(per - 1)
        ]
        rows += [dict(base, img_path=f"x/c{c}/free.png", m1=1, photo="")]
        rows += [dict(base, img_path=f"x/c{c}/gone-1.png", m1=1, photo=f"x/c{c}/gone.png")]
    n = len(rows)
    img = torch.nn.functional.normalize(
        torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1
    )
    # sketches near their photo, so that accuracy is far from both 0 and 1
    where = {r["img_path"]: i for i, r in enumerate(rows)}
    for i, r in enumerate(rows):
        if r["photo"] in where:
            img[i] = torch.nn.functional.normalize(img[where[r["photo"]]] + 2.0 * img[i], dim=0)
    conv = torch.nn.functional.normalize(
        img + 0.5 * torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32)), dim=1
    )
    out = run / "infer_output" / "best" / "2"
    out.mkdir(parents=True)
    torch.save(img, out / "img_logits.pt")
    torch.save(img.clone(), out / "txt_logits.pt")
    full = conv[:, None, None, :].expand(n, 2, 4, d).clone()
    torch.save(full, out / "converted_logits.pt")
    save_csv(rows, COLUMNS, out / "index.csv")
    return out, rows, img, conv


def oracle(rows, emb, pooled):
    """Acc@1 / Acc@5 by loops: rank = photos (of the class, or all paired photos) at least as
    similar as the own photo."""
    paths = [r["img_path"] for r in rows]
    gallery = sorted({r["photo"] for r in rows if r["photo"] in paths})
    hits = {1: [], 5: []}
    for i, r in enumerate(rows):
        if r["m1"] != 1 or r["photo"] not in gallery:
            continue
        own = float(emb[i] @ emb[paths.index(r["photo"])])
        rank = sum(
            1
            for g in gallery
            if (pooled or g.split("/")[1] == r["img_path"].split("/")[1])
            and float(emb[i] @ emb[paths.index(g)]) >= own
        )
        for k in hits:
            hits[k].append(rank <= k)
    return {k: float(np.mean(v)) for k, v in hits.items()}, len(hits[1])


def test_the_fine_grained_block_matches_the_oracle(tmp_path):
    out, rows, img, conv = paired_output(tmp_path)
    evaluate(eval_cfg(tmp_path, "dataset.test_idx=2"))
    fg = json.loads((out / "eval_result.json").read_text())["fine_grained"]
    photos = [i for i, r in enumerate(rows) if r["m1"] == 0]
    for kind, emb in ((0, img), (1, conv)):
        # the gallery is the photos' own image embeddings; queries of kind 1 are converted
        both = img.clone()
        sketches = [i for i, r in enumerate(rows) if r["m1"] == 1]
        both[sketches] = emb[sketches]
        both[photos] = img[photos]
        want, n = oracle(rows, both, pooled=False)
        want_pooled, _ = oracle(rows, both, pooled=True)
        assert fg["acc@1"][kind] == pytest.approx(want[1])
        assert fg["acc@5"][kind] == pytest.approx(want[5])
        assert fg["unseen"]["acc@1"][kind] == pytest.approx(want_pooled[1])
    assert fg["n_queries"] == n == 12 and fg["skipped_sketches"] == 3
    assert fg["gallery"] == "class" and fg["unseen"]["gallery"] == "unseen"
    assert fg["chance_acc@1"] == pytest.approx(1 / 4)  # 4 sketched photos a class
    assert fg["unseen"]["chance_acc@1"] == pytest.approx(1 / 12)
    assert 0 < fg["acc@1"][0] < 1
    assert set(fg["per_class"]) == {"c0", "c1", "c2"}
    assert fg["own_photo_rank"]["x/c0/p0-1.png"][0] >= 1


def test_fine_grained_false_skips_it(tmp_path):
    out, *_ = paired_output(tmp_path)
    evaluate(eval_cfg(tmp_path, "dataset.test_idx=2", "eval.fine_grained=false"))
    assert "fine_grained" not in json.loads((out / "eval_result.json").read_text())


def test_fine_grained_asked_of_a_split_without_pairs_names_the_rule(tmp_path):
    fake_output(tmp_path)  # index.csv without a photo column, as TU-Berlin or an older infer
    with pytest.raises(UserError, match=r"pairs no test sketch with a photo \(a sketch <class>/"):
        evaluate(eval_cfg(tmp_path, "dataset.test_idx=2", "eval.fine_grained=true"))
    result = evaluate(eval_cfg(tmp_path, "dataset.test_idx=2"))  # unset: skipped quietly
    assert "fine_grained" not in result


def test_data_check_reports_pairs_and_lists_sketches_without_their_photo(demo_root, tmp_path):
    from data.check import check_dataset, format_report
    from tests.conftest import compose_cfg, folder_dataset

    data = folder_dataset(demo_root, tmp_path / "data")
    (data / "photo" / "kite" / "kite_000.jpg").unlink()  # its sketch kite_000-1 loses its photo
    (data / "sketch" / "sun" / "sun_001-1.png").rename(data / "sketch" / "sun" / "kite_001-1.png")
    cfg = compose_cfg("config-train", ["dataset=folder", f"dataset.root={data}"])
    text = format_report(check_dataset(cfg.dataset, decode=False, progress=False))
    assert "1 sketch(es) named for a photo that is missing, 1 for a photo of another class" in text
    assert "kite/kite_000-1.png is named for a photo that is missing" in text
    assert "sun/kite_001-1.png is named for a photo of another class" in text
