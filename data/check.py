"""Check a dataset folder before training: python -m data.check dataset=<name> dataset.root...=<dir>

Prints, per split, the classes and image counts per modality, then every problem found: missing
class folders (a class with photos but no sketches or the reverse), empty classes, unreadable
images, unexpected file extensions, paths leaving the root; and the fine-grained pairs (a sketch
`<photo stem>-<n>` drawn from a photo `<photo stem>`): how many, and the sketches whose photo is
missing or in another class. Exit code 1 when there are errors.
`check.decode=false` skips decoding every image (the cheap part, which training runs first).
"""

import sys
from dataclasses import dataclass, field

from omegaconf import OmegaConf
from tqdm import tqdm

from data.image import PILLOW_LIMIT
from data.cached import cache_base, decodable
from data.layouts import PHOTO
from data.index import has_val_pairs, make_splits, validation_problem
from data.pairs import NAMING_RULE
from data.loader import unreadable
from runtime.errors import UserError
from runtime.logs import log
from config.schema import dataset_defaults


@dataclass
class Report:
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # split -> class -> [photos, sketches]
    pairs: list = field(default_factory=list)  # one line a dataset with fine-grained pairs


def count(rows):
    table = {}
    for _, r in rows:
        table.setdefault(r["cls"], [0, 0])[0 if r["m1"] == PHOTO else 1] += 1
    return table


def structure_problems(index, report):
    """The cheap checks: no decoding."""
    by_class = {}
    for r in index.rows:
        by_class.setdefault(r["cls"], [0, 0])[0 if r["m1"] == PHOTO else 1] += 1
    for cls in index.seen + index.unseen:
        photos, sketches = by_class.get(cls, [0, 0])
        if photos == 0 and sketches == 0:
            report.errors.append(f"{index.name}: class {cls!r} has no images (empty class folders)")
        elif photos == 0 or sketches == 0:
            missing = "photo" if photos == 0 else "sketch"
            msg = (
                f"{index.name}: class {cls!r} has no {missing} images "
                f"(missing or empty {missing} folder)"
            )
            (report.errors if cls in index.unseen else report.warnings).append(msg)
    for path in index.skipped:
        report.warnings.append(
            f"{index.name}: unexpected file {index.root / path} (not an image; ignored)"
        )
    pair_problems(index, report)


def pair_problems(index, report, show=20):
    """Fine-grained pairs found, and the sketches whose photo is missing or in another class
    (left out of fine-grained retrieval), the first `show` of each listed."""
    pairs = index.pairs
    if pairs is None or not (pairs.pairs or pairs.missing or pairs.other_class):
        return
    report.pairs.append(pairs.line(index.name))
    for what, paths in (
        ("is named for a photo that is missing", pairs.missing),
        ("is named for a photo of another class", pairs.other_class),
    ):
        for path in paths[:show]:
            report.warnings.append(
                f"{index.name}: sketch {index.root / path} {what} (left out of fine-grained "
                f"retrieval)"
            )
        if len(paths) > show:
            report.warnings.append(f"{index.name}: ... and {len(paths) - show} more such sketches")


def check_structure(splits):
    """The cheap part of the check, run by training before it starts."""
    report = Report()
    for ix in splits.indices.values():
        structure_problems(ix, report)
    return report


def check_before_training(splits, n_mode):
    """The cheap part of data.check, and the modes the data uses against model.n_mode."""
    report = check_structure(splits)
    for w in report.warnings[:20]:
        log.warning(w)
    if report.errors:
        raise UserError(
            "the dataset check found problems:\n  "
            + "\n  ".join(report.errors)
            + "\nFix them (python -m data.check lists everything) and start again."
        )
    used = max(max(r["m1"], r["m2"]) for _, r in splits.train + splits.val + splits.test)
    if used >= n_mode:
        raise UserError(
            f"model.n_mode={n_mode}, but the data uses mode {used} (0 photo, 1 sketch, 3 text): "
            f"n_mode must be at least {used + 1}."
        )


def decode_problems(rows, report, max_pixels, progress=True, cache=False):
    """Decode every image in full (JPEGs at reduced scale): truncation, foreign files, bombs;
    except those a fresh image cache holds (they decoded when cached)."""
    cached = decodable(rows, cache_base(cache)[0])
    rows = [(root, r) for root, r in rows if (root, r["img_path"]) not in cached]
    for root, r in tqdm(rows, desc="decoding images", disable=not progress, dynamic_ncols=True):
        problem = unreadable(root / r["img_path"], max_pixels)
        if problem:
            report.errors.append(f"unreadable image {root / r['img_path']}: {problem}")


def check_dataset(
    dcfg, decode=True, progress=True, need_test=True, select="auto", fine_grained=False
):
    dcfg = dataset_defaults(dcfg)
    try:
        splits = make_splits(dcfg, need_test=need_test, allow_empty_train=True)
    except UserError as e:
        return Report(errors=[str(e)])
    report = check_structure(splits)
    report.counts = {
        "train": count(splits.train),
        "val": count(splits.val),
        "test": count(splits.test),
    }
    if not splits.train:
        report.errors.append(
            "the training split is empty: check dataset.train_idx and the dataset root."
        )
    problem = validation_problem(splits)
    if problem and select == "val_map":
        report.errors.append(f"train.select=val_map cannot work: {problem}")
    elif select == "val_fg" and not has_val_pairs(splits):
        report.errors.append(
            f"train.select=val_fg cannot work: no validation sketch is paired with a validation "
            f"photo ({NAMING_RULE})"
        )
    elif problem and splits.val_classes and not (fine_grained and has_val_pairs(splits)):
        report.warnings.append(
            f"validation: {problem}; training selects best.pth as the last epoch"
        )
    if decode:
        max_pixels = int(dcfg.max_image_pixels or PILLOW_LIMIT)
        decode_problems(
            splits.train + splits.val + splits.test, report, max_pixels, progress, dcfg.cache
        )
    return report


def format_report(report):
    lines = []
    for split, table in report.counts.items():
        photos = sum(v[0] for v in table.values())
        sketches = sum(v[1] for v in table.values())
        lines.append(f"{split}: {len(table)} classes, {photos} photos, {sketches} sketches")
        for cls, (p, s) in sorted(table.items()):
            lines.append(f"  {cls:<28} {p:>7} photos {s:>7} sketches")
    lines += report.pairs
    for w in report.warnings:
        lines.append(f"warning: {w}")
    for e in report.errors:
        lines.append(f"error: {e}")
    lines.append(f"{len(report.errors)} error(s), {len(report.warnings)} warning(s)")
    return "\n".join(lines)


def main(argv):
    from config.schema import compose_config

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    overrides = [a for a in argv if not a.startswith("check.")]
    opts = OmegaConf.from_dotlist([a for a in argv if a.startswith("check.")]).get("check", {})
    unknown = sorted(set(opts) - {"decode"})
    if unknown or not isinstance(opts.get("decode", True), bool):
        raise UserError(f"check options {argv}: the only one is check.decode=true|false.")
    cfg = compose_config("config-train", overrides)
    OmegaConf.resolve(cfg)  # the presets' ${ma.fine_grained:...} values need the whole config
    fine_grained = max(float(cfg.train.fg_ratio), float(cfg.train.fg_shuffle_ratio)) > 0
    report = check_dataset(
        cfg.dataset,
        decode=opts.get("decode", True),
        select=cfg.train.select,
        fine_grained=fine_grained,
    )
    print(format_report(report))
    return 1 if report.errors else 0


if __name__ == "__main__":
    from runtime.errors import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
