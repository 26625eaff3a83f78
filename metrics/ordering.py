"""The total order the metrics rank photos in, as int64 keys: shared by the torch ranking
(metrics.engine) and the compiled CPU kernel (metrics.rank_kernel)."""

import torch


def order_keys(values, index, n):
    """int64 keys, unique within a row, in ranking order: similarity, then gallery index reversed
    (ties go to the lower index). Upper 32 bits: the float's bits mapped to an order-preserving
    int; lower 32 bits: n - 1 - index."""
    bits = (values.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return bits.to(torch.int64) * (1 << 32) + (n - 1 - index)
