"""Image dataset and loaders: decoding and transforms run in worker processes, prompts are
tokenised once per distinct prompt, and each sample carries the id of its prompt."""

import atexit
import multiprocessing
import os
import signal
import threading

import torch
from torch.utils.data import DataLoader, Dataset

from data.image import read_image
from runtime.errors import UserError


def open_image(path, max_pixels=None, draft=None):
    """Decode an image fully with the project's one reader (data/image.py: first frame, EXIF
    orientation, 16-bit and float scaled to 8 bit, transparency on white, RGB). An image above
    `max_pixels` is refused from its header, before decoding, as a possible decompression bomb.
    draft=(w, h): let JPEG decode at a reduced scale (the whole stream is still read)."""
    try:
        return read_image(path, max_pixels, key="dataset.max_image_pixels", draft=draft)
    except UserError as e:  # a plain UserError: runtime/errors.py finds it in a worker's trace
        raise UserError(str(e)) from None


def unreadable(path, max_pixels=None):
    """Why an image file cannot be used (missing, truncated, not an image, too large), or None.
    Decodes the whole file (JPEGs at 1/8 scale, which still reads every byte)."""
    try:
        open_image(path, max_pixels, draft=(1, 1))
    except UserError as e:
        return str(e)
    return None


def sample_seed(seed, epoch, index):
    """The augmentation seed of one sample: the same wherever and whenever it is loaded."""
    return (((int(seed) * 1_000_003) ^ int(epoch)) * 10_000_019 + int(index)) % (2**63 - 1)


class PromptTable:
    """Distinct prompts of a set of rows, tokenised once."""

    def __init__(self, rows, tokenizer):
        self.texts = sorted({r["text"] for _, r in rows})
        self.id_of = {t: i for i, t in enumerate(self.texts)}
        self.tokens = tokenizer(self.texts) if self.texts else None


class SketchPhotoDataset(Dataset):
    """(root, row) pairs -> (image, prompt id, m1, m2, label, index). With `seed` set, random
    transforms draw from sample_seed(seed, epoch, index), so workers and resumes agree."""

    def __init__(self, rows, transform, prompts, max_pixels=None, seed=None):
        self.rows = rows
        self.transform = transform
        self.prompt_ids = [prompts.id_of[r["text"]] for _, r in rows]
        self.max_pixels = max_pixels
        self.seed, self.epoch = seed, 0

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        root, r = self.rows[i]
        image = open_image(root / r["img_path"], self.max_pixels)
        if self.seed is None:
            image = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed(self.seed, self.epoch, i))
                image = self.transform(image)
        return image, self.prompt_ids[i], r["m1"], r["m2"], r["label"], i


def stack(tensors):
    """torch.stack; inside a loader worker straight into shared memory, as PyTorch's default
    collate does, so that sending the batch to the main process copies nothing."""
    out = None
    if torch.utils.data.get_worker_info() is not None:
        first = tensors[0]
        storage = first._typed_storage()._new_shared(
            len(tensors) * first.numel(), device=first.device
        )
        out = first.new(storage).resize_(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


def collate(batch):
    images, prompt_ids, m1, m2, labels, idx = zip(*batch)

    def as_long(xs):
        return torch.tensor(xs, dtype=torch.long)

    return dict(
        image=stack(images),
        prompt_id=as_long(prompt_ids),
        m1=as_long(m1),
        m2=as_long(m2),
        label=as_long(labels),
        index=as_long(idx),
    )


def ignore_stop_signals(worker_id=None):
    """worker_init_fn of every loader: a SIGTERM or SIGINT sent to the whole process group (SLURM,
    scancel, timeout, Ctrl-C) is the trainer's to answer (it saves last.pth and exits). A worker
    that died of it first would crash the trainer before that save. Workers still end with their
    parent: torch stops them at shutdown and they watch it die."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _kill_workers_at_exit():
    """At exit, end the loader workers still alive with SIGKILL. They ignore SIGTERM (above), and
    SIGTERM is what multiprocessing's own exit clean-up sends before it waits for them: a trainer
    leaving on an error, its loader iterator still referenced by the traceback, would wait forever.
    Registered after multiprocessing's clean-up, so it runs before it."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if not workers:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler: "worker killed" errors
    for child in workers:
        child.kill()
        child.join(timeout=5)


atexit.register(_kill_workers_at_exit)


def make_loader(dataset, batch_size, num_workers, shuffle, seed=0, drop_last=False, sampler=None):
    generator = torch.Generator().manual_seed(seed)
    num_workers = min(num_workers, os.cpu_count() or 1)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals,
    )


def normalization(transform):
    """The mean and std of the Normalize step of an (open_clip) transform."""
    norm = next(
        t for t in getattr(transform, "transforms", [transform]) if type(t).__name__ == "Normalize"
    )
    return norm.mean, norm.std


def model_input(images, transform):
    """Model-ready images on their device: a cached uint8 batch [B, 3, H, W] is scaled and
    normalised here exactly as `transform`'s ToTensor + Normalize would; float batches pass."""
    if images.dtype != torch.uint8:
        return images
    mean, std = (
        torch.tensor(v, dtype=torch.float32, device=images.device)[:, None, None]
        for v in normalization(transform)
    )
    return images.float().div_(255).sub_(mean).div_(std)
