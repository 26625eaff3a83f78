"""Can the tiny model learn the demo's instance matching from the fine-grained triplet alone?

python -m benchmarks.fine_grained_probe [--root .cache/demo] [--lr 5e-4] [--epochs 30]
    [--hard] [--per-class 16] [--fresh sketches|all] [--paired-affine A] [--init RUN_DIR]
    [--shuffle W] [--eval-pairs N]

No categorical losses, no train.py: each step takes 2 training classes, --per-class of their
paired photos with the sketch drawn from each, and minimises model/instance_loss.py's triplet
(batch-all negatives, or batch-hard with --hard; margin 0.3) with AdamW. Every 2 epochs it
prints the class-gallery Acc@1 (eval mode; ties count against the query, as in evaluate.py) on 8
training classes and on the unseen ones, and in brackets the mean 1 - cos between a class's
photos (0: a collapsed embedding). Chance is 1 / n_paired, or 1 / N with --eval-pairs N (a
class's first N pairs scored: the same gallery size on demos of more pairs, data.demo --n-photo).
--shuffle W adds the patch-shuffle triplet (train.fg_shuffle_ratio) with weight W.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from benchmarks.fine_grained_seen import instance_check, pair_paths
from data.demo import DEFAULT_ROOT, draw_photo, draw_sketch
from model.backbone import build_model
from model.checkpoint import load_checkpoint
from runtime.errors import run_cli
from model.instance_loss import instance_triplet, patch_shuffle_triplet, triplets


def load(root, cls, n, tf):
    """(photos, sketches) of a class's n paired photos as image tensors, row i the same instance."""
    return tuple(
        torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
        for paths in pair_paths(root, cls, n)
    )


def accuracy(model, data, classes):
    """(class-gallery Acc@1, mean photo 1 - cos) over `classes`, in eval mode."""
    model.eval()
    hits, spread = [], []
    with torch.no_grad():
        for cls in classes:
            h, s = instance_check(*(model.encode_image(x) for x in data[cls]))
            hits += h
            spread.append(s)
    model.train()
    return np.mean(hits), np.mean(spread)


def step_batch(data, classes, per, g):
    """images, instance ids, labels and modes (0 photo, 1 sketch) of one batch."""
    images, instance, labels, modes = [], [], [], []
    for c, cls in enumerate(classes):
        photos, sketches = data[cls]
        pick = torch.randperm(len(photos), generator=g)[:per]
        for mode, rows in ((0, photos), (1, sketches)):
            images.append(rows[pick])
            instance.append(pick + 1000 * c)
            labels.append(torch.full((len(pick),), c))
            modes.append(torch.full((len(pick),), mode))
    return tuple(torch.cat(t) for t in (images, instance, labels, modes))


def redraw(data, classes, meta, tf, what, epoch, poses):
    """Replace the training pairs in `data` by new drawings (see --fresh); `poses` caches each
    class's paired photo poses, replayed from the demo's own seed."""
    n, placing = meta["n_paired"], meta.get("poses", "v2")
    for cls in classes:
        k = meta["classes"].index(cls)
        if cls not in poses:  # data/demo.py's draw_all: the first n photos of the class's stream
            rng = np.random.default_rng([meta["seed"], k])
            poses[cls] = [draw_photo(cls, rng, True, placing)[1] for _ in range(n)]
        rng = np.random.default_rng([meta["seed"], k, 1 + epoch])
        photos, pose = data[cls][0], poses[cls]
        if what == "all":
            drawn = [draw_photo(cls, rng, True, placing) for _ in range(n)]
            photos, pose = torch.stack([tf(img) for img, _ in drawn]), [q for _, q in drawn]
        data[cls] = (photos, torch.stack([tf(draw_sketch(cls, rng, pose=q)) for q in pose]))


