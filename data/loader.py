"""Image dataset and loaders: decoding and transforms run in worker processes, prompts are
tokenised once per distinct prompt, and each sample carries the id of its prompt."""
import os

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from utils.runtime import UserError


def unreadable(path):
    """Why an image file cannot be used (missing, truncated, not an image), or None."""
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for corrupt files
        return f"{type(e).__name__}: {e}"
    return None


class PromptTable:
    """Distinct prompts of a set of rows, tokenised once."""

    def __init__(self, rows, tokenizer):
        self.texts = sorted({r["text"] for _, r in rows})
        self.id_of = {t: i for i, t in enumerate(self.texts)}
        self.tokens = tokenizer(self.texts) if self.texts else None


class SketchPhotoDataset(Dataset):
    def __init__(self, rows, transform, prompts):
        self.rows = rows
        self.transform = transform
        self.prompt_ids = [prompts.id_of[r["text"]] for _, r in rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        root, r = self.rows[i]
        path = root / r["img_path"]
        try:
            with Image.open(path) as im:
                image = self.transform(im.convert("RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(f"cannot read image {path}: {e}. Replace or delete the file "
                            f"(python -m data.check lists every bad file).") from None
        return image, self.prompt_ids[i], r["m1"], r["m2"], r["label"], i


def stack(tensors):
    """torch.stack; inside a loader worker straight into shared memory, as PyTorch's default
    collate does, so that sending the batch to the main process copies nothing."""
    out = None
    if torch.utils.data.get_worker_info() is not None:
        first = tensors[0]
        storage = first._typed_storage()._new_shared(len(tensors) * first.numel(), device=first.device)
        out = first.new(storage).resize_(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


def collate(batch):
    images, prompt_ids, m1, m2, labels, idx = zip(*batch)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)
    return dict(image=stack(images), prompt_id=as_long(prompt_ids), m1=as_long(m1),
                m2=as_long(m2), label=as_long(labels), index=as_long(idx))


def make_loader(dataset, batch_size, num_workers, shuffle, seed=0, drop_last=False, sampler=None):
    generator = torch.Generator().manual_seed(seed)
    num_workers = min(num_workers, os.cpu_count() or 1)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      drop_last=drop_last, generator=generator, pin_memory=torch.cuda.is_available(),
                      persistent_workers=num_workers > 0)


def normalization(transform):
    """The mean and std of the Normalize step of an (open_clip) transform."""
    norm = next(t for t in getattr(transform, "transforms", [transform]) if type(t).__name__ == "Normalize")
    return norm.mean, norm.std


def model_input(images, transform):
    """Model-ready images on their device: a cached uint8 batch [B, 3, H, W] is scaled and
    normalised here exactly as `transform`'s ToTensor + Normalize would; float batches pass."""
    if images.dtype != torch.uint8:
        return images
    mean, std = (torch.tensor(v, dtype=torch.float32, device=images.device)[:, None, None]
                 for v in normalization(transform))
    return images.float().div_(255).sub_(mean).div_(std)
