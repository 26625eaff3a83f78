"""Images/s of the training data loader, from the image files and from the prepared cache.

python -m benchmarks.loader [--per-kind 300] [--workers 0 1 2] [--image-size 224] [--batch-size 256]
python -m benchmarks.loader --demo        # the demo dataset, open_clip's augmenting train transform

The default set is generated once into .cache/bench-loader, shaped like the real data: 1111 x 1111
grey PNG sketches (TU-Berlin), 256 x 256 PNG sketches (Sketchy) and JPEG photos of 256-640 px a
side (Sketchy / TU-Berlin photos), `--per-kind` of each. From files: decode + open_clip's eval
transform (short side to the input size, centre crop, to tensor, normalise) in the workers. From
the cache: uint8 crops read from memory-mapped shards; the batch is normalised on the device
(timed here on the CPU too, in the main process, as the last column). The first batch (worker
start-up) is not timed; the cache is built before timing (its build rate is printed), and the
disk size and decode rate of the alternatives (JPEG or PNG shards of the same crops) are printed.
"""

import argparse
import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageFilter

from data.cache import ImageCache, cache_ops, pixel_ops
from data.cached import image_dataset
from data.loader import PromptTable, SketchPhotoDataset, make_loader, model_input

BENCH_ROOT = Path(__file__).resolve().parent.parent / ".cache" / "bench-loader"
KINDS = {
    "tuberlin_sketch": ("sketch/tuberlin", ".png"),
    "sketchy_sketch": ("sketch/sketchy", ".png"),
    "photo": ("photo/mixed", ".jpg"),
}


def measure(dataset, batch_size, workers, epochs, transform=None):
    """Images/s over `epochs` passes, the first batch not timed; with `transform`, cached uint8
    batches are also normalised (model_input) in the timed loop."""
    loader = make_loader(dataset, batch_size, workers, shuffle=True)
    images, start = 0, None
    for _ in range(epochs):
        for batch in loader:
            if transform is not None:
                model_input(batch["image"], transform)
            if start is None:  # the first batch includes worker start-up
                start = time.perf_counter()
                continue
            images += batch["image"].shape[0]
    return images / (time.perf_counter() - start)


def strokes(rng, size, n, width):
    im = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(im)
    for _ in range(n):
        pts = (
            np.cumsum(rng.normal(0, size / 12, size=(12, 2)), axis=0)
            + rng.uniform(0.2, 0.8, 2) * size
        )
        draw.line([tuple(p) for p in pts], fill=0, width=width)
    return im


def photo(rng):
    w, h = rng.integers(256, 641, size=2)
    noise = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    im = (
        Image.fromarray(noise)
        .resize((int(w), int(h)), Image.BICUBIC)
        .filter(ImageFilter.GaussianBlur(2))
    )
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x, y = rng.integers(0, w), rng.integers(0, h)
        draw.ellipse(
            [x, y, x + w // 4, y + h // 4], fill=tuple(int(c) for c in rng.integers(0, 256, 3))
        )
    return im


def fresh_folder(folder):
    """Empty a folder this benchmark made (it holds its marker) for a new set; never another one."""
    marker = folder / ".made-by-benchmarks-loader"
    if folder.exists() and any(folder.iterdir()) and not marker.is_file():
        raise SystemExit(
            f"error: {folder} holds files this benchmark did not write; move them away first."
        )
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    marker.write_text("")


def generate_real_shaped(root, per_kind, seed=0):
    """The generated set (kept while --per-kind stays the same): relative image paths."""
    stamp = root / f"done-{per_kind}"
    if not stamp.is_file():
        fresh_folder(root)
        rng = np.random.default_rng(seed)
        for kind, (folder, ext) in KINDS.items():
            (root / folder).mkdir(parents=True, exist_ok=True)
            for i in range(per_kind):
                if kind == "tuberlin_sketch":
                    im = strokes(rng, 1111, 8, 3)
                elif kind == "sketchy_sketch":
                    im = strokes(rng, 256, 6, 2).convert("RGB")
                else:
                    im = photo(rng)
                im.save(root / folder / f"{i:05d}{ext}", quality=90)
        stamp.write_text("")
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix in (".png", ".jpg")
    )


