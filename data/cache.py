"""The prepared image cache: every image decoded once, resized and centre-cropped to the model's
input geometry, kept as raw uint8 pixels in memory-mapped shards (normalisation runs on the device).

python -m data.cache dataset=<name> [dataset.root...] [model=...]    builds or refreshes it
(`dataset.cache=true` does the same on first use in train / infer).

Layout: <base>/<root name>-<root hash>/<geometry>-<hash>/ holds cache.json (version, dataset root,
geometry) and, per image folder (at most SHARD_IMAGES images a shard), <shard>.u8 with the pixels
of its images back to back, channels first (1 x H x W for grey images, 3 x H x W for colour:
planes copy into a batch as whole rows) and <shard>.json: the images' names, their file size and
mtime at build time, each image's offset and channels, the shard's byte size, CRC-32 and file stat.
A shard is used only when all of that still matches; otherwise (an image changed, added or removed,
a shard damaged or cut short) that shard alone is rebuilt. Shards and sidecars are written to a
temporary file and renamed, sidecar last, as soon as the shard is whole: a crash, a full disk or a
Ctrl-C never leaves a shard that a later run reads, and keeps the shards finished before it.
"""

import hashlib
import json
import os
import re
import sys
import zlib
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from torchvision import transforms as T
from tqdm import tqdm

from data.loader import open_image
from runtime.io import DiskFullError, atomic_path, save_json
from runtime.errors import UserError
from runtime.logs import log

VERSION = 2  # 2: the one reader (data/image.py): 16-bit/float scaled, transparency on white
SHARD_IMAGES = 1024
DEFAULT_BASE = Path(__file__).resolve().parent.parent / ".cache" / "prepared"
AUGMENT_MARGIN = 8 / 7  # augmented training crops from a cache kept this much larger (256 for 224)


def cache_base(setting):
    """dataset.cache: false (use a cache that exists, build none), true (build in .cache/prepared)
    or a folder (build there)."""
    if isinstance(setting, (str, Path)) and str(setting).lower() not in ("", "false", "true"):
        return Path(setting).expanduser(), True
    return DEFAULT_BASE, setting is True or str(setting).lower() == "true"


def pixel_ops(transform):
    """The PIL steps of an open_clip transform (those before ToTensor) as one Compose."""
    ops = list(getattr(transform, "transforms", [transform]))
    names = [type(t).__name__ for t in ops]
    cut = next((i for i, n in enumerate(names) if "ToTensor" in n), None)
    if cut is None or names[cut + 1 :] != ["Normalize"]:
        raise UserError(
            f"the image cache needs a transform that ends in ToTensor + Normalize, got "
            f"{names}. Set dataset.cache=false for this model."
        )
    return T.Compose(ops[:cut])


def is_random(ops):
    return any(type(t).__name__.startswith("Random") for t in ops.transforms)


def cache_ops(ops):
    """What the cache stores for these pixel steps: the steps themselves, or for a random
    (augmenting) crop of size S a bicubic resize + centre crop to S * AUGMENT_MARGIN, which the
    crop then samples from in the loader."""
    if not is_random(ops):
        return ops
    crop = next(t for t in ops.transforms if hasattr(t, "size"))
    big = round(max(crop.size) * AUGMENT_MARGIN)
    return T.Compose([T.Resize(big, interpolation=crop.interpolation), T.CenterCrop(big)])


def geometry_key(ops):
    return " | ".join(
        re.sub(r"\s+", " ", re.sub(r" at 0x[0-9a-f]+", "", repr(t))) for t in ops.transforms
    )


def _digest(text):
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def root_dir(base, root):
    """The folder of one dataset root's caches (one subfolder per geometry)."""
    root = Path(root).resolve()
    return Path(base) / f"{root.name}-{_digest(str(root))}"


def cache_dir(base, root, key):
    size = re.search(r"size=\(?(\d+)", key)
    return root_dir(base, root) / f"{size.group(1) if size else 'img'}px-{_digest(key)}"


def shard_plan(rels):
    """Image paths grouped by folder, SHARD_IMAGES a shard: shard name -> (folder, [names])."""
    folders = {}
    for rel in sorted(set(rels)):
        folder, _, name = rel.rpartition("/")
        folders.setdefault(folder, []).append(name)
    plan = {}
    for folder, names in folders.items():
        stem = hashlib.sha1(folder.encode()).hexdigest()[:16]
        for k in range(0, len(names), SHARD_IMAGES):
            plan[f"{stem}-{k // SHARD_IMAGES}"] = (folder, names[k : k + SHARD_IMAGES])
    return plan


