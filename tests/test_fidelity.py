"""The project's test-split index reproduces the paper's public annotation files exactly."""

import csv
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data.index import build_index

# the paper's public annotation files: shared/ beside the checkout, or inside it
_REPO = Path(__file__).resolve().parents[1]
REFERENCE = next(
    (
        p
        for p in (_REPO.parent / "shared" / "reference", _REPO / "shared" / "reference")
        if p.is_dir()
    ),
    _REPO.parent / "shared" / "reference",
)


def lay_out(root, ref_rows, seen_dirs):
    for r in ref_rows:
        p = root / r["img_path"]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()
    # stand-ins for the seen classes of the full download, so that labels count as there
    for d, n in seen_dirs:
        for i in range(n):
            for sub in d:
                (root / sub / f"seen_class_{i:03d}").mkdir(parents=True, exist_ok=True)
                (root / sub / f"seen_class_{i:03d}" / "x.jpg").touch()


@pytest.mark.parametrize(
    "name,csv_name,n_seen,seen_dirs",
    [
        ("sketchy", "test_sketchy.csv", 104, ["sketch/tx_000000000000", "extended_photo"]),
        ("tuberlin", "test_tuberlin.csv", 220, ["train/sketch", "train/photo"]),
    ],
)
def test_test_split_matches_reference(tmp_path, name, csv_name, n_seen, seen_dirs):
    ref_file = REFERENCE / csv_name
    if not ref_file.is_file():
        pytest.skip(f"reference annotations not found at {ref_file}")
    ref = list(csv.DictReader(open(ref_file)))
    lay_out(tmp_path, ref, [(seen_dirs, n_seen)])
    dcfg = OmegaConf.create(dict(root={name: str(tmp_path)}, split=None, unseen_file=None, csv={}))
    index = build_index(name, dcfg)
    assert len(index.seen) == n_seen
    ours = {r["img_path"]: r for r in index.rows_of(index.unseen)}
    assert set(ours) == {r["img_path"] for r in ref}
    for r in ref:
        o = ours[r["img_path"]]
        assert (o["text"], o["m1"], o["m2"]) == (r["text"], int(r["m1"]), int(r["m2"])), r[
            "img_path"
        ]
        # labels: seen classes 1..n_seen (sorted), unseen n_seen+1.. in split-file order
        assert o["label"] == int(r["label"]), r["img_path"]
