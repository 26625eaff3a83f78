"""Dataset registry: names and indices, on-disk layouts, prompts, and the annotation index.

An annotation row is the seed's CSV row: img_path (relative to the dataset root), text (the
prompt), m1 (image mode: 0 photo, 1 sketch), m2 (text mode: 3), label (int class id), plus the
class name (`cls`) kept in memory for splitting and reports.
"""

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import UserError

PHOTO, SKETCH, TEXT = 0, 1, 3
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}
SPLITS_DIR = Path(__file__).parent / "splits"
COLUMNS = ["img_path", "text", "m1", "m2", "label"]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    index: int | None
    env_var: str
    prompt: str
    # Each layout alternative: folders (relative to the root) holding <class>/<image> trees.
    # The first alternative with at least one existing folder is used.
    sketch_dirs: list = field(default_factory=list)
    photo_dirs: list = field(default_factory=list)
    default_split: str = ""


DATASETS = {
    "tuberlin": DatasetSpec(
        "tuberlin",
        0,
        "MA_SBIR_TUBERLIN",
        "a photo of {}.",
        sketch_dirs=[["png"], ["sketches"], ["train/sketch", "test/sketch"]],
        photo_dirs=[["ImageResized"], ["images"], ["train/photo", "test/photo"]],
        default_split="tuberlin_30",
    ),
    "quickdraw": DatasetSpec(
        "quickdraw",
        1,
        "MA_SBIR_QUICKDRAW",
        "a photo of a {}.",
        sketch_dirs=[["sketch"], ["sketches"], ["QuickDraw_sketches_final"]],
        photo_dirs=[["images"], ["QuickDraw_images_final"]],
        default_split="quickdraw_30",
    ),
    "sketchy": DatasetSpec(
        "sketchy",
        2,
        "MA_SBIR_SKETCHY",
        "a photo of a {}.",
        sketch_dirs=[["sketch/tx_000000000000"]],
        photo_dirs=[["extended_photo"], ["photo/tx_000000000000"]],
        default_split="sketchy_21",
    ),
    "folder": DatasetSpec(
        "folder",
        None,
        "MA_SBIR_FOLDER",
        "a photo of a {}.",
        sketch_dirs=[["sketch"]],
        photo_dirs=[["photo"]],
    ),
    "demo": DatasetSpec(
        "demo",
        None,
        "MA_SBIR_DEMO",
        "a photo of a {}.",
        sketch_dirs=[["sketch"]],
        photo_dirs=[["photo"]],
    ),
}
ALIASES = {
    "0": "tuberlin",
    "1": "quickdraw",
    "2": "sketchy",
    "tu-berlin": "tuberlin",
    "tu_berlin": "tuberlin",
    "tuberlin-ext": "tuberlin",
    "sketchy-ext": "sketchy",
    "quickdraw-ext": "quickdraw",
}


def resolve_name(idx):
    """Dataset index (0, 1, 2) or name -> canonical name."""
    key = str(idx).strip().lower()
    name = ALIASES.get(key, key)
    if name not in DATASETS:
        raise UserError(
            f"unknown dataset {idx!r}. Use an index (0 = TU-Berlin-Ext, 1 = QuickDraw-Ext, "
            f"2 = Sketchy-Ext) or a name: {', '.join(DATASETS)}."
        )
    return name


def output_key(idx):
    """Folder name under infer_output/<mode>/: the seed's number for 0-2, else the name."""
    spec = DATASETS[resolve_name(idx)]
    return str(spec.index) if spec.index is not None else spec.name


def resolve_root(name, root_cfg):
    """The dataset root from config (a path, or a mapping name -> path), else the env var."""
    spec = DATASETS[name]
    root = root_cfg.get(name) if hasattr(root_cfg, "get") else root_cfg
    root = root or os.environ.get(spec.env_var)
    if name == "demo":
        from data.demo import DEFAULT_ROOT, FINE_GRAINED, FINE_GRAINED_NAME, generate

        if not root:
            return generate(DEFAULT_ROOT)
        if str(root) == FINE_GRAINED_NAME:  # the fine-grained demo, in .cache
            return generate(**FINE_GRAINED)
        if not (Path(root) / "demo.json").is_file():
            return generate(root)  # first use of a custom demo location
    key = "dataset.root" if name in ("folder", "demo") else f"dataset.root.{name}"
    if not root:
        raise UserError(
            f"no root folder given for dataset {name!r}. Pass {key}=/path/to/data "
            f"on the command line or set {spec.env_var}."
        )
    root = Path(os.path.expanduser(str(root)))
    if not root.is_dir():
        raise UserError(
            f"dataset root {root} for {name!r} does not exist or is not a folder. Fix "
            f"{key}=... (or {spec.env_var}) to point at the unpacked download."
        )
    return root


def prompt_for(name, cls):
    return DATASETS[name].prompt.format(cls.replace("_", " "))


def class_key(folder_name):
    """A class folder's name with spaces as underscores (the form used in prompts and reports)."""
    return folder_name.strip().replace(" ", "_")


