"""Exact retrieval metrics in one pass over chunks of queries (DESIGN section 7).

Photos are ranked by cosine similarity, descending, ties broken by gallery index (stable sort).
Memory is bounded by chunk x gallery; the full query x gallery matrix is never built. Queries
are taken in label order, so that each block of them holds runs of queries sharing their relevant
photos. On a CPU with T threads, T blocks of chunk / T queries are ranked side by side.

Protocols:
- "default" (the paper's code, shared with ZSE-SBIR): AP is VOC-interpolated (precision made
  non-increasing from the right, summed over recall steps); AP@200 uses the recall denominator
  min(200, N+); P@k is the mean relevance of the top min(k, N+).
- "hits_over_k": P@k = hits in the top k / k.
- "noninterp": plain (non-interpolated) average precision, AP@all and AP@200 (denominator
  min(200, N+)).
Queries without any relevant photo get NaN and are left out of the means.
"""

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

from metrics import rank_kernel
from metrics.inputs import embeddings, finite, label_codes
from metrics.ordering import order_keys

PROTOCOLS = ("default", "hits_over_k", "noninterp")


def _reverse_cummax(x):
    return torch.flip(torch.cummax(torch.flip(x, dims=[1]), dim=1).values, dims=[1])


def _bucket_map(rel_sims, nb):
    """Per row, scale and offset putting the row's relevant similarities into buckets 1 .. nb - 2 of
    trunc(sims * scale + offset): a multiply and an add, each rounded once, so the map is monotone
    and photos in different buckets compare as their buckets do. The scale is capped so that
    nothing overflows into NaN (all relevant photos equally similar: one narrow bucket)."""
    lo = rel_sims.amin(1, keepdim=True).double()
    hi = rel_sims.amax(1, keepdim=True).double()
    cap = 2.0**100 / torch.maximum(lo.abs(), hi.abs()).clamp_(min=1.0)
    scale = torch.minimum((nb - 3) / (hi - lo), cap)
    return scale.float(), (1.5 - lo * scale).float()


INDEX_LIMIT = 2**31 - 1  # flat int32 indices over rows x buckets (and rows x relevant photos)


