"""Build the annotation index of a dataset and cut it into train / validation / test splits."""

import random
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from data.image import PILLOW_LIMIT
from data.layouts import (
    PHOTO,
    SKETCH,
    TEXT,
    match_key,
    prompt_for,
    read_annotation_csv,
    read_class_list,
    resolve_name,
    resolve_root,
    scan_layout,
    split_file,
)
from data.loader import unreadable
from data.pairs import add_pairs, paired_rows
from runs.folder import is_baseline
from runtime.errors import UserError
from runtime.logs import log
from config.schema import dataset_defaults

MIN_VAL_CLASSES = 5


@dataclass
class DatasetIndex:
    name: str
    root: Path
    rows: list  # every image of the dataset (annotation rows)
    seen: list  # seen class names, label order
    unseen: list  # unseen (test) class names, label order
    skipped: list  # files ignored while scanning (unexpected extensions)
    pairs: object = None  # data.pairs.PairReport: which sketch was drawn from which photo

    def rows_of(self, classes):
        keep = set(classes)
        return [r for r in self.rows if r["cls"] in keep]


def build_index(idx, dcfg):
    """Scan the dataset's on-disk layout (or read given seed CSVs) into a DatasetIndex. `dcfg`: a
    dataset config, the keys it lacks taken from config/schema.py's defaults."""
    dcfg = dataset_defaults(dcfg)
    name = resolve_name(idx)
    root = resolve_root(name, dcfg.root)
    if dcfg.csv.test:
        return _index_from_csv(name, root, dcfg.csv, dcfg.on_bad_image == "skip")
    scan = scan_layout(name, root)
    unseen_path = split_file(name, dcfg.split, root, dcfg.unseen_file)
    unseen = read_class_list(unseen_path)
    unknown = [c for c in unseen if match_key(c) not in scan.images]
    if unknown:
        raise UserError(
            f"split file {unseen_path} names class(es) {unknown} that {root} does not have. "
            f"Fix the class names in the split file (case, spaces and underscores do not matter), "
            f"or check that dataset.root points at the full {name} download."
        )
    spelling = dict(scan.names)
    spelling.update(
        {match_key(c): c for c in unseen}
    )  # unseen classes as the split file spells them
    unseen_keys = [match_key(c) for c in unseen]
    seen_keys = sorted(
        (k for k in scan.images if k not in set(unseen_keys)), key=lambda k: spelling[k]
    )
    rows = []
    for label, key in enumerate(seen_keys + unseen_keys, start=1):
        cls = spelling[key]
        text = prompt_for(name, cls)
        for mode in (PHOTO, SKETCH):
            rows += [
                dict(img_path=p, text=text, m1=mode, m2=TEXT, label=label, cls=cls)
                for p in scan.images[key][mode]
            ]
    seen = [spelling[k] for k in seen_keys]
    pairs = add_pairs(rows, name)
    return DatasetIndex(name, root, rows, seen, unseen, scan.skipped, pairs)


def _index_from_csv(name, root, csv_cfg, skip_missing):
    test, missing = read_annotation_csv(csv_cfg["test"], root, skip_missing)
    train, missing_train = (
        read_annotation_csv(csv_cfg["train"], root, skip_missing) if csv_cfg.train else ([], [])
    )
    unseen = list(dict.fromkeys(r["cls"] for r in test))
    seen = list(dict.fromkeys(r["cls"] for r in train))
    overlap = sorted(set(seen) & set(unseen))
    if overlap:
        raise UserError(
            f"classes {overlap} appear in both {csv_cfg['train']} and "
            f"{csv_cfg['test']}: a zero-shot test class must never be trained on."
        )
    rows = train + test
    pairs = add_pairs(rows, name)
    return DatasetIndex(name, root, rows, seen, unseen, missing + missing_train, pairs)


def drop_unreadable(rows, what, max_pixels):
    """dataset.on_bad_image=skip: decode every image, leave out and count the bad ones."""
    bad = [
        (root, r)
        for root, r in tqdm(rows, desc=f"checking {what} images", leave=False)
        if unreadable(root / r["img_path"], max_pixels)
    ]
    if bad:
        log.warning(
            f"left out {len(bad)} unreadable {what} image(s) (dataset.on_bad_image=skip), "
            f"e.g. {bad[0][0] / bad[0][1]['img_path']}"
        )
    drop = {id(r) for _, r in bad}
    return [(root, r) for root, r in rows if id(r) not in drop]


@dataclass
class Splits:
    train: list  # (root, row) pairs
    val: list
    test: list
    train_classes: list
    val_classes: list
    test_index: DatasetIndex | None
    indices: dict  # name -> DatasetIndex of every dataset involved


def seen_class_split(seen, cls_ratio, seed):
    """Hold out a (1 - cls_ratio) share of the seen classes for validation, deterministically."""
    if not 0 < cls_ratio <= 1:
        raise UserError(
            f"dataset.cls_ratio={cls_ratio} must be in (0, 1]; e.g. 0.9 keeps 90% "
            f"of the seen classes for training and validates on the rest."
        )
    order = sorted(seen)
    random.Random(seed).shuffle(order)
    n_train = (
        len(order) if cls_ratio >= 1 else max(1, min(len(order) - 1, round(cls_ratio * len(order))))
    )
    return sorted(order[:n_train]), sorted(order[n_train:])