def file_stats(root, folder, names):
    out = []
    for n in names:
        try:
            out.append(stat_of(Path(root) / folder / n))
        except OSError:
            out.append(None)
    return out


def file_crc(path):
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def stat_of(path):
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def decode(path, ops, max_pixels=None):
    """An image as the files path makes it (data.loader.open_image, then the pixel steps): uint8 H
    x W x 3."""
    return np.asarray(ops(open_image(path, max_pixels)), dtype=np.uint8)


class Stopped(Exception):
    """A shard abandoned because the build stopped (another shard failed, or Ctrl-C)."""


def write_shard(job, stop=None):
    """Decode one shard's images and write <shard>.u8; returns its sidecar (not yet written).
    A set `stop` event abandons the shard (its temporary file is removed)."""
    directory, shard, root, folder, names, stats, ops = job
    offsets, channels, shape, crc, offset = [], [], None, 0, 0
    with atomic_path(directory / f"{shard}.u8") as tmp, open(tmp, "wb") as f:
        for name in names:
            if stop is not None and stop.is_set():
                raise Stopped(f"stopped while caching {Path(root) / folder}")
            a = decode(Path(root) / folder / name, ops)
            if shape is not None and a.shape[:2] != tuple(shape):
                raise UserError(
                    f"{Path(root) / folder / name}: the cache's pixel steps gave {a.shape[:2]} "
                    f"pixels, not {tuple(shape)}; use dataset.cache=false for this model."
                )
            shape = list(a.shape[:2])
            a = a.transpose(2, 0, 1)
            if (a[0] == a[1]).all() and (a[0] == a[2]).all():
                a = a[:1]  # a grey image (a sketch): one channel holds it exactly
            data = np.ascontiguousarray(a).tobytes()
            f.write(data)
            crc = zlib.crc32(data, crc)
            offsets.append(offset)
            channels.append(a.shape[0])
            offset += len(data)
    return dict(
        folder=folder,
        names=names,
        stats=stats,
        offsets=offsets,
        channels=channels,
        hw=shape,
        nbytes=offset,
        crc=crc,
        file_stat=stat_of(directory / f"{shard}.u8"),
    )


