"""The demo dataset: 25 named shape classes drawn as photos and as hand-drawn-looking sketches.

Generated deterministically on first use into an ignored cache folder, in the `folder` layout
(<root>/photo/<class>/*.jpg, <root>/sketch/<class>/*.png, <root>/unseen.txt), so it goes
through the same loader path as real data. Photos are filled, coloured, textured objects on
cluttered backgrounds; sketches are thin, wobbly, sometimes incomplete outlines on white. Half
of a class's sketches are drawn from given photos (same shape, pose, position and scale), named
`<photo stem>-1.png`: the fine-grained pairs (data/pairs.py). `--poses wide` (POSES) places
smaller objects anywhere in the image instead of the default's large, nearly centred ones.
`--fine-grained` (FINE_GRAINED; `dataset.root` of the demo preset in fine-grained training)
writes the demo that fine-grained training learns from: wide poses and 80 pairs a class.
"""

import argparse
import functools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from runtime.errors import UserError, run_cli

VERSION = 2  # 2: half the sketches drawn from given photos (fine-grained pairs)
SIZE = 64
DEFAULT_ROOT = Path(__file__).resolve().parent.parent / ".cache" / "demo"
UNSEEN = ["kite", "sun", "bottle", "leaf", "tent", "cross"]
# The fine-grained demo (dataset.root=fine-grained): where an object lies and how large it is
# identify the instance (wide poses), and 80 paired photos a class make rote pairing slower than
# reading the pose, so the tiny model's instance matching carries over to unseen classes (on the
# default demo's 20 pairs of nearly centred objects it stays at chance: BENCHMARKS.md).
FINE_GRAINED = dict(
    root=DEFAULT_ROOT.parent / "demo-fine-grained", n_photo=80, n_sketch=160, poses="wide"
)
FINE_GRAINED_NAME = "fine-grained"  # the dataset.root value that names it


def _circle(cx, cy, r, n=40, start=0.0, end=2 * math.pi):
    return [
        (
            cx + r * math.cos(start + (end - start) * i / n),
            cy + r * math.sin(start + (end - start) * i / n),
        )
        for i in range(n + 1)
    ]


def _star(points, r_out, r_in):
    return [
        (
            (r_out if i % 2 == 0 else r_in) * math.sin(math.pi * i / points),
            -(r_out if i % 2 == 0 else r_in) * math.cos(math.pi * i / points),
        )
        for i in range(2 * points + 1)
    ]


