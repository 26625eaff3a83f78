"""The fine-grained (instance) losses of train.fg_ratio > 0 (docs/training.md): a sketch must lie
nearer the photo it was drawn from than any other photo of its class.

- instance_triplet: batch-hard triplet on d = 1 - cos; anchor a sketch, positive its own photo,
  negative the nearest other photo of its class in the batch (CLIP-AT's loss with DP-CLIP's
  hard negatives); anchors without their photo or without a negative in the batch are left out.
- patch_shuffle_triplet: CLIP-AT's patch shuffling: the anchor sketch and its photo cut into a
  2x2 grid shuffled by one permutation should match each other better than that photo shuffled
  by another permutation.
"""

import itertools

import torch
import torch.nn.functional as F

from data.layouts import PHOTO, SKETCH

PERMUTATIONS = list(itertools.permutations(range(4)))  # of the 2x2 grid's cells, row-major


def triplets(instance, labels, image_mode):
    """(anchors, positives, negative mask [A, B]) of a batch: sketch rows whose own photo (the
    photo row of the same instance id) is in the batch and that have a same-class photo of another
    instance. instance: per row the id of the photo it shows or was drawn from, -1 for none."""
    photo = image_mode == PHOTO
    same = instance[:, None] == instance[None, :]
    pos = same & photo[None, :] & (instance[:, None] >= 0)
    neg = (labels[:, None] == labels[None, :]) & photo[None, :] & ~same
    ok = (image_mode == SKETCH) & pos.any(1) & neg.any(1)
    anchors = ok.nonzero()[:, 0]
    positives = pos[anchors].float().argmax(1)
    return anchors, positives, neg[anchors]


def instance_triplet(z, anchors, positives, negatives, margin, hard=True):
    """mean relu(d(a, p) - min_n d(a, n) + margin), d = 1 - cos, over the anchors (0 if none).
    hard=False (batch-all, the warm-up of train.fg_hard_from_epoch): per anchor the mean of
    relu(d(a, p) - d(a, n) + margin) over all its negatives instead of the nearest one."""
    if anchors.numel() == 0:
        return z.sum() * 0  # keeps every parameter in the graph (DDP)
    d = 1 - z[anchors] @ z.T  # z is L2-normalised
    d_ap = d.gather(1, positives[:, None])[:, 0]
    if not hard:
        each = F.relu(d_ap[:, None] - d + margin) * negatives
        return (each.sum(1) / negatives.sum(1)).mean()
    d_an = d.masked_fill(~negatives, float("inf")).amin(1)
    return F.relu(d_ap - d_an + margin).mean()


def shuffle_patches(images, perm):
    """Each image [B, C, H, W] cut into a 2x2 grid whose cells are reordered by perm (4 indices,
    row-major); H and W are cropped to even sizes."""
    h, w = images.shape[-2] // 2, images.shape[-1] // 2
    cells = [images[..., i * h : (i + 1) * h, j * w : (j + 1) * w] for i in (0, 1) for j in (0, 1)]
    cells = [cells[k] for k in perm]
    return torch.cat([torch.cat(cells[0:2], -1), torch.cat(cells[2:4], -1)], -2)


def patch_shuffle_triplet(encode, images, anchors, positives, margin):
    """The triplet of shuffled crops: anchor sketch and positive photo shuffled alike, negative
    the positive photo shuffled otherwise. encode: images -> L2-normalised embeddings."""
    if anchors.numel() == 0:
        return images.sum() * 0
    first, second = (PERMUTATIONS[k] for k in torch.randperm(len(PERMUTATIONS))[:2].tolist())
    a = encode(shuffle_patches(images[anchors], first))
    p = encode(shuffle_patches(images[positives], first))
    n = encode(shuffle_patches(images[positives], second))
    d_ap = 1 - (a * p).sum(1)
    d_an = 1 - (a * n).sum(1)
    return F.relu(d_ap - d_an + margin).mean()