def hit_ranks(sims, relevant):
    """1-based ranks of the relevant gallery items in each row of `sims` [n, G] (rows that share
    the relevant set), ascending: [n, P].

    Never sorts the gallery. A monotone map cuts each row into max(G, 4) buckets spanning its
    relevant
    photos; a table over the buckets gives every photo the number of relevant photos below it,
    except photos sharing a bucket with a relevant photo (a few per relevant photo), which are
    placed exactly by binary search among the row's sorted relevant keys. A histogram of those
    counts gives, for each relevant photo, the photos ranked above it."""
    n, g = sims.shape
    rows = max(1, INDEX_LIMIT // (2 * max(g, 4) + 2))  # its flat int32 indices stay below the limit
    if n > rows:
        return torch.cat([hit_ranks(sims[s : s + rows], relevant) for s in range(0, n, rows)])
    p = relevant.numel()
    dev = sims.device
    rel_sims = sims.index_select(1, relevant)
    rel_keys, perm = torch.sort(order_keys(rel_sims, relevant, g), dim=1)
    nb = max(g, 4)  # buckets per row (at least 4: relevant photos go to 1 .. nb - 2)
    scale, offset = _bucket_map(rel_sims, nb)
    bucket = torch.mul(sims, scale).add_(offset).clamp_(0, nb - 1).to(torch.int32)
    bucket = bucket.add_(
        torch.arange(0, n * (nb + 1), nb + 1, dtype=torch.int32, device=dev)[:, None]
    ).view(-1)
    rel_bucket = bucket.view(n, g).index_select(1, relevant).gather(1, perm).long()  # ascending
    t = torch.arange(p, device=dev).expand(n, p)
    first = torch.ones((n, p), dtype=torch.bool, device=dev)  # first relevant photo of its bucket
    torch.ne(rel_bucket[:, 1:], rel_bucket[:, :-1], out=first[:, 1:])
    width = int((t - torch.where(first, t, 0).cummax(1).values).max()) + 1  # most in one bucket
    stride = p + width  # a row of sorted relevant keys and `width` sentinels
    rel_flat = torch.arange(0, n * stride, stride, device=dev)[:, None] + t
    # table[bucket]: flat index of the first relevant photo in or above it; bitwise-not: it holds
    # one
    table = torch.zeros((n, nb + 1), dtype=torch.int32, device=dev)
    ones = torch.ones(1, dtype=torch.int32, device=dev).expand(n * p)
    table.view(-1).index_add_(0, rel_bucket.view(-1) + 1, ones)
    table = table.cumsum_(1).add_(rel_flat[:, :1].int()).view(-1)
    table.index_copy_(0, rel_bucket.masked_select(first), ~rel_flat.masked_select(first).int())
    below = table.index_select(0, bucket)
    below.view(n, g).scatter_(1, relevant[perm], rel_flat.int())
    r, col = (below.view(n, g) < 0).nonzero(as_tuple=True)
    pos = r * g + col
    key = order_keys(sims.reshape(-1).index_select(0, pos), col, g)
    padded = torch.full((n, stride), torch.iinfo(torch.int64).max, dtype=torch.int64, device=dev)
    padded[:, :p] = rel_keys
    padded = padded.view(-1)
    lo = ~below.index_select(0, pos).long()
    hi = lo + width  # past the bucket: keys of higher buckets or sentinels, all above the photo's
    for _ in range(width.bit_length()):
        mid = (lo + hi) >> 1
        less = padded.index_select(0, mid) < key
        lo, hi = torch.where(less, mid + 1, lo), torch.where(less, hi, mid)
    below.index_copy_(0, pos, lo.int())
    counts = torch.bincount(below, minlength=n * stride).view(n, stride)[:, : p + 1]
    above = torch.flip(torch.cumsum(torch.flip(counts, dims=[1]), dim=1), dims=[1])[:, 1:]
    return torch.flip(above, dims=[1]) + 1


BLOCK = 8  # photos per block when looking for the top k


def top_indices(sims, k):
    """The k best gallery indices of each row in ranking order, ties to the lower index. Photos
    j, j + m, j + 2m, ... (m = G // BLOCK) form block j; only the blocks whose best similarity is
    among the k best blocks' (and the photos past BLOCK * m) can hold the top k: those are ordered
    exactly. Rows where the k-th and (k+1)-th best blocks tie take the full-row path."""
    n, g = sims.shape
    m = g // BLOCK
    if k == 0 or m <= k:
        return _top_exact(sims, k)
    best, which = torch.topk(sims[:, : BLOCK * m].reshape(n, BLOCK, m).amax(1), k + 1, dim=1)
    steps = torch.arange(0, BLOCK * m, m, device=sims.device)
    cols = torch.cat(
        [
            (which[:, :k, None] + steps).view(n, k * BLOCK),
            torch.arange(BLOCK * m, g, device=sims.device).expand(n, g - BLOCK * m),
        ],
        1,
    )
    order = torch.topk(order_keys(sims.gather(1, cols), cols, g), k, dim=1).indices
    top = cols.gather(1, order)
    unsure = (best[:, k - 1] == best[:, k]).nonzero()[:, 0]
    if unsure.numel():
        top[unsure] = _top_exact(sims[unsure], k)
    return top


def _top_exact(sims, k):
    """top_indices over whole rows: a float top-k finds each row's k-th value, then everything at
    least as similar is ordered exactly."""
    n, g = sims.shape
    if k == 0:
        return torch.zeros((n, 0), dtype=torch.int64, device=sims.device)
    kth = torch.topk(sims, k, dim=1).values[:, -1:]
    r, i = (sims >= kth).nonzero(as_tuple=True)
    order = torch.sort(order_keys(sims[r, i], i, g), descending=True, stable=True).indices
    order = order[torch.sort(r[order], stable=True).indices]
    per_row = torch.bincount(r, minlength=n)
    first = torch.cumsum(per_row, 0) - per_row
    return i[order][first[:, None] + torch.arange(k, device=sims.device)]


def _group_metrics(ranks, ap_cut, ks, protocols):
    n, p = ranks.shape
    hits = torch.arange(1, p + 1, device=ranks.device, dtype=torch.float64)
    prec = hits / ranks.double()
    in_cut = ranks <= ap_cut
    den_cut = float(min(ap_cut, p))
    out = {}
    if "default" in protocols:
        out["default/AP@all"] = _reverse_cummax(prec).mean(1)
        out[f"default/AP@{ap_cut}"] = (_reverse_cummax(prec * in_cut) * in_cut).sum(1) / den_cut
        for k in ks:
            m = min(k, p)
            out[f"default/P@{k}"] = (ranks <= m).sum(1).double() / m
    if "noninterp" in protocols:
        out["noninterp/AP@all"] = prec.mean(1)
        out[f"noninterp/AP@{ap_cut}"] = (prec * in_cut).sum(1) / den_cut
    if "hits_over_k" in protocols:
        for k in ks:
            out[f"hits_over_k/P@{k}"] = (ranks <= k).sum(1).double() / k
    return out


def metric_names(ap_cut, ks, protocols):
    names = []
    if "default" in protocols:
        names += ["default/AP@all", f"default/AP@{ap_cut}"] + [f"default/P@{k}" for k in ks]
    if "noninterp" in protocols:
        names += ["noninterp/AP@all", f"noninterp/AP@{ap_cut}"]
    if "hits_over_k" in protocols:
        names += [f"hits_over_k/P@{k}" for k in ks]
    return names


def retrieval_metrics(
    queries,
    gallery,
    q_labels,
    g_labels,
    chunk_size=512,
    device="cpu",
    protocols=("default",),
    ap_cut=200,
    ks=(100, 200),
    topk=10,
    progress=True,
    desc="ranking",
):
    """Per-query metrics (numpy arrays keyed 'protocol/metric') and the top-k gallery indices."""
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; choose from {PROTOCOLS}.")
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(
            f"chunk_size={chunk_size} must be a whole number from 1 (query rows in flight)."
        )
    device = torch.device(device)
    queries, gallery = (
        embeddings(queries, "queries"),
        embeddings(gallery, "gallery photos").to(device),
    )
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"the queries have {queries.shape[1]} dimensions but the gallery photos "
            f"{gallery.shape[1]}: embed both with the same model."
        )
    q_labels, g_lab = label_codes(q_labels, g_labels, queries.shape[0], gallery.shape[0])
    g_lab = g_lab.to(device)
    if not (finite(queries) and finite(gallery)):
        raise ValueError(
            "embeddings contain NaN or infinite values; similarities cannot be ranked."
        )
    relevant = {int(lab): (g_lab == lab).nonzero()[:, 0] for lab in torch.unique(q_labels).tolist()}
    names = metric_names(ap_cut, ks, protocols)
    per_query = {k: torch.full((queries.shape[0],), math.nan, dtype=torch.float64) for k in names}
    topk = min(topk, gallery.shape[0])
    top = torch.zeros((queries.shape[0], topk), dtype=torch.int64)
    ranks_of = rank_kernel.hit_ranks if device.type == "cpu" and rank_kernel.kernel() else hit_ranks
    by_label = torch.argsort(q_labels, stable=True)  # each block holds runs of one label
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    # On a CPU each thread takes whole blocks (product, top k and ranks, no barrier between
    # them), so that `chunk_size` query rows (at least one a thread) are in flight in all; on a
    # GPU one block at a time.
    n_q = queries.shape[0]
    block = max(1, min(int(chunk_size) // workers, math.ceil(n_q / workers)))

    def rank_block(s):
        idx = by_label[s : s + block]
        sims = _similarities(queries[idx].to(device), gallery)
        if not finite(sims):
            raise ValueError(
                "similarities overflow float32 (embeddings too large, e.g. 1e20); they "
                "cannot be ranked. L2-normalise the embeddings first."
            )
        top[idx] = top_indices(sims, topk).cpu()
        labels, counts = torch.unique_consecutive(q_labels[idx], return_counts=True)
        start = 0
        for lab, count in zip(labels.tolist(), counts.tolist()):
            rel = relevant[lab]
            if rel.numel():  # else no relevant photo: NaN, as the seed
                rows = slice(start, start + count)
                for k, v in _group_metrics(
                    ranks_of(sims[rows], rel), ap_cut, ks, protocols
                ).items():
                    per_query[k][idx[rows]] = v.cpu()
            start += count
        return len(idx)

    starts = range(0, n_q, block)
    with tqdm(total=n_q, desc=desc, disable=not progress, leave=False, unit="query") as bar:
        if workers > 1:
            with _one_thread_per_op(), ThreadPoolExecutor(workers) as pool:
                for done in pool.map(rank_block, starts):
                    bar.update(done)
        else:  # one core or a GPU: a block at a time, each operation on all threads
            for s in starts:
                bar.update(rank_block(s))
    return {k: v.numpy() for k, v in per_query.items()}, top.numpy()


MIN_ROWS = 8  # MKL multiplies 1-3 rows (matrix-vector paths) to other last bits than more rows


def _similarities(rows, gallery):
    """rows @ gallery.T, at least MIN_ROWS rows at a time (zero rows added), so that a query's
    similarities, and so its ranks among near-tied photos, never depend on its block's size."""
    n = rows.shape[0]
    if n < MIN_ROWS:
        rows = torch.cat([rows, rows.new_zeros(MIN_ROWS - n, rows.shape[1])])
    return (rows @ gallery.T)[:n]


_pools = {"running": 0, "threads": 1}  # rankings in threads at once share one saved count
_pools_lock = threading.Lock()


@contextmanager
def _one_thread_per_op():
    """Ranking runs many small operations; their intra-op threads would wait on each other at every
    barrier, so the pool's threads take whole blocks side by side instead, each operation
    (the block's product included) on one thread. The last ranking to finish restores the count."""
    with _pools_lock:
        if not _pools["running"]:
            _pools["threads"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _pools["running"] += 1
    try:
        yield
    finally:
        with _pools_lock:
            _pools["running"] -= 1
            if not _pools["running"]:
                torch.set_num_threads(_pools["threads"])


def summarize(per_query):
    """nan-mean of each per-query metric (NaN when no query had a relevant photo)."""
    out = {}
    for k, v in per_query.items():
        valid = v[~np.isnan(v)]
        out[k] = float(valid.mean()) if valid.size else math.nan
    return out


def per_class(values, labels):
    """nan-mean of a per-query metric for each query label."""
    res = {}
    for lab in np.unique(labels):
        v = values[labels == lab]
        v = v[~np.isnan(v)]
        res[int(lab)] = float(v.mean()) if v.size else math.nan
    return res