# Each class: a list of closed polygons in [-1, 1]^2 (y down). Filled in photos, outlined in
# sketches.
SHAPES = {
    "apple": [_circle(0, 0.1, 0.7), [(-0.05, -0.6), (0.05, -0.6), (0.1, -0.95), (0.0, -0.95)]],
    "star": [_star(5, 0.95, 0.4)],
    "house": [[(-0.7, 0.9), (0.7, 0.9), (0.7, -0.1), (0, -0.85), (-0.7, -0.1)]],
    "moon": [
        _circle(0, 0, 0.85, start=0.5 * math.pi, end=1.5 * math.pi)
        + _circle(-0.35, 0, 0.7, start=1.4 * math.pi, end=0.6 * math.pi)
    ],
    "heart": [
        [
            (
                16 * math.sin(t) ** 3 / 17,
                -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
                / 17,
            )
            for t in np.linspace(0, 2 * math.pi, 40)
        ]
    ],
    "diamond": [[(0, -0.95), (0.6, 0), (0, 0.95), (-0.6, 0)]],
    "arrow": [
        [(-0.9, -0.2), (0.2, -0.2), (0.2, -0.6), (0.9, 0), (0.2, 0.6), (0.2, 0.2), (-0.9, 0.2)]
    ],
    "hourglass": [[(-0.6, -0.9), (0.6, -0.9), (0.08, 0), (0.6, 0.9), (-0.6, 0.9), (-0.08, 0)]],
    "egg": [
        [
            (0.6 * math.cos(t), (0.85 if math.sin(t) > 0 else 0.95) * math.sin(t))
            for t in np.linspace(0, 2 * math.pi, 40)
        ]
    ],
    "umbrella": [
        _circle(0, 0, 0.9, start=math.pi, end=2 * math.pi),
        [(-0.05, 0), (0.05, 0), (0.05, 0.8), (-0.25, 0.8), (-0.25, 0.7), (-0.05, 0.7)],
    ],
    "cup": [
        [(-0.6, -0.7), (0.5, -0.7), (0.35, 0.8), (-0.45, 0.8)],
        [
            (0.45, -0.4),
            (0.85, -0.4),
            (0.85, 0.3),
            (0.4, 0.3),
            (0.42, 0.15),
            (0.7, 0.15),
            (0.7, -0.25),
            (0.44, -0.25),
        ],
    ],
    "fish": [
        [(0.9 * math.cos(t) - 0.15, 0.45 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 30)],
        [(-0.95, -0.5), (-0.6, 0), (-0.95, 0.5)],
    ],
    "key": [
        _circle(-0.5, 0, 0.35),
        [
            (-0.2, -0.08),
            (0.9, -0.08),
            (0.9, 0.3),
            (0.75, 0.3),
            (0.75, 0.08),
            (0.55, 0.08),
            (0.55, 0.25),
            (0.4, 0.25),
            (0.4, 0.08),
            (-0.2, 0.08),
        ],
    ],
    "tree": [
        [
            (0, -0.95),
            (0.5, -0.3),
            (0.25, -0.3),
            (0.7, 0.4),
            (0.12, 0.4),
            (0.12, 0.95),
            (-0.12, 0.95),
            (-0.12, 0.4),
            (-0.7, 0.4),
            (-0.25, -0.3),
            (-0.5, -0.3),
        ]
    ],
    "bell": [
        [
            (-0.15, -0.9),
            (0.15, -0.9),
            (0.5, -0.3),
            (0.55, 0.5),
            (0.85, 0.7),
            (-0.85, 0.7),
            (-0.55, 0.5),
            (-0.5, -0.3),
        ],
        _circle(0, 0.8, 0.15),
    ],
    "lightning": [
        [
            (0.1, -0.95),
            (0.6, -0.95),
            (0.2, -0.15),
            (0.55, -0.15),
            (-0.35, 0.95),
            (-0.05, 0.1),
            (-0.4, 0.1),
        ]
    ],
    "ring": [_circle(0, 0, 0.85), _circle(0, 0, 0.55)],
    "envelope": [
        [(-0.9, -0.55), (0.9, -0.55), (0.9, 0.55), (-0.9, 0.55)],
        [(-0.9, -0.55), (0, 0.1), (0.9, -0.55)],
    ],
    "mushroom": [
        _circle(0, 0.05, 0.85, start=math.pi, end=2 * math.pi),
        [(-0.22, 0.05), (0.22, 0.05), (0.28, 0.9), (-0.28, 0.9)],
    ],
    "kite": [
        [(0, -0.95), (0.55, -0.3), (0, 0.6), (-0.55, -0.3)],
        [(0, 0.6), (0.1, 0.75), (-0.1, 0.85), (0.05, 0.97)],
    ],
    "sun": [_circle(0, 0, 0.45)]
    + [
        [
            (0.55 * math.cos(a - 0.12), 0.55 * math.sin(a - 0.12)),
            (0.95 * math.cos(a), 0.95 * math.sin(a)),
            (0.55 * math.cos(a + 0.12), 0.55 * math.sin(a + 0.12)),
        ]
        for a in np.linspace(0, 2 * math.pi, 9)[:-1]
    ],
    "bottle": [
        [
            (-0.3, 0.95),
            (0.3, 0.95),
            (0.3, -0.2),
            (0.1, -0.5),
            (0.1, -0.95),
            (-0.1, -0.95),
            (-0.1, -0.5),
            (-0.3, -0.2),
        ]
    ],
    "leaf": [
        [
            (0.9 * math.cos(t), 0.45 * math.sin(t) * (1 - 0.3 * math.cos(t)))
            for t in np.linspace(0, 2 * math.pi, 30)
        ],
        [(-0.9, 0), (-1.0, 0.1)],
    ],
    "tent": [[(-0.9, 0.8), (0, -0.8), (0.9, 0.8)], [(-0.15, 0.8), (0, 0.3), (0.15, 0.8)]],
    "cross": [
        [
            (-0.2, -0.9),
            (0.2, -0.9),
            (0.2, -0.2),
            (0.9, -0.2),
            (0.9, 0.2),
            (0.2, 0.2),
            (0.2, 0.9),
            (-0.2, 0.9),
            (-0.2, 0.2),
            (-0.9, 0.2),
            (-0.9, -0.2),
            (-0.2, -0.2),
        ]
    ],
}