class ImageCache:
    """The cache of one dataset root at one geometry: which images it holds, and building."""

    def __init__(self, root, directory, key, ops=None):
        self.root, self.dir, self.key, self.ops = Path(root), Path(directory), key, ops
        self.shards = {}  # shard name -> sidecar, for the shards that are fresh

    @classmethod
    def at(cls, base, root, ops):
        """The cache of `root` for these pixel steps under `base`."""
        key = geometry_key(ops)
        return cls(root, cache_dir(base, root, key), key, ops)

    def header(self):
        return dict(version=VERSION, root=str(self.root.resolve()), geometry=self.key)

    def load(self, rels, verify=False):
        """Keep (in self.shards) the fresh shards of the folders these images are in, whichever
        set of images each was built for."""
        header = self.read_json(self.dir / "cache.json")
        if header is None:
            return
        if header != self.header():
            log.warning(
                f"image cache {self.dir} was built for {header.get('geometry')!r} "
                f"(version {header.get('version')}), not {self.key!r}: not used."
            )
            return
        folders = {rel.rpartition("/")[0] for rel in rels}
        for path in sorted(self.dir.glob("*.json")):
            side = self.read_json(path) if path.name != "cache.json" else None
            if (
                side is not None
                and side.get("folder") in folders
                and self._fresh(path.stem, side, verify)
            ):
                self.shards[path.stem] = side

    def check(self, rels, verify=False):
        """Load the fresh shards; returns the stale part of these images' shard plan."""
        self.load(rels, verify)
        return {
            shard: (folder, names, file_stats(self.root, folder, names))
            for shard, (folder, names) in shard_plan(rels).items()
            if self.shards.get(shard, {}).get("names") != names
        }

    def _fresh(self, shard, side, verify):
        if file_stats(self.root, side["folder"], side["names"]) != side["stats"]:
            return False
        path = self.dir / f"{shard}.u8"
        try:
            current = stat_of(path)
        except OSError:
            return False
        if current[0] != side["nbytes"]:
            log.warning(
                f"image cache shard {path} has {current[0]} bytes, not {side['nbytes']}: "
                f"rebuilding it."
            )
            return False
        if (verify or current != side["file_stat"]) and file_crc(path) != side["crc"]:
            log.warning(f"image cache shard {path} is damaged (checksum mismatch): rebuilding it.")
            return False
        return True

    @staticmethod
    def read_json(path):
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError):
            return None

    def build(self, rels, workers=None, verify=False, progress=True):
        """Bring the cache up to date for these images; returns (shards rebuilt, shards in all)."""
        stale = self.check(rels, verify)
        if not stale:
            return 0, len(self.shards)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_json(self.header(), self.dir / "cache.json")
            stop = threading.Event()
            # threads, not a forked pool: Pillow releases the GIL, and a fork can deadlock
            # (BENCHMARKS.md)
            pool = ThreadPoolExecutor(
                max(1, min(workers or os.cpu_count() or 1, len(stale))), "cache"
            )
            shard_of = {
                pool.submit(
                    write_shard, (self.dir, s, self.root, folder, names, stats, self.ops), stop
                ): s
                for s, (folder, names, stats) in stale.items()
            }
            try:
                with tqdm(
                    total=sum(len(names) for _, names, _ in stale.values()),
                    unit="img",
                    desc=f"caching images ({self.dir.name})",
                    disable=not progress,
                    dynamic_ncols=True,
                ) as bar:
                    for done in as_completed(
                        shard_of
                    ):  # each sidecar written as soon as its shard is whole
                        bar.update(len(self._keep(shard_of[done], done.result())["names"]))
            finally:
                stop.set()  # on an error or Ctrl-C the other threads stop at their next image
                pool.shutdown(wait=True, cancel_futures=True)
        except (OSError, UserError) as e:  # each thread removed its own half-written shard
            if isinstance(e, UserError) and not isinstance(
                e, DiskFullError
            ):  # an unreadable image, named
                raise
            raise UserError(
                f"could not write the image cache in {self.dir}: {e}. Free disk space or make "
                f"the folder writable, or point dataset.cache at another folder "
                f"(dataset.cache=/path/with/room); dataset.cache=false reads the image files."
            ) from None
        return len(stale), len(self.shards)

    def _keep(self, shard, side):
        save_json(side, self.dir / f"{shard}.json")
        self.shards[shard] = side
        return side

    def table(self):
        """Relative image path -> (shard file, byte offset, height, width, channels)."""
        out = {}
        for shard, side in self.shards.items():
            h, w = side["hw"]
            path = str(self.dir / f"{shard}.u8")
            for name, off, c in zip(side["names"], side["offsets"], side["channels"]):
                out[f"{side['folder']}/{name}" if side["folder"] else name] = (path, off, h, w, c)
        return out

    def disk_bytes(self):
        return sum(side["nbytes"] for side in self.shards.values())


def main(argv):
    """Build (or refresh and fully verify) the cache for every split of a dataset config."""
    from data.geometry import transforms
    from data.index import make_splits
    from runtime.logs import setup_logging
    from omegaconf import OmegaConf

    from config.schema import compose_config

    setup_logging()
    cfg = compose_config("config-train", argv)
    OmegaConf.resolve(cfg)  # the presets' ${ma.fine_grained:...} values need the whole config
    train_tf, eval_tf = transforms(cfg.model.backbone, cfg.model.get("pretrained"))  # no weights
    splits = make_splits(cfg.dataset)
    base = cache_base(cfg.dataset.cache)[0]
    wanted = [(eval_tf, splits.train + splits.val + splits.test)]
    if cfg.dataset.augment:
        wanted.append((train_tf, splits.train))
    for tf, rows in wanted:
        by_root = {}
        for root, r in rows:
            by_root.setdefault(root, []).append(r["img_path"])
        for root, rels in by_root.items():
            cache = ImageCache.at(base, root, cache_ops(pixel_ops(tf)))
            rebuilt, total = cache.build(rels, verify=True)
            print(
                f"{cache.dir}: {len(set(rels))} images in {total} shards ({rebuilt} rebuilt), "
                f"{cache.disk_bytes() / 1e9:.2f} GB"
            )
    return 0


if __name__ == "__main__":
    from runtime.errors import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
