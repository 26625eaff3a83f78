"""Exact retrieval metrics in one pass over chunks of queries (DESIGN section 7).

Photos are ranked by cosine similarity, descending, ties broken by gallery index (stable sort).
Memory is bounded by chunk x gallery; the full query x gallery matrix is never built.

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


def ranking_keys(sims, out=None):
    """int64 keys, unique per row, whose descending order is the ranking: similarity descending,
    ties by gallery index ascending. The float bits are mapped to order-preserving ints (upper
    32 bits), the reversed gallery index fills the lower 32. `sims` is overwritten; `out` is an
    int64 buffer to reuse."""
    sims = sims.float().contiguous().add_(0.0)  # + 0.0 turns -0.0 into +0.0
    bits = sims.view(torch.int32)
    bits.bitwise_xor_(bits.bitwise_right_shift(31).bitwise_and_(0x7FFFFFFF))
    n = bits.shape[1]
    keys = torch.empty(bits.shape, dtype=torch.int64, device=bits.device) if out is None else out[:bits.shape[0]]
    keys.copy_(bits).mul_(1 << 32).add_(n - 1 - torch.arange(n, device=bits.device))
    return keys


def hit_ranks(keys, relevant):
    """1-based ranks of the relevant gallery items for each row, ascending: [rows, P].

    Sorts only the P relevant keys of a row and counts, for each, the gallery items ranked
    above it with one binary search per gallery item: O(G log P), not O(G log G)."""
    asc = torch.sort(keys[:, relevant], dim=1).values
    below = torch.searchsorted(asc, keys)  # per photo: relevant keys under its key
    n, p = asc.shape
    offsets = torch.arange(n, device=keys.device)[:, None] * (p + 1)
    counts = torch.bincount((below + offsets).view(-1), minlength=n * (p + 1)).view(n, p + 1)
    above = torch.flip(torch.cumsum(torch.flip(counts, dims=[1]), dim=1), dims=[1])[:, 1:]
    return torch.flip(above, dims=[1]) + 1


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
    q_labels = torch.as_tensor(np.asarray(q_labels))
    relevant = {int(l): (g_lab == l).nonzero()[:, 0] for l in torch.unique(q_labels).tolist()}
    names = metric_names(ap_cut, ks, protocols)
    per_query = {k: torch.full((queries.shape[0],), math.nan, dtype=torch.float64) for k in names}
    topk = min(topk, gallery.shape[0])
    top = torch.zeros((queries.shape[0], topk), dtype=torch.int64)
    buffer = torch.empty((min(chunk_size, queries.shape[0]), gallery.shape[0]), dtype=torch.int64, device=device)
    for s in tqdm(range(0, queries.shape[0], chunk_size), desc=desc, disable=not progress, leave=False):
        keys = ranking_keys(queries[s:s + chunk_size].to(device) @ gallery.T, out=buffer)
        top[s:s + keys.shape[0]] = torch.topk(keys, topk, dim=1).indices.cpu()
        labels = q_labels[s:s + chunk_size]
        for lab in torch.unique(labels).tolist():
            if relevant[lab].numel() == 0:
                continue  # no relevant photo: NaN, as the seed
            rows = (labels == lab).nonzero()[:, 0]
            out = _group_metrics(hit_ranks(keys[rows.to(device)], relevant[lab]), ap_cut, ks, protocols)
            for k, v in out.items():
                per_query[k][s + rows] = v.cpu()
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
