"""Fine-grained pairs from file names: a sketch `<class>/<photo stem>-<n>.<ext>` was drawn from
the photo `<class>/<photo stem>.<ext>` of the same class (Sketchy's naming; `folder` and `demo`
follow it).

Each annotation row gets a `photo` column: for a sketch, the img_path of the photo it was drawn
from; "" for photos and for sketches without a photo. Sketchy-Extended's photo folder holds the
basic photos (the 100 a class that were sketched) under their own names beside the extended ones
(`ext_*`), so its sketches pair within the indexed photos. The fine-grained gallery is the set
of photos some sketch was drawn from (Sketchy's basic set), see metrics/fine_grained.py.
"""

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from data.layouts import PHOTO, SKETCH, match_key

PAIRED = {"sketchy", "folder", "demo"}
NAMING_RULE = (
    "a sketch <class>/<photo stem>-<n>.<ext> pairs with the photo <class>/<photo stem>.<ext> "
    "of the same class"
)
_SKETCH_NAME = re.compile(r"^(?P<stem>.+)-(?P<n>\d+)$")


@dataclass
class PairReport:
    pairs: int = 0  # sketches paired with their photo
    missing: list = field(default_factory=list)  # sketches named for a photo that is not there
    other_class: list = field(default_factory=list)  # ... for a photo of another class
    lonely_photos: int = 0  # photos no sketch was drawn from
    photos: int = 0  # photos some sketch was drawn from

    def line(self, name):
        return (
            f"{name}: {self.pairs} fine-grained pair(s) of a sketch and its photo "
            f"({self.photos} photos); {len(self.missing)} sketch(es) named for a photo that is "
            f"missing, {len(self.other_class)} for a photo of another class; "
            f"{self.lonely_photos} photo(s) without sketches"
        )


def photo_stem(sketch_path):
    """The photo stem a sketch's file name gives (None when the name is not `<stem>-<n>`)."""
    m = _SKETCH_NAME.match(PurePosixPath(sketch_path).stem)
    return m.group("stem") if m else None


def add_pairs(rows, name=None):
    """Set each row's `photo` column in place and return a PairReport. Datasets outside PAIRED
    (TU-Berlin, QuickDraw: no instance pairs) get photo="" everywhere."""
    report = PairReport()
    for r in rows:
        r["photo"] = ""
    if name is not None and name not in PAIRED:
        return report
    photos, classes_of = {}, {}
    for r in rows:
        if r["m1"] == PHOTO:
            stem = PurePosixPath(r["img_path"]).stem
            photos.setdefault((match_key(r["cls"]), stem), r["img_path"])
            classes_of.setdefault(stem, set()).add(r["cls"])
    used = set()
    for r in rows:
        stem = photo_stem(r["img_path"]) if r["m1"] == SKETCH else None
        if stem is None:
            continue
        hit = photos.get((match_key(r["cls"]), stem))
        if hit is not None:
            r["photo"] = hit
            used.add(hit)
            report.pairs += 1
        elif stem in classes_of:
            report.other_class.append(r["img_path"])
        else:
            report.missing.append(r["img_path"])
    report.photos = len(used)
    report.lonely_photos = sum(1 for r in rows if r["m1"] == PHOTO) - len(used)
    return report


def paired_rows(rows):
    """(sketches, their own photos) as two lists of indices into `rows` ((root, row) pairs of a
    split): every sketch whose photo (the photo column of add_pairs) is among the rows."""
    where = {(root, r["img_path"]): i for i, (root, r) in enumerate(rows) if r["m1"] == PHOTO}
    pairs = [
        (i, where[(root, r.get("photo"))])
        for i, (root, r) in enumerate(rows)
        if r["m1"] == SKETCH and (root, r.get("photo")) in where
    ]
    return [i for i, _ in pairs], [j for _, j in pairs]
