"""The CPU ranking kernel: metrics.engine.hit_ranks' method written as loops, compiled with numba.

The torch version runs a dozen whole-matrix operations per group of rows, each a pass over rows x
gallery in memory; here a row takes two passes: each photo's bucket, then per photo a table lookup
and a count (a binary search for the few sharing a bucket with a relevant photo). The result is
the same, rank for rank (tests/test_metrics.py checks both against a plain sort). Without numba,
or with MA_SBIR_NO_NUMBA=1 in the environment, metrics.engine uses the torch version.
"""

import functools
import os

import numpy as np
import torch

from metrics.ordering import order_keys
from runtime.logs import log

BUCKETS_PER_PHOTO = 2  # more buckets: fewer photos share one with a relevant photo
MAX_GALLERY = 2**31 // BUCKETS_PER_PHOTO - 1  # bucket numbers, up to nb = 2G, are int32


@functools.cache
def kernel():
    """The compiled _rank_rows (compiled once, then loaded from numba's cache), or None."""
    if os.environ.get("MA_SBIR_NO_NUMBA", "0") not in ("", "0"):
        return None
    try:
        from numba import njit
    except ImportError:
        log.warning(
            "numba is not installed: the metric engine ranks with torch operations, about "
            "1.5x slower on a CPU (pip install -r requirements.txt installs numba)."
        )
        return None
    try:
        return njit(nogil=True, cache=True, error_model="numpy")(_rank_rows)
    except RuntimeError as e:  # no writable place for numba's cache (read-only checkout and home)
        log.warning(
            f"numba cannot cache the ranking kernel ({e}); it is compiled in each process "
            f"instead (about a second). NUMBA_CACHE_DIR=/a/writable/folder keeps it."
        )
        return njit(nogil=True, error_model="numpy")(_rank_rows)


def _rank_rows(sims, asc_idx, out):
    """out[r]: the 1-based ranks of the relevant photos in row r of sims, ascending, given
    asc_idx[r]: the relevant photos' gallery indices in ascending ranking order (least similar
    first, ties by gallery index descending).

    Per row: map similarities to nb buckets spanning the relevant ones (buckets 1 .. nb - 2, unless
    the scale is capped: all of them nearly equal) by a multiply, an add, a clamp and a truncation:
    monotone, so a photo in a higher bucket than a relevant photo ranks above it. A table gives
    each bucket the number of relevant photos below it, or, for a bucket holding relevant photos,
    marks it, so that the photos sharing it are placed exactly by binary search among those.
    counts[t] = photos with t relevant photos below them; the rank of the t-th relevant photo
    (ascending) is 1 + the photos with more than t below."""
    n, g = sims.shape
    p = asc_idx.shape[1]
    nb = max(BUCKETS_PER_PHOTO * g, 4)
    table = np.empty(nb + 1, dtype=np.int32)  # slot nb: the relevant photos, counted apart
    table[nb] = p + 1
    buckets = np.empty(g, dtype=np.int32)
    counts = np.empty(p + 2, dtype=np.int64)
    asc_val = np.empty(p, dtype=np.float64)
    rel_bucket = np.empty(p, dtype=np.int64)
    bucket_end = np.empty(p, dtype=np.int64)  # one past the last relevant photo in t's bucket
    for r in range(n):
        row, idx = sims[r], asc_idx[r]
        for t in range(p):
            asc_val[t] = row[idx[t]]
        lo, hi = asc_val[0], asc_val[p - 1]
        cap = 2.0**100 / max(abs(lo), abs(hi), 1.0)  # relevant photos (nearly) equally similar
        scale = min((nb - 3) / (hi - lo), cap) if hi > lo else cap
        offset = 1.5 - lo * scale
        top = nb - 1.0
        for t in range(p):
            rel_bucket[t] = int(min(max(asc_val[t] * scale + offset, 0.0), top))
        for t in range(p - 1, -1, -1):
            bucket_end[t] = (
                t + 1 if t == p - 1 or rel_bucket[t + 1] != rel_bucket[t] else bucket_end[t + 1]
            )
        t, b = 0, 0
        while t < p:  # table[b]: the relevant photos below bucket b, or -1 - the first one in it
            table[b : rel_bucket[t]] = t
            b = rel_bucket[t]
            table[b] = -1 - t
            t, b = bucket_end[t], b + 1
        table[b:nb] = p
        for i in range(g):  # a loop of its own, so that it compiles to vector instructions
            buckets[i] = int(min(max(row[i] * scale + offset, 0.0), top))
        for t in range(p):
            buckets[idx[t]] = nb  # relevant photos: counted apart, in the sum below
        counts[:] = 0
        for i in range(g):
            t = table[buckets[i]]
            if t < 0:  # shares its bucket with relevant photos: binary search among them
                s, t = row[i], -1 - t
                end = bucket_end[t]
                while t < end:
                    mid = (t + end) // 2
                    if s > asc_val[mid] or (s == asc_val[mid] and i < idx[mid]):  # i ranks above
                        t = mid + 1
                    else:
                        end = mid
            counts[t] += 1
        above = 0
        for t in range(p - 1, -1, -1):
            above += counts[t + 1] + 1  # the photos with more than t below, relevant ones included
            out[r, p - 1 - t] = above


def hit_ranks(sims, relevant):
    """metrics.engine.hit_ranks for a CPU float32 tensor, through the compiled kernel. The
    relevant photos are put in ranking order first, by numpy's vectorised sort of int64 keys."""
    g = sims.shape[1]
    if g > MAX_GALLERY:
        raise ValueError(
            f"a gallery of {g:,} photos: the CPU ranking kernel takes at most {MAX_GALLERY:,} "
            f"(int32 bucket numbers); evaluate on a subset of the photos."
        )
    keys = order_keys(sims.index_select(1, relevant), relevant, g).numpy()
    keys.sort(axis=1)
    asc_idx = (g - 1) - (keys & 0xFFFFFFFF)  # order_keys' lower 32 bits: g - 1 - index
    out = np.empty(asc_idx.shape, dtype=np.int64)
    kernel()(np.ascontiguousarray(sims.numpy()), asc_idx, out)
    return torch.from_numpy(out)