def partial(rows, ratio, seed):
    """A seeded random share of the rows (the authors' *_partial_ratio), in their order."""
    if ratio >= 1 or not rows:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), max(1, int(ratio * len(rows)))))
    return [rows[i] for i in keep]


def validation_problem(splits):
    """Why the held-out seen classes cannot select a checkpoint (None when they can): fewer than
    MIN_VAL_CLASSES classes, or a class without sketches or photos."""
    if not splits.val_classes:
        return "no seen classes are held out for validation (dataset.cls_ratio=1.0)"
    if len(splits.val_classes) < MIN_VAL_CLASSES:
        return (
            f"only {len(splits.val_classes)} seen class(es) are held out for validation "
            f"({', '.join(splits.val_classes)}), fewer than {MIN_VAL_CLASSES}: mAP over so few "
            f"classes says little (lower dataset.cls_ratio, or train.select=last)"
        )
    modes = {}
    for _, r in splits.val:
        modes.setdefault(r["cls"], set()).add(r["m1"])
    lacking = sorted(c for c in splits.val_classes if modes.get(c, set()) != {PHOTO, SKETCH})
    if lacking:
        return f"validation class(es) {lacking} lack sketches or photos, so their mAP is undefined"
    return None


def has_val_pairs(splits):
    """Whether some validation sketch was drawn from a validation photo (val_fg can score)."""
    return bool(splits.val) and bool(paired_rows(splits.val)[0])


def make_splits(dcfg, need_test=True, need_train=True, allow_empty_train=False):
    dcfg = dataset_defaults(dcfg)
    train_ids = list(dcfg.train_idx) if need_train else []
    test_idx = dcfg.test_idx if need_test else None
    indices = {resolve_name(i): None for i in train_ids}
    if test_idx is not None:
        indices[resolve_name(test_idx)] = None
    for name in indices:
        indices[name] = build_index(name, dcfg)
    train, val, train_classes, val_classes = [], [], [], []
    for k, name in enumerate(resolve_name(i) for i in train_ids):
        ix = indices[name]
        tr_cls, va_cls = seen_class_split(ix.seen, float(dcfg.cls_ratio), int(dcfg.split_seed))
        train += [(ix.root, r) for r in ix.rows_of(tr_cls)]
        # validation labels are made unique across datasets
        val += [(ix.root, dict(r, label=k * 100_000 + r["label"])) for r in ix.rows_of(va_cls)]
        train_classes += tr_cls
        val_classes += va_cls
    test, test_index = [], None
    if test_idx is not None:
        test_index = indices[resolve_name(test_idx)]
        trained = {match_key(c) for c in train_classes + val_classes}
        leaked = sorted(c for c in test_index.unseen if match_key(c) in trained)
        if leaked:
            raise UserError(
                f"unseen test class(es) {leaked} of {test_index.name} are also training classes "
                f"of {[resolve_name(i) for i in train_ids]}; that is not zero-shot. Remove that "
                f"training dataset or choose another split (dataset.split)."
            )
        test = [(test_index.root, r) for r in test_index.rows_of(test_index.unseen)]
        lacking = {
            what: sorted(
                c
                for c in test_index.unseen
                if not any(r["cls"] == c and r["m1"] == mode for _, r in test)
            )
            for what, mode in (("sketch", SKETCH), ("photo", PHOTO))
        }
        if lacking["sketch"] or lacking["photo"]:
            raise UserError(
                f"every unseen class of {test_index.name} needs sketches and photos, but at "
                f"{test_index.root} class(es) {lacking['sketch']} have no sketch images and "
                f"{lacking['photo']} no photos. Check those class folders, or take the classes "
                f"out of the split file."
            )
    seed = int(dcfg.split_seed)
    train = partial(train, float(dcfg.train_partial_ratio), seed)
    val = partial(val, float(dcfg.valid_partial_ratio), seed)
    if dcfg.on_bad_image == "skip":
        max_pixels = int(dcfg.max_image_pixels or PILLOW_LIMIT)
        train, val, test = (
            drop_unreadable(rows, what, max_pixels)
            for rows, what in ((train, "training"), (val, "validation"), (test, "test"))
        )
    if need_train and not train and not allow_empty_train:
        raise UserError(
            "the training split is empty: check dataset.train_idx and the dataset root."
        )
    return Splits(train, val, test, train_classes, val_classes, test_index, indices)


def class_overlap(train_cfg, classes):
    """Test classes that the run trained or validated on (its config records them)."""
    record = train_cfg.get("run") or {}
    trained = {
        match_key(c)
        for c in list(record.get("train_classes") or []) + list(record.get("val_classes") or [])
    }
    return sorted(c for c in classes if match_key(c) in trained)


def check_zero_shot(train_cfg, classes, allow, where):
    """Refuse test classes the run trained on, or (allow_class_overlap=true) name them."""
    if is_baseline(train_cfg):  # the pretrained backbone, trained on no class here
        return []
    if not (train_cfg.get("run") or {}).get("train_classes"):
        log.warning(
            f"{where}: the run records no training classes (trained by an older version); "
            f"the zero-shot split is not checked."
        )
        return []
    overlap = class_overlap(train_cfg, classes)
    if overlap and not allow:
        raise UserError(
            f"{where}: test class(es) {overlap} were training classes of this run, so the "
            f"scores would not be zero-shot. Fix the split (unseen.txt / dataset.split), or "
            f"pass allow_class_overlap=true to score them anyway (labelled in the results)."
        )
    return overlap
