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
    triplet nothing, so they go into batches of their own: a batch of pairs holds only pairs.
    Per epoch and seed: each class's groups (a photo and its sketches; a row of no pair alone)
    shuffled and cut into blocks of batch_size / classes_per_batch images; the blocks of pairs
    and the blocks of lone rows each shuffled and cut into batches; the batches shuffled. Ranks
    take whole batches in turn; resumable mid-epoch like ResumableSampler."""

    def __init__(self, classes, instance, batch_size, classes_per_batch, seed, rank=0, world=1):
        self.batch_size, self.seed, self.rank, self.world = int(batch_size), int(seed), rank, world
        self.block = max(1, -(-self.batch_size // int(classes_per_batch)))
        self.paired, self.lone = {}, {}  # class -> list of row-index groups
        by_instance = {}
        for i, (cls, inst) in enumerate(zip(classes, instance)):
            if inst < 0:
                self.lone.setdefault(cls, []).append([i])
            else:
                by_instance.setdefault((cls, inst), []).append(i)
        for (cls, _), rows in by_instance.items():
            (self.paired if len(rows) > 1 else self.lone).setdefault(cls, []).append(rows)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def _batches(self, groups_of, g):
        """Full batches of one kind of blocks, and the rows left over (less than a batch)."""
        blocks = []
        for cls in sorted(groups_of):
            groups = groups_of[cls]
            flat = [i for k in torch.randperm(len(groups), generator=g).tolist() for i in groups[k]]
            blocks += [flat[s : s + self.block] for s in range(0, len(flat), self.block)]
        order = [i for k in torch.randperm(len(blocks), generator=g).tolist() for i in blocks[k]]
        full = len(order) // self.batch_size * self.batch_size
        batches = [order[s : s + self.batch_size] for s in range(0, full, self.batch_size)]
        return batches, order[full:]

    def epoch_order(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        paired, rest_p = self._batches(self.paired, g)
        lone, rest_l = self._batches(self.lone, g)
        batches = paired + lone
        batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        rest = rest_p + rest_l  # the two partial batches last: all others stay whole
        batches += [rest[s : s + self.batch_size] for s in range(0, len(rest), self.batch_size)]
        if self.world > 1:  # every rank the same number of whole batches (drop_last)
            batches = [b for b in batches if len(b) == self.batch_size]
            batches = batches[: len(batches) // self.world * self.world]
        return [i for b in batches[self.rank :: self.world] for i in b]

    def __iter__(self):
        return itertools.islice(iter(self.epoch_order()), self.start, None)

    def __len__(self):
        return len(self.epoch_order()) - self.start
