"""The training sampler: each rank's share of a seeded per-epoch order, resumable mid-epoch."""

import itertools

import torch
from torch.utils.data import DistributedSampler


class ResumableSampler(torch.utils.data.Sampler):
    """A DistributedSampler (one rank when not distributed) that can start part-way through an
    epoch, for exact resume. shuffle=False keeps the dataset order (the authors' loader)."""

    def __init__(self, dataset, seed, rank=0, world=1, shuffle=True):
        self.base = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=world > 1
        )
        self.start = 0

    def set_epoch(self, epoch, start=0):
        self.base.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(iter(self.base), self.start, None)

    def __len__(self):
        return len(self.base) - self.start


class ClassBatchSampler(torch.utils.data.Sampler):
    """The order of fine-grained training (train.fg_ratio > 0): batches that hold a few classes
    each (train.fg_classes_per_batch), several photos of each with the sketches drawn from them,
    so that every sketch meets its own photo and other photos of its class (the triplet's
    negatives). Rows of no pair (a free sketch, a photo no sketch was drawn from) give the
    triplet nothing; they are spread evenly over the batches, so that every batch holds the same
    share of them as the training set: BatchNorm then normalises each batch with statistics like
    the running ones it keeps for evaluation (batches of lone rows alone made the two differ).
    Per epoch and seed: each class's pairs (a photo and its sketches) shuffled and cut into
    blocks of whole pairs of up to a batch's pair share / classes_per_batch images; the blocks
    shuffled and cut into the batches' pair shares; the lone rows shuffled and cut into their
    shares; the batches shuffled. Ranks take whole batches in turn; resumable mid-epoch like
    ResumableSampler."""

    def __init__(self, classes, instance, batch_size, classes_per_batch, seed, rank=0, world=1):
        self.batch_size, self.seed, self.rank, self.world = int(batch_size), int(seed), rank, world
        self.paired, self.lone = {}, []  # class -> list of row-index groups; lone row indices
        by_instance = {}
        for i, (cls, inst) in enumerate(zip(classes, instance)):
            if inst < 0:
                self.lone.append(i)
            else:
                by_instance.setdefault((cls, inst), []).append(i)
        for (cls, _), rows in by_instance.items():
            if len(rows) > 1:
                self.paired.setdefault(cls, []).append(rows)
            else:
                self.lone += rows
        self.lone.sort()
        n_paired = sum(len(r) for groups in self.paired.values() for r in groups)
        share = n_paired / max(1, n_paired + len(self.lone))
        least = 1 if n_paired else 0
        self.pair_share = min(self.batch_size, max(least, round(self.batch_size * share)))
        self.block = max(1, -(-self.pair_share // int(classes_per_batch)))
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def _pair_order(self, g):
        """The paired rows in blocks of one class each, the blocks in a random order."""
        blocks = []
        for cls in sorted(self.paired):
            groups = self.paired[cls]
            block = []
            for k in torch.randperm(len(groups), generator=g).tolist():
                if block and len(block) + len(groups[k]) > self.block:
                    blocks.append(block)
                    block = []
                block += groups[k]  # a photo and its sketches stay in one block
            blocks.append(block)
        return [i for k in torch.randperm(len(blocks), generator=g).tolist() for i in blocks[k]]

    def epoch_order(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        pairs = self._pair_order(g)
        lone = [self.lone[k] for k in torch.randperm(len(self.lone), generator=g).tolist()]
        bp, bl = self.pair_share, self.batch_size - self.pair_share
        n_full = min(len(pairs) // bp if bp else 1 << 62, len(lone) // bl if bl else 1 << 62)
        batches = [
            pairs[k * bp : (k + 1) * bp] + lone[k * bl : (k + 1) * bl] for k in range(n_full)
        ]
        batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        rest = pairs[n_full * bp :] + lone[n_full * bl :]  # the partial batches last
        batches += [rest[s : s + self.batch_size] for s in range(0, len(rest), self.batch_size)]
        if self.world > 1:  # every rank the same number of whole batches (drop_last)
            batches = [b for b in batches if len(b) == self.batch_size]
            batches = batches[: len(batches) // self.world * self.world]
        return [i for b in batches[self.rank :: self.world] for i in b]

    def __iter__(self):
        return itertools.islice(iter(self.epoch_order()), self.start, None)

    def __len__(self):
        return len(self.epoch_order()) - self.start