def match_key(name):
    """Names match across photo folders, sketch folders and split files ignoring case, spaces,
    underscores and hyphens ('table lamp' = 'tablelamp' = 'Table_Lamp')."""
    return re.sub(r"[\s_\-]", "", name.lower())


def _class_name(line):
    """A class list line: 'name', or SAKE's cname_cid format 'name <id>'."""
    parts = line.split()
    if len(parts) > 1 and parts[-1].isdigit():
        parts = parts[:-1]
    return " ".join(parts)


def read_class_list(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"class list {path} does not exist. Give one class name per line.")
    names = [_class_name(ln) for ln in path.read_text().splitlines()]
    names = [class_key(n) for n in names if n and not n.startswith("#")]
    if not names:
        raise UserError(f"class list {path} is empty. Give one class name per line.")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"class list {path} names {dup} more than once. List each class once.")
    return names


def split_file(name, split, root=None, unseen_file=None):
    """Path of the unseen-class list: dataset.unseen_file, <root>/unseen.txt or data/splits/."""
    if unseen_file:
        return Path(unseen_file)
    if name in ("folder", "demo"):
        if split is not None and not (SPLITS_DIR / f"{split}.txt").is_file():  # else another's
            known = sorted(p.stem for p in SPLITS_DIR.glob("*.txt"))
            raise UserError(
                f"dataset.split={split} is not used by dataset {name!r}: its unseen "
                f"classes are {Path(root) / 'unseen.txt'}, and it is no split of "
                f"another dataset ({known}). Leave dataset.split out, or list "
                f"classes in dataset.unseen_file."
            )
        return Path(root) / "unseen.txt"
    split = split or DATASETS[name].default_split
    path = SPLITS_DIR / f"{split}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in SPLITS_DIR.glob(f"{name}_*.txt"))
        raise UserError(f"unknown split {split!r} for {name}. Choose dataset.split from {known}.")
    return path


def pick_layout(root, alternatives, what, name):
    for alt in alternatives:
        found = [root / d for d in alt if (root / d).is_dir()]
        if found:
            return found
    tried = " or ".join("+".join(alt) for alt in alternatives)
    raise UserError(
        f"{root} does not look like {name}: no {what} folder found (looked for {tried}). "
        f"Point dataset.root.{name} at the folder that holds them, as unpacked from the download."
    )


@dataclass
class Scan:
    """What a layout scan found: class -> {mode: [relative paths]} (classes keyed by match_key,
    `names` holds each one's folder spelling), and the files skipped."""

    images: dict
    names: dict
    skipped: list


def scan_layout(name, root):
    spec = DATASETS[name]
    images, names, skipped = {}, {}, []
    for mode, alts, what in (
        (PHOTO, spec.photo_dirs, "photo"),
        (SKETCH, spec.sketch_dirs, "sketch"),
    ):
        for folder in pick_layout(root, alts, what, name):
            for cls_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
                key = match_key(cls_dir.name)
                names.setdefault(key, class_key(cls_dir.name))
                files = images.setdefault(key, {PHOTO: [], SKETCH: []})[mode]
                for f in sorted(cls_dir.iterdir()):
                    if f.name.startswith(".") or not f.is_file():
                        continue
                    if f.suffix.lower() in IMAGE_EXTS:
                        files.append(f.relative_to(root).as_posix())
                    else:
                        skipped.append(f.relative_to(root).as_posix())
    return Scan(images, names, skipped)


def safe_relpath(root, rel, where):
    """Reject a path that leaves the root (absolute or with '..')."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise UserError(
            f"{where}: image path {rel!r} leaves the dataset root {root}. Paths in annotation "
            f"files must be relative to the root, without '..'; fix the row or move the image."
        )
    return p.as_posix()


def read_annotation_csv(path, root, skip_missing=False):
    """A seed-style annotation CSV (img_path,text,m1,m2,label). Rows whose image is missing are
    an error, or left out when `skip_missing` (returned as the second value)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"annotation file {path} does not exist. Fix dataset.csv.* in the config.")
    rows, missing_files = [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise UserError(f"{path}: missing column(s) {sorted(missing)}; expected {COLUMNS}.")
        for i, r in enumerate(reader, start=2):
            rel = safe_relpath(root, r["img_path"], f"{path} line {i}")
            try:
                m1, m2, label = int(r["m1"]), int(r["m2"]), int(r["label"])
            except ValueError:
                raise UserError(
                    f"{path} line {i}: m1, m2 and label must be integers, got "
                    f"{r['m1']!r}, {r['m2']!r}, {r['label']!r}."
                ) from None
            if not (Path(root) / rel).is_file():
                if not skip_missing:
                    raise UserError(
                        f"{path} line {i}: image {Path(root) / rel} does not exist. Fix the "
                        f"row or dataset.root, or set dataset.on_bad_image=skip to leave "
                        f"such rows out."
                    )
                missing_files.append(rel)
                continue
            rows.append(
                dict(
                    img_path=rel,
                    text=r["text"],
                    m1=m1,
                    m2=m2,
                    label=label,
                    cls=class_key(Path(rel).parent.name),
                )
            )
    return rows, missing_files
