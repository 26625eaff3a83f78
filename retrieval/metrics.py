"""Exact retrieval metrics in one pass over chunks of queries (DESIGN section 7).

Photos are ranked by cosine similarity, descending, ties broken by gallery index (stable sort).
Memory is bounded by chunk x gallery; the full query x gallery matrix is never built. Queries
are taken in label order, so that each chunk holds runs of queries sharing their relevant photos.

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

import numpy as np
import torch
from tqdm import tqdm

PROTOCOLS = ("default", "hits_over_k", "noninterp")


def _reverse_cummax(x):
    return torch.flip(torch.cummax(torch.flip(x, dims=[1]), dim=1).values, dims=[1])


def order_keys(values, index, n):
    """int64 keys, unique within a row, in ranking order: similarity, then gallery index reversed
    (ties go to the lower index). Upper 32 bits: the float's bits mapped to an order-preserving
    int; lower 32 bits: n - 1 - index."""
    bits = (values.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return bits.to(torch.int64) * (1 << 32) + (n - 1 - index)


def hit_ranks(sims, relevant):
    """1-based ranks of the relevant gallery items in each row of `sims` [n, G] (rows that share
    the relevant set), ascending: [n, P].

    Never sorts the gallery. Each row's similarities are cut into G equal-width buckets, a
    monotone map, so photos in different buckets compare as their buckets do: a prefix count of
    the relevant photos per bucket gives every photo the number of relevant photos ranked below
    it. Only photos that share a bucket with a relevant photo (a few per relevant photo) are
    compared exactly, by binary search among the row's sorted relevant keys. A histogram of those
    counts gives, for each relevant photo, the photos ranked above it."""
    n, g = sims.shape
    p = relevant.numel()
    lo, hi = torch.aminmax(sims, dim=1, keepdim=True)
    width = hi - lo
    scale = torch.where(width > 0, (g - 1) / width, torch.zeros_like(width))
    bucket = (sims - lo).mul_(scale).to(torch.int64).clamp_(0, g - 1)
    rel_bucket = bucket[:, relevant]
    # below_bucket[r, b]: relevant photos of row r in buckets < b, plus the row's histogram offset
    below_bucket = torch.zeros((n, g + 1), dtype=torch.int64, device=sims.device)
    below_bucket.scatter_add_(1, rel_bucket + 1, torch.ones_like(rel_bucket)).cumsum_(1)
    shared = below_bucket[:, 1:] != below_bucket[:, :-1]
    base = torch.arange(n, device=sims.device) * (p + 1)
    below = torch.gather(below_bucket.add_(base[:, None]), 1, bucket)
    r, i = torch.gather(shared, 1, bucket).nonzero(as_tuple=True)
    rel_keys = torch.sort(order_keys(sims[:, relevant], relevant, g), dim=1).values
    below[r, i] = _search_rows(rel_keys, r, order_keys(sims[r, i], i, g)) + base[r]
    counts = torch.bincount(below.view(-1), minlength=n * (p + 1)).view(n, p + 1)
    above = torch.flip(torch.cumsum(torch.flip(counts, dims=[1]), dim=1), dims=[1])[:, 1:]
    return torch.flip(above, dims=[1]) + 1


def _search_rows(sorted_keys, rows, keys):
    """For each key, how many keys of its row of `sorted_keys` are smaller (`rows` ascending,
    every row present: each holds at least its own relevant photos)."""
    n = sorted_keys.shape[0]
    per_row = torch.bincount(rows, minlength=n)
    col = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(per_row, 0) - per_row)[rows]
    padded = torch.zeros((n, int(per_row.max())), dtype=torch.int64, device=rows.device)
    padded[rows, col] = keys
    return torch.searchsorted(sorted_keys, padded)[rows, col]


def top_indices(sims, k):
    """The k best gallery indices of each row in ranking order, ties to the lower index: a float
    top-k finds each row's k-th value, then everything at least as similar is ordered exactly."""
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


def retrieval_metrics(queries, gallery, q_labels, g_labels, chunk_size=512, device="cpu",
                      protocols=("default",), ap_cut=200, ks=(100, 200), topk=10, progress=True,
                      desc="ranking"):
    """Per-query metrics (numpy arrays keyed 'protocol/metric') and the top-k gallery indices."""
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; choose from {PROTOCOLS}.")
    device = torch.device(device)
    gallery = torch.as_tensor(gallery, dtype=torch.float32).to(device)
    g_lab = torch.as_tensor(np.asarray(g_labels)).to(device)
    queries = torch.as_tensor(queries, dtype=torch.float32)
    if not (torch.isfinite(queries).all() and torch.isfinite(gallery).all()):
        raise ValueError("embeddings contain NaN or infinite values; similarities cannot be ranked.")
    q_labels = torch.as_tensor(np.asarray(q_labels))
    relevant = {int(l): (g_lab == l).nonzero()[:, 0] for l in torch.unique(q_labels).tolist()}
    names = metric_names(ap_cut, ks, protocols)
    per_query = {k: torch.full((queries.shape[0],), math.nan, dtype=torch.float64) for k in names}
    topk = min(topk, gallery.shape[0])
    top = torch.zeros((queries.shape[0], topk), dtype=torch.int64)
    by_label = torch.argsort(q_labels, stable=True)  # each chunk holds runs of one label
    for s in tqdm(range(0, queries.shape[0], chunk_size), desc=desc, disable=not progress, leave=False):
        idx = by_label[s:s + chunk_size]
        sims = queries[idx].to(device) @ gallery.T
        top[idx] = top_indices(sims, topk).cpu()
        labels, counts = torch.unique_consecutive(q_labels[idx], return_counts=True)
        start = 0
        for lab, count in zip(labels.tolist(), counts.tolist()):
            rows = slice(start, start + count)
            start += count
            if relevant[lab].numel() == 0:
                continue  # no relevant photo: NaN, as the seed
            out = _group_metrics(hit_ranks(sims[rows], relevant[lab]), ap_cut, ks, protocols)
            for k, v in out.items():
                per_query[k][idx[rows]] = v.cpu()
    return {k: v.numpy() for k, v in per_query.items()}, top.numpy()


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