# How objects are placed: the scale range of photos and of free sketches (in units of half the
# image) and the largest shift (a fraction of the image). "v2", the default, fills most of the
# image; "wide" (benchmarks/fine_grained_probe.py, BENCHMARKS.md) draws smaller objects anywhere,
# so that a photo's instance shows in where its object lies.
POSES = {
    "v2": dict(photo=(0.6, 0.85), sketch=(0.55, 0.9), shift=0.12),
    "wide": dict(photo=(0.3, 0.5), sketch=(0.3, 0.5), shift=0.3),
}


def _pose(rng, scale_range, shift):
    """A random placement: (scale in units of half the image, angle, shift x, shift y, stretch)."""
    scale = rng.uniform(*scale_range)
    angle = rng.uniform(-0.35, 0.35)
    dx, dy = rng.uniform(-shift, shift, size=2)
    return scale, angle, dx, dy, rng.uniform(0.85, 1.15)


def check_poses(poses):
    if poses not in POSES:
        raise UserError(f"demo poses {poses!r} unknown; choose one of {', '.join(POSES)}.")
    return POSES[poses]


def _place(polys, pose, size):
    unit, angle, dx, dy, stretch = pose
    scale = unit * size / 2
    c, s = math.cos(angle), math.sin(angle)
    sx = scale * stretch
    return [
        [
            (
                size / 2 + dx * size + sx * (c * x - s * y),
                size / 2 + dy * size + scale * (s * x + c * y),
            )
            for x, y in poly
        ]
        for poly in polys
    ]


def _random_color(rng, lo=0, hi=255):
    return tuple(int(v) for v in rng.integers(lo, hi, size=3))


def draw_photo(cls, rng, size=SIZE, with_pose=False, poses="v2"):
    """A photo of `cls`; with_pose: (photo, the object's pose) for sketches drawn from it."""
    place = check_poses(poses)
    big = size * 2
    top, bottom = _random_color(rng), _random_color(rng)
    grad = np.linspace(0, 1, big)[:, None, None]
    bg = (np.array(top) * (1 - grad) + np.array(bottom) * grad) * np.ones((1, big, 1))
    bg += rng.normal(0, 12, size=bg.shape)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(rng.integers(4, 9)):  # clutter
        x, y = rng.uniform(0, big, size=2)
        w, h = rng.uniform(4, big / 4, size=2)
        box = [x - w, y - h, x + w, y + h]
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=_random_color(rng))
    pose = _pose(rng, place["photo"], place["shift"])
    polys = _place(SHAPES[cls], pose, big)
    fill, texture = _random_color(rng), _random_color(rng)
    mask = Image.new("L", (big, big), 0)
    md = ImageDraw.Draw(mask)
    for i, poly in enumerate(polys):
        md.polygon(poly, fill=0 if (cls == "ring" and i == 1) else 255)
    obj = Image.new("RGB", (big, big), fill)
    od = ImageDraw.Draw(obj)
    period = int(rng.integers(6, 14))
    if rng.random() < 0.5:
        for k in range(-big, 2 * big, period):
            od.line([(k, 0), (k + big * rng.uniform(-0.5, 0.5), big)], fill=texture, width=3)
    else:
        for yy in range(0, big, period):
            for xx in range(0, big, period):
                od.ellipse([xx, yy, xx + 3, yy + 3], fill=texture)
    img.paste(obj, (0, 0), mask)
    img = img.filter(ImageFilter.GaussianBlur(0.6)).resize((size, size), Image.BILINEAR)
    return (img, pose) if with_pose else img


def _wobble(poly, rng, amp):
    pts = np.array(poly + [poly[0]] if len(poly) > 3 else poly, dtype=float)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    t = np.concatenate([[0], np.cumsum(seg)])
    n = max(8, int(t[-1] / 3))
    ts = np.linspace(0, t[-1], n)
    res = np.stack([np.interp(ts, t, pts[:, 0]), np.interp(ts, t, pts[:, 1])], axis=1)
    noise = np.cumsum(rng.normal(0, amp, size=res.shape), axis=0)
    noise -= np.linspace(0, 1, n)[:, None] * noise[-1]  # drift that returns to the start
    return res + noise + rng.normal(0, amp * 0.3, size=res.shape)


