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
