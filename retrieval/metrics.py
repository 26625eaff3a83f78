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


def _chunk_metrics(sims, q_lab, g_lab, ap_cut, ks, protocols):
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices
    rel = g_lab[order] == q_lab[:, None]
    n_pos = rel.sum(1)
    hits = rel.cumsum(1, dtype=torch.int32)
    ranks = torch.arange(1, rel.shape[1] + 1, device=sims.device, dtype=torch.float32)
    prec = hits.float() / ranks
    relf = rel.float()
    npos_f = n_pos.float()
    nan = torch.full_like(npos_f, math.nan)
    out = {}

    def ratio(num, den):
        return torch.where(den > 0, num / den.clamp(min=1), nan)

    cut = min(ap_cut, rel.shape[1])
    den_cut = torch.minimum(npos_f, torch.tensor(float(ap_cut), device=sims.device))
    if "default" in protocols:
        out["default/AP@all"] = ratio((_reverse_cummax(prec) * relf).sum(1), npos_f)
        out[f"default/AP@{ap_cut}"] = ratio(
            (_reverse_cummax(prec[:, :cut]) * relf[:, :cut]).sum(1), den_cut)
    if "noninterp" in protocols:
        out["noninterp/AP@all"] = ratio((prec * relf).sum(1), npos_f)
        out[f"noninterp/AP@{ap_cut}"] = ratio((prec[:, :cut] * relf[:, :cut]).sum(1), den_cut)
    for k in ks:
        kk = min(k, rel.shape[1])
        if "default" in protocols:
            m = torch.minimum(n_pos, torch.tensor(kk, device=sims.device))
            got = hits.gather(1, (m - 1).clamp(min=0)[:, None])[:, 0].float()
            out[f"default/P@{k}"] = ratio(got, m.float())
        if "hits_over_k" in protocols:
            out[f"hits_over_k/P@{k}"] = torch.where(n_pos > 0, hits[:, kk - 1].float() / k, nan)
    return out, order


def retrieval_metrics(queries, gallery, q_labels, g_labels, chunk_size=512, device="cpu",
                      protocols=("default",), ap_cut=200, ks=(100, 200), topk=10, progress=True,
                      desc="ranking"):
    """Per-query metrics (numpy arrays keyed 'protocol/metric') and the top-k gallery indices."""
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; choose from {PROTOCOLS}.")
    device = torch.device(device)
    gallery = torch.as_tensor(gallery, dtype=torch.float32).to(device)
    g_lab = torch.as_tensor(g_labels).to(device)
    queries = torch.as_tensor(queries, dtype=torch.float32)
    q_labels = torch.as_tensor(q_labels)
    per_query, top = {}, []
    starts = range(0, queries.shape[0], chunk_size)
    for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
        q = queries[s:s + chunk_size].to(device)
        sims = q @ gallery.T
        out, order = _chunk_metrics(sims, q_labels[s:s + chunk_size].to(device), g_lab, ap_cut, ks,
                                    protocols)
        for key, v in out.items():
            per_query.setdefault(key, []).append(v.cpu())
        top.append(order[:, :topk].cpu())
    per_query = {k: torch.cat(v).numpy().astype(np.float64) for k, v in per_query.items()}
    return per_query, torch.cat(top).numpy() if top else np.zeros((0, topk), dtype=np.int64)


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
