"""Datasets that read the prepared image cache (data/cache.py): uint8 3 x H x W images, scaled and
normalised later on the device (data.loader.model_input); images the cache does not hold are
decoded from their files with the same pixel steps, so a batch is uniform either way."""

import mmap
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset

from data.cache import (
    DEFAULT_BASE,
    ImageCache,
    cache_base,
    cache_ops,
    decode,
    is_random,
    pixel_ops,
    root_dir,
)
from data.loader import SketchPhotoDataset, sample_seed


class CachedDataset(Dataset):
    """Rows (root, annotation row) whose pixels come from memory-mapped cache shards.
    `augment`: the transform's random PIL steps, applied to each cached image (train only)."""

    def __init__(
        self,
        rows,
        prompts,
        tables,
        stored_ops,
        augment=None,
        max_pixels=None,
        seed=None,
    ):
        self.rows = rows
        self.max_pixels, self.seed, self.epoch = max_pixels, seed, 0
        self.prompt_ids = [prompts.id_of[r["text"]] for _, r in rows]
        self.where = [tables[str(root)].get(r["img_path"]) for root, r in rows]
        self.stored_ops, self.augment = stored_ops, augment
        self.maps = {}
        self.cached = sum(w is not None for w in self.where)

    def __len__(self):
        return len(self.rows)

    def pixels(self, i):
        where = self.where[i]
        if where is None:
            root, r = self.rows[i]
            return torch.from_numpy(
                decode(Path(root) / r["img_path"], self.stored_ops, self.max_pixels)
            ).permute(2, 0, 1)
        path, offset, h, w, c = where
        if path not in self.maps:  # opened lazily, so each loader worker maps its own
            with open(
                path, "rb"
            ) as f:  # a private (copy-on-write) map: writable, the file untouched
                pages = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self.maps[path] = torch.frombuffer(pages, dtype=torch.uint8)
        return self.maps[path][offset : offset + h * w * c].view(c, h, w)

    def __getitem__(self, i):
        image = self.pixels(i)
        if self.augment is not None:  # drawing from the sample's own seed, as SketchPhotoDataset
            pil = Image.fromarray(
                image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy()
            )
            with torch.random.fork_rng(devices=[]):
                if self.seed is not None:
                    torch.manual_seed(sample_seed(self.seed, self.epoch, i))
                image = torch.from_numpy(np.array(self.augment(pil.convert("RGB")))).permute(
                    2, 0, 1
                )
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        _, r = self.rows[i]
        return image, self.prompt_ids[i], r["m1"], r["m2"], r["label"], i


def _all_ranks(pairs):
    """Under DDP the (root, image) pairs of every rank, so that rank 0 builds the shards of all."""
    if not (dist.is_available() and dist.is_initialized()):
        return pairs
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, sorted(set(pairs)))
    return sorted(set().union(*parts))


def image_dataset(
    rows,
    transform,
    prompts,
    setting=False,
    progress=True,
    max_pixels=None,
    seed=None,
):
    """The dataset of these rows: from the image cache where it holds them (building it first when
    dataset.cache asks for it), else SketchPhotoDataset decoding the files with `transform`."""
    base, build = cache_base(setting)
    ops = pixel_ops(transform)
    stored = cache_ops(ops)
    pairs = [(str(root), r["img_path"]) for root, r in rows]
    by_root = {}
    for root, rel in _all_ranks(pairs) if build else pairs:
        by_root.setdefault(root, []).append(rel)
    distributed = dist.is_available() and dist.is_initialized()
    main = not distributed or dist.get_rank() == 0
    tables = {}
    for root, rels in by_root.items():
        cache = ImageCache.at(base, root, stored)
        if build and main:
            cache.build(rels, progress=progress)
        if build and distributed:
            dist.barrier()  # the other ranks wait for rank 0's build
        if not (build and main) and cache.dir.is_dir():
            cache.load(rels)
        tables[root] = cache.table()
    if not any(tables.values()):
        return SketchPhotoDataset(rows, transform, prompts, max_pixels, seed)
    return CachedDataset(
        rows, prompts, tables, stored, ops if is_random(ops) else None, max_pixels, seed
    )


def decodable(rows, base=DEFAULT_BASE):
    """(root, img_path) pairs that a fresh shard of any cache under `base` holds: images that
    decoded when the shard was built and have not changed since."""
    by_root, ok = {}, set()
    for root, r in rows:
        by_root.setdefault(root, []).append(r["img_path"])
    for root, rels in by_root.items():
        for header in sorted(root_dir(base, root).glob("*/cache.json")):
            key = (ImageCache.read_json(header) or {}).get("geometry")
            cache = ImageCache(root, header.parent, key)
            cache.load(rels)
            ok.update((root, rel) for rel in cache.table())
    return ok