def draw_sketch(cls, rng, size=SIZE, pose=None, poses="v2"):
    """A sketch of `cls`; given a photo's pose, drawn from that photo: the same shape, position,
    scale and angle, with a wobbly, sometimes incomplete outline of its own."""
    big = size * 2
    img = Image.new("L", (big, big), 255)
    d = ImageDraw.Draw(img)
    if pose is None:
        place = check_poses(poses)
        pose = _pose(rng, place["sketch"], place["shift"])
    polys = _place(SHAPES[cls], pose, big)
    width = int(rng.integers(2, 4))
    for poly in polys:
        pts = _wobble(poly, rng, amp=0.6)
        if rng.random() < 0.3 and len(pts) > 12:  # an incomplete stroke
            cut = int(rng.integers(0, len(pts) - 6))
            pts = (
                np.concatenate([pts[cut + int(len(pts) * 0.2) :], pts[:cut]])
                if cut
                else pts[len(pts) // 5 :]
            )
        d.line([tuple(p) for p in pts], fill=int(rng.integers(0, 60)), width=width, joint="curve")
    return img.resize((size, size), Image.LANCZOS).convert("RGB")


def generate(root=DEFAULT_ROOT, n_photo=40, n_sketch=40, seed=0, poses="v2"):
    """Write the demo dataset under `root` unless an identical one is already there."""
    root = Path(root)
    check_poses(poses)
    meta = dict(
        version=VERSION,
        n_photo=n_photo,
        n_sketch=n_sketch,
        n_paired=paired_count(n_photo, n_sketch),
        seed=seed,
        size=SIZE,
        classes=sorted(SHAPES),
        unseen=UNSEEN,
        poses=poses,
    )
    meta_file = root / "demo.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()) == meta:
        return root
    if root.exists() and not meta_file.is_file() and (not root.is_dir() or any(root.iterdir())):
        raise UserError(
            f"{root} is not empty and holds no demo dataset (no demo.json); the demo is never "
            f"written over other files. Give dataset.root a new or empty folder, or leave it "
            f"unset for .cache/demo."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        draw_all(tmp, n_photo, n_sketch, seed, meta, poses)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if root.exists():  # an empty folder, or an older demo dataset (it has demo.json)
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root


def paired_count(n_photo, n_sketch):
    """How many of a class's sketches are drawn from its photos (one each, the first photos)."""
    return min(n_photo, n_sketch // 2)


def draw_all(tmp, n_photo, n_sketch, seed, meta, poses="v2"):
    """Per class: photos <cls>_<i>.jpg; sketches <cls>_<i>-1.png drawn from photo i (the
    fine-grained pairs, data/pairs.py), then free sketches <cls>_free_<j>.png."""
    n_paired = paired_count(n_photo, n_sketch)
    for k, cls in enumerate(sorted(SHAPES)):
        rng = np.random.default_rng([seed, k])
        photos, sketches = tmp / "photo" / cls, tmp / "sketch" / cls
        photos.mkdir(parents=True, exist_ok=True)
        sketches.mkdir(parents=True, exist_ok=True)
        placed = []
        for i in range(n_photo):
            img, pose = draw_photo(cls, rng, with_pose=True, poses=poses)
            img.save(photos / f"{cls}_{i:03d}.jpg", quality=92)
            placed.append(pose)
        for i in range(n_paired):
            draw_sketch(cls, rng, pose=placed[i]).save(sketches / f"{cls}_{i:03d}-1.png")
        for j in range(n_sketch - n_paired):
            draw_sketch(cls, rng, poses=poses).save(sketches / f"{cls}_free_{j:03d}.png")
    (tmp / "unseen.txt").write_text("".join(c + "\n" for c in UNSEEN))
    (tmp / "demo.json").write_text(json.dumps(meta))


def main():
    ap = argparse.ArgumentParser(description="Generate the demo sketch/photo dataset.")
    ap.add_argument("--root", default=str(DEFAULT_ROOT))
    ap.add_argument("--n-photo", type=int, default=40)
    ap.add_argument("--n-sketch", type=int, default=40)
    ap.add_argument("--poses", default="v2", choices=sorted(POSES), help="object placement")
    ap.add_argument(
        "--fine-grained",
        action="store_true",
        help=f"the fine-grained demo ({FINE_GRAINED['root']}: wide poses, 80 pairs a class); "
        "--root may move it, the other options are ignored",
    )
    args = ap.parse_args()
    if args.fine_grained:
        params = {k: v for k, v in FINE_GRAINED.items() if k != "root"}
        where = args.root if args.root != str(DEFAULT_ROOT) else FINE_GRAINED["root"]
        root = run_cli(functools.partial(generate, **params), where)
    else:
        make = functools.partial(generate, poses=args.poses)
        root = run_cli(make, args.root, args.n_photo, args.n_sketch)
    print(f"demo dataset ready at {root}")


if __name__ == "__main__":
    main()
