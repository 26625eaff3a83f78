"""Datasets that read the prepared image cache (data/cache.py): uint8 H x W x 3 images, scaled and
normalised later on the device (data.loader.model_input); images the cache does not hold are
decoded from their files with the same pixel steps, so a batch is uniform either way."""
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import Dataset

from data.cache import DEFAULT_BASE, ImageCache, cache_ops, decode, is_random, pixel_ops, root_dir
from data.loader import SketchPhotoDataset


class CachedDataset(Dataset):
    """Rows (root, annotation row) whose pixels come from memory-mapped cache shards.
    `augment`: the transform's random PIL steps, applied to each cached image (train only)."""

    def __init__(self, rows, prompts, tables, stored_ops, augment=None):
        self.rows = rows
        self.prompt_ids = [prompts.id_of[r["text"]] for _, r in rows]
        self.where = [tables[root].get(r["img_path"]) for root, r in rows]
        self.stored_ops, self.augment = stored_ops, augment
        self.maps = {}
        self.cached = sum(w is not None for w in self.where)

    def __len__(self):
        return len(self.rows)

    def pixels(self, i):
        where = self.where[i]
        if where is None:
            root, r = self.rows[i]
            return decode(Path(root) / r["img_path"], self.stored_ops)
        path, offset, h, w, c = where
        if path not in self.maps:  # opened lazily, so each loader worker maps its own
            self.maps[path] = np.memmap(path, dtype=np.uint8, mode="c")
        return self.maps[path][offset:offset + h * w * c].reshape(h, w, c)

    def __getitem__(self, i):
        a = self.pixels(i)
        if self.augment is not None:
            a = np.array(self.augment(Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).convert("RGB")))
        image = torch.from_numpy(a)
        if image.shape[2] == 1:
            image = image.expand(-1, -1, 3)
        _, r = self.rows[i]
        return image, self.prompt_ids[i], r["m1"], r["m2"], r["label"], i


def _all_ranks(rels):
    """Under DDP every rank plans the shards of all ranks' images, so the shards agree."""
    if not (dist.is_available() and dist.is_initialized()):
        return rels
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, sorted(set(rels)))
    return sorted(set().union(*parts))


def cache_base(setting):
    """dataset.cache: false (use a cache that exists, build none), true (build in .cache/prepared)
    or a folder (build there)."""
    if isinstance(setting, (str, Path)) and str(setting).lower() not in ("", "false", "true"):
        return Path(setting).expanduser(), True
    return DEFAULT_BASE, setting is True or str(setting).lower() == "true"


def image_dataset(rows, transform, prompts, setting=False, progress=True):
    """The dataset of these rows: from the image cache where it holds them (building it first when
    dataset.cache asks for it), else SketchPhotoDataset decoding the files with `transform`."""
    base, build = cache_base(setting)
    ops = pixel_ops(transform)
    stored = cache_ops(ops)
    by_root = {}
    for root, r in rows:
        by_root.setdefault(root, []).append(r["img_path"])
    distributed = dist.is_available() and dist.is_initialized()
    main = not distributed or dist.get_rank() == 0
    tables = {}
    for root, rels in by_root.items():
        cache = ImageCache.at(base, root, stored)
        rels = _all_ranks(rels)
        if build and main:
            cache.build(rels, progress=progress)
        if build and distributed:
            dist.barrier()  # the other ranks wait for rank 0's build
        if not (build and main) and cache.dir.is_dir():
            cache.check(rels)
        tables[root] = cache.table()
    if not any(tables.values()):
        return SketchPhotoDataset(rows, transform, prompts)
    return CachedDataset(rows, prompts, tables, stored, ops if is_random(ops) else None)


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
            cache.check(rels)
            ok.update((root, rel) for rel in cache.table())
    return ok
