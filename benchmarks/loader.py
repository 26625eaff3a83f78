"""Images/s of the training data loader on the demo dataset, for several worker counts.

python -m benchmarks.loader [--batch-size 256] [--workers 0 1 2] [--image-size 224] [--epochs 2]

Decoding + open_clip's train transform (RandomResizedCrop, resize to the model's input size,
normalise) run in the worker processes; the first batch (worker start-up) is not timed.
"""
import argparse
import os
import time

import open_clip
import torch
from omegaconf import OmegaConf

from data.demo import DEFAULT_ROOT, generate
from data.index import make_splits
from data.loader import PromptTable, SketchPhotoDataset, make_loader


def measure(dataset, batch_size, workers, epochs):
    loader = make_loader(dataset, batch_size, workers, shuffle=True)
    images, start = 0, None
    for _ in range(epochs):
        for batch in loader:
            if start is None:  # the first batch includes worker start-up
                start = time.perf_counter()
                continue
            images += batch["image"].shape[0]
    return images / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--image-size", type=int, default=224, help="224 = ViT-B-32's input")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    root = generate(DEFAULT_ROOT)
    dcfg = OmegaConf.create(dict(train_idx=["demo"], test_idx=None, root=str(root), cls_ratio=1.0, csv={}))
    splits = make_splits(dcfg, need_test=False)
    transform = open_clip.image_transform(args.image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    dataset = SketchPhotoDataset(splits.train, transform, PromptTable(splits.train, tokenizer))
    torch.set_num_threads(1)
    print(f"{len(dataset)} demo images (64 px), batch {args.batch_size}, output {args.image_size} px, "
          f"{os.cpu_count()} CPU cores")
    base = None
    for w in args.workers:
        rate = measure(dataset, args.batch_size, w, args.epochs)
        base = base or rate
        print(f"workers={w}: {rate:8.1f} images/s  ({rate / base:.2f}x workers={args.workers[0]})")


if __name__ == "__main__":
    main()