def demo_rows():
    from data.demo import DEFAULT_ROOT, generate
    from data.index import make_splits

    dcfg = OmegaConf.create(
        dict(
            train_idx=["demo"],
            test_idx=None,
            root=str(generate(DEFAULT_ROOT)),
            cls_ratio=1.0,
            csv={},
        )
    )
    return make_splits(dcfg, need_test=False).train


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--image-size", type=int, default=224, help="224 = ViT-B-32's input")
    ap.add_argument("--per-kind", type=int, default=300)
    ap.add_argument("--file-epochs", type=int, default=1)
    ap.add_argument("--cache-epochs", type=int, default=6)
    ap.add_argument(
        "--demo", action="store_true", help="the demo dataset with the augmenting train transform"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    transform = open_clip.image_transform(args.image_size, is_train=args.demo)
    if args.demo:
        rows = demo_rows()
    else:
        rows = [
            (
                BENCH_ROOT,
                dict(
                    img_path=rel, text="a photo of a thing.", m1=int("sketch" in rel), m2=3, label=1
                ),
            )
            for rel in generate_real_shaped(BENCH_ROOT, args.per_kind)
        ]
    prompts = PromptTable(rows, open_clip.get_tokenizer("ViT-B-32"))
    cache_base = BENCH_ROOT.parent / "bench-loader-cache"
    fresh_folder(cache_base)
    t0 = time.perf_counter()
    cached = image_dataset(rows, transform, prompts, str(cache_base), progress=False)
    build = len(rows) / (time.perf_counter() - t0)
    files = SketchPhotoDataset(rows, transform, prompts)
    print(
        f"{len(rows)} images ({'demo' if args.demo else 'real-shaped'}), batch {args.batch_size}, "
        f"output {args.image_size} px, {os.cpu_count()} CPU cores, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"cache build: {build:.1f} images/s (up to {os.cpu_count()} threads, one a shard)")
    disk_report(rows, transform, cache_base)
    print(
        "| workers | files images/s | cache images/s | cache / files | cache + normalise on CPU |"
    )
    print("| --- | --- | --- | --- | --- |")
    for w in args.workers:
        f = measure(files, args.batch_size, w, args.file_epochs)
        c = measure(cached, args.batch_size, w, args.cache_epochs)
        n = measure(cached, args.batch_size, w, args.cache_epochs, transform)
        print(f"| {w} | {f:.1f} | {c:.1f} | {c / f:.1f}x | {n:.1f} |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def format_report(cache, n=200):
    """What a compressed shard would cost: decoding the cached crops re-encoded as JPEG (quality 95)
    or PNG, per image, against reading the raw planes (one core)."""
    table = list(cache.table().values())[:: max(1, len(cache.table()) // n)]
    planes = [
        np.fromfile(path, dtype=np.uint8, count=h * w * c, offset=off).reshape(c, h, w)
        for path, off, h, w, c in table
    ]
    images = [Image.fromarray(p[0] if p.shape[0] == 1 else p.transpose(1, 2, 0)) for p in planes]
    for fmt, kwargs in (("JPEG", dict(quality=95)), ("PNG", {})):
        blobs = []
        for im in images:
            buf = io.BytesIO()
            im.save(buf, fmt, **kwargs)
            blobs.append(buf.getvalue())
        t0 = time.perf_counter()
        for blob in blobs:
            np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
        per = (time.perf_counter() - t0) / len(blobs)
        size = sum(map(len, blobs)) / len(blobs)
        print(
            f"format: {fmt} shards would hold {size / 1e3:.1f} kB per image "
            f"({size * 1e5 / 1e9:.1f} GB per 100k) "
            f"and decode at {1 / per:.0f} images/s per core"
        )
    t0 = time.perf_counter()
    for p in planes:
        torch.from_numpy(p).expand(3, -1, -1).clone()
    print(
        f"format: raw planes (this cache) copy at {len(planes) / (time.perf_counter() - t0):.0f} "
        f"images/s per core"
    )


def disk_report(rows, transform, base):
    """Bytes on disk per 100k images of each kind (shard sizes as stored)."""
    cache = ImageCache.at(base, rows[0][0], cache_ops(pixel_ops(transform)))
    cache.check([r["img_path"] for _, r in rows])
    per_kind = {}
    for side in cache.shards.values():
        kind = side["folder"]
        n, b = per_kind.get(kind, (0, 0))
        per_kind[kind] = (n + len(side["names"]), b + side["nbytes"])
    for kind, (n, b) in sorted(per_kind.items()):
        print(
            f"disk: {kind}: {b / n / 1e3:.1f} kB per image, {b / n * 1e5 / 1e9:.1f} GB per 100k "
            f"images"
        )
    src = sum((rows[0][0] / r["img_path"]).stat().st_size for _, r in rows)
    print(f"disk: source files {src / len(rows) / 1e3:.1f} kB per image on average")
    format_report(cache)


if __name__ == "__main__":
    main()