def paired_affine(images, instance, amount, g):
    """One random affine per instance id, applied alike to its photo and its sketch."""
    _, inv = torch.unique(instance, return_inverse=True)
    k = int(inv.max()) + 1

    def uniform():
        return torch.rand(k, generator=g) * 2 - 1

    angle, zoom = uniform() * 0.5 * amount, torch.exp(uniform() * 0.3 * amount)
    flip = torch.where(torch.rand(k, generator=g) < 0.5, -1.0, 1.0)
    tx, ty = uniform() * 0.4 * amount, uniform() * 0.4 * amount
    c, s = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([c * flip, -s, tx], 1), torch.stack([s * flip, c, ty], 1)], 1)
    grid = F.affine_grid(theta[inv], list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def report(model, data, seen, unseen, head):
    (a_seen, s_seen), (a_unseen, s_unseen) = (
        accuracy(model, data, seen[:8]),
        accuracy(model, data, unseen),
    )
    print(
        f"{head}, training classes Acc@1 {a_seen:.3f} ({s_seen:.4f}), unseen {a_unseen:.3f} "
        f"({s_unseen:.4f})",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(DEFAULT_ROOT))
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--hard", action="store_true", help="batch-hard negatives (else batch-all)")
    ap.add_argument("--fresh", choices=("sketches", "all"), help="redraw every epoch (above)")
    ap.add_argument("--paired-affine", type=float, default=0.0, metavar="A")
    ap.add_argument("--shuffle", type=float, default=0.0, metavar="W", help="patch-shuffle weight")
    ap.add_argument(
        "--eval-pairs", type=int, metavar="N", help="score on a class's first N pairs only"
    )
    ap.add_argument("--init", help="a run folder: start from its model/best.pth")
    ap.add_argument("--per-class", type=int, default=16, help="paired photos a class a batch")
    args = ap.parse_args()
    if args.eval_pairs is not None and args.eval_pairs < 1:
        ap.error(f"--eval-pairs {args.eval_pairs}: give 1 or more pairs a class to score")
    torch.manual_seed(0)
    root = Path(args.root)
    meta = json.loads((root / "demo.json").read_text())
    n, unseen = meta["n_paired"], meta["unseen"]
    seen = [c for c in meta["classes"] if c not in unseen]
    mcfg = dict(backbone="ma-tiny", pretrained=None, max_length=None, n_mode=4, temperature=0.07)
    ckpt = None
    if args.init:
        ckpt = load_checkpoint(Path(args.init) / "model" / "best.pth")
        mcfg = dict(ckpt["config"]["model"], pretrained=None)
    model, _, tf, _ = build_model(OmegaConf.create(mcfg))
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    data = {cls: load(root, cls, n, tf) for cls in seen + unseen}
    score = {cls: tuple(x[: args.eval_pairs or n] for x in data[cls]) for cls in data}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    g, poses, train_data = torch.Generator().manual_seed(0), {}, dict(data)
    chance = 1 / min(n, args.eval_pairs or n)
    print(f"{root}: chance Acc@1 {chance:.3f}, lr {args.lr}, {'hard' if args.hard else 'all'}")
    if args.init:
        report(model, score, seen, unseen, f"{args.init}'s best.pth before training")
    for epoch in range(args.epochs):
        if args.fresh:
            redraw(train_data, seen, meta, tf, args.fresh, epoch, poses)
        order, losses = torch.randperm(len(seen), generator=g).tolist(), []
        for k in range(0, len(order), 2):
            images, instance, labels, modes = step_batch(
                train_data, [seen[j] for j in order[k : k + 2]], args.per_class, g
            )
            anchors, positives, negatives = triplets(instance, labels, modes)
            if args.paired_affine > 0:
                images = paired_affine(images, instance, args.paired_affine, g)
            z = model.encode_image(images)
            loss = instance_triplet(z, anchors, positives, negatives, 0.3, hard=args.hard)
            if args.shuffle > 0:
                loss = loss + args.shuffle * patch_shuffle_triplet(
                    model.encode_image, images, anchors, positives, 0.3
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if epoch % 2 == 1 or epoch == args.epochs - 1:
            report(model, score, seen, unseen, f"epoch {epoch + 1}: loss {np.mean(losses):.4f}")


if __name__ == "__main__":
    run_cli(main)
