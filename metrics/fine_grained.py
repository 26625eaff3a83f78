"""Fine-grained (instance-level) retrieval: does a sketch find the very photo it was drawn from?

Acc@k is the share of sketch queries whose own photo ranks within the top k by cosine similarity,
a plain mean over queries. Ties count against the query: a query's rank is the number of gallery
photos scoring at least its own photo's score (itself included), so a photo tied with the true
one pushes it down. Two galleries (docs/metrics.md):
- "class": the photos of the query's own class (DP-CLIP's code; chance Acc@1 = 1 / class size);
- "unseen": every photo of the test split, each once (chance 1 / gallery size).
Like the categorical engine, similarities are computed exactly, a chunk of queries at a time, on
the device given (memory ~ chunk x gallery).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

from metrics.inputs import embeddings, finite, label_codes

KS = (1, 5, 10)
GALLERIES = ("class", "unseen")


def own_photo_ranks(
    queries, gallery, target, q_groups=None, g_groups=None, chunk_size=512, device="cpu"
):
    """1-based rank of each query's own photo `gallery[target[i]]`, by cosine similarity, among
    the gallery photos of the query's group (all of them when no groups are given). Ties count
    against the query. int64 numpy [n_queries]."""
    device = torch.device(device)
    q = F.normalize(embeddings(queries, "queries"), dim=1)
    g = F.normalize(embeddings(gallery, "gallery photos"), dim=1).to(device)
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"the queries have {q.shape[1]} dimensions but the gallery photos {g.shape[1]}: "
            f"embed both with the same model."
        )
    if not (finite(q) and finite(g)):
        raise ValueError(
            "embeddings contain NaN or infinite values; similarities cannot be ranked."
        )
    target = torch.as_tensor(np.asarray(target, dtype=np.int64))
    if target.shape != (q.shape[0],):
        raise ValueError(f"{q.shape[0]} queries but {tuple(target.shape)} target indices.")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= g.shape[0]):
        raise ValueError(f"target indices must lie in [0, {g.shape[0]}), the gallery's rows.")
    grouped = q_groups is not None
    if grouped:
        qg, gg = label_codes(q_groups, g_groups, q.shape[0], g.shape[0])
        gg = gg.to(device)
        if (gg[target.to(device)] != qg.to(device)).any():
            raise ValueError("a query's own photo lies outside the query's group.")
    ranks = torch.zeros(q.shape[0], dtype=torch.int64)
    step = max(1, int(chunk_size))
    for s in range(0, q.shape[0], step):
        sims = q[s : s + step].to(device) @ g.T
        own = sims.gather(1, target[s : s + step, None].to(device))
        at_least = sims >= own
        if grouped:
            at_least &= gg[None, :] == qg[s : s + step, None].to(device)
        ranks[s : s + step] = at_least.sum(1).cpu()
    return ranks.numpy()


def accuracies(ranks, ks=KS):
    """{'acc@k': share of ranks <= k} (NaN without queries)."""
    ranks = np.asarray(ranks)
    return {f"acc@{k}": float((ranks <= k).mean()) if ranks.size else math.nan for k in ks}


def fine_grained(
    queries, gallery, target, q_classes, g_classes, ks=KS, chunk_size=512, device="cpu"
):
    """The metrics of several query kinds against one photo gallery.

    queries: {kind: [n_q, d]} (e.g. original and converted sketch embeddings); gallery [n_g, d];
    target[i]: the gallery row of query i's own photo; q_classes / g_classes: class names.
    Returns {"ranks": {gallery: {kind: ranks}}, "summary": the eval_result block}, whose values
    are [one per kind] in the order of `queries`."""
    kinds = list(queries)
    q_classes, g_classes = np.asarray(q_classes), np.asarray(g_classes)
    ranks = {
        "class": {
            k: own_photo_ranks(v, gallery, target, q_classes, g_classes, chunk_size, device)
            for k, v in queries.items()
        },
        "unseen": {
            k: own_photo_ranks(v, gallery, target, None, None, chunk_size, device)
            for k, v in queries.items()
        },
    }
    sizes = dict(zip(*np.unique(g_classes, return_counts=True)))
    n_q = len(target)

    def block(which, chance):
        acc = {k: accuracies(ranks[which][k], ks) for k in kinds}
        out = {m: [acc[k][m] for k in kinds] for m in acc[kinds[0]]}
        out.update({"chance_acc@1": chance, "n_queries": n_q, "gallery": which})
        return out

    summary = block("class", float(np.mean([1 / sizes[c] for c in q_classes])) if n_q else math.nan)
    summary["unseen"] = block("unseen", 1 / len(g_classes))
    summary["unseen"]["n_gallery"] = int(len(g_classes))
    summary["per_class"] = {}
    for c in sorted(set(q_classes.tolist())):
        sel = q_classes == c
        acc = {k: accuracies(ranks["class"][k][sel], ks) for k in kinds}
        row = {m: [acc[k][m] for k in kinds] for m in acc[kinds[0]]}
        row.update(n_queries=int(sel.sum()), n_photos=int(sizes[c]))
        summary["per_class"][str(c)] = row
    return {"ranks": ranks, "summary": summary}
