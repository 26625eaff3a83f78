"""The overfit check of fine-grained training on the demo: class-gallery Acc@1 of a run's
best.pth on some TRAINING classes (which it saw) and on the unseen ones, and how far apart its
photos of one class lie (mean 1 - cos; 0 means they all embed alike: a collapsed embedding).

python -m benchmarks.fine_grained_seen RUN_DIR [--root .cache/demo] [--classes 8]

Per class, the sketches <cls>_<i>-1.png (i < the demo's paired count) are ranked against the
photos they were drawn from (metrics/fine_grained.py's own_photo_ranks); chance is 1 / n_paired.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from data.demo import DEFAULT_ROOT
from metrics.fine_grained import own_photo_ranks
from model.backbone import build_model
from model.checkpoint import load_checkpoint
from runtime.errors import run_cli


def pair_paths(root, cls, n):
    """(photos, sketches) of a class's first n paired photos, entry i of each the same instance."""
    photos = [root / "photo" / cls / f"{cls}_{i:03d}.jpg" for i in range(n)]
    sketches = [root / "sketch" / cls / f"{cls}_{i:03d}-1.png" for i in range(n)]
    return photos, sketches


def instance_check(photos, sketches):
    """(per sketch: is its own photo first, mean 1 - cos between the photos) of L2-normalised
    embeddings [n, d], row i of each the same instance."""
    n = len(photos)
    ranks = own_photo_ranks(sketches, photos, np.arange(n))
    spread = (1 - photos @ photos.T).sum().item() / (n * (n - 1))
    return (ranks == 1).tolist(), spread


def class_check(model, tf, root, cls, n):
    def embed(paths):
        with torch.no_grad():
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
            return model.encode_image(x)

    return instance_check(*(embed(paths) for paths in pair_paths(root, cls, n)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--root", default=str(DEFAULT_ROOT))
    ap.add_argument("--classes", type=int, default=8, help="training classes checked")
    args = ap.parse_args()
    root = Path(args.root)
    meta = json.loads((root / "demo.json").read_text())
    n, unseen = meta["n_paired"], meta["unseen"]
    seen = [c for c in meta["classes"] if c not in unseen][: args.classes]
    ckpt = load_checkpoint(Path(args.run) / "model" / "best.pth")
    model, _, tf, _ = build_model(OmegaConf.create(dict(ckpt["config"]["model"], pretrained=None)))
    model.load_state_dict(ckpt["model"])
    model.eval()
    print(f"{args.run}: best.pth of epoch {ckpt.get('epoch')}; chance Acc@1 {1 / n:.3f}")
    for name, classes in (("training", seen), ("unseen", unseen)):
        hits, spreads = [], []
        for cls in classes:
            h, s = class_check(model, tf, root, cls, n)
            hits += h
            spreads.append(s)
        print(
            f"{name} classes ({len(classes)}): Acc@1 {np.mean(hits):.3f}, mean photo "
            f"1 - cos within a class {np.mean(spreads):.4f}"
        )


if __name__ == "__main__":
    run_cli(main)
