"""The metric engine against a straightforward per-query reference written independently here."""
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from retrieval.metrics import per_class, retrieval_metrics, summarize


def reference(q, g, ql, gl, cut=200, ks=(100, 200)):
    """Seed-style: full similarity matrix, a stable argsort per query, a Python loop."""
    sims = q @ g.T
    out = {k: [] for k in ("ap", "ap_cut", "p", "p_hits", "ap_plain", "ap_plain_cut")}
    for i in range(len(q)):
        order = sorted(range(len(g)), key=lambda j: (-sims[i, j], j))
        rel = [1 if gl[j] == ql[i] else 0 for j in order]
        npos = sum(rel)
        if npos == 0:
            for k in out:
                out[k].append(math.nan if k not in ("p", "p_hits") else [math.nan] * len(ks))
            continue

        def voc(rel_list, denom):
            prec, hits = [], 0
            for r, x in enumerate(rel_list, start=1):
                hits += x
                prec.append(hits / r)
            for r in range(len(prec) - 2, -1, -1):  # non-increasing from the right
                prec[r] = max(prec[r], prec[r + 1])
            return sum(p for p, x in zip(prec, rel_list) if x) / denom

        def plain(rel_list, denom):
            hits, s = 0, 0.0
            for r, x in enumerate(rel_list, start=1):
                hits += x
                if x:
                    s += hits / r
            return s / denom

        out["ap"].append(voc(rel, npos))
        out["ap_cut"].append(voc(rel[:cut], min(cut, npos)))
        out["ap_plain"].append(plain(rel, npos))
        out["ap_plain_cut"].append(plain(rel[:cut], min(cut, npos)))
        out["p"].append([sum(rel[:min(k, npos)]) / min(k, npos) for k in ks])
        out["p_hits"].append([sum(rel[:k]) / k for k in ks])
    return {k: np.array(v, dtype=float) for k, v in out.items()}


def random_case(seed, nq=37, ng=230, d=8, n_cls=6, ties=True):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(nq, d)).astype(np.float32)
    g = rng.normal(size=(ng, d)).astype(np.float32)
    if ties:  # exact duplicate photos and quantised features create tied similarities
        g[10:20] = g[0]
        q = np.round(q)
        g = np.round(g)
        q[1] = 0  # a query whose similarities all tie
    ql = rng.integers(0, n_cls + 1, size=nq)  # label n_cls has no photo: NaN queries
    gl = rng.integers(0, n_cls, size=ng)
    return q, g, ql, gl


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_engine_matches_reference(seed, chunk):
    q, g, ql, gl = random_case(seed)
    ref = reference(q.astype(np.float64), g.astype(np.float64), ql, gl, cut=50, ks=(20, 300))
    got, top = retrieval_metrics(q, g, ql, gl, chunk_size=chunk, protocols=("default", "hits_over_k", "noninterp"),
                                 ap_cut=50, ks=(20, 300), topk=10, progress=False)
    assert np.isnan(ref["ap"]).any()  # some queries have no relevant photo
    np.testing.assert_allclose(got["default/AP@all"], ref["ap"], atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got["default/AP@50"], ref["ap_cut"], atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got["default/P@20"], ref["p"][:, 0], atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got["default/P@300"], ref["p"][:, 1], atol=1e-6, equal_nan=True)  # k > gallery
    np.testing.assert_allclose(got["hits_over_k/P@20"], ref["p_hits"][:, 0], atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got["hits_over_k/P@300"], ref["p_hits"][:, 1], atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got["noninterp/AP@all"], ref["ap_plain"], atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got["noninterp/AP@50"], ref["ap_plain_cut"], atol=1e-6, equal_nan=True)
    sims = q @ g.T
    for i in range(len(q)):
        expect = sorted(range(len(g)), key=lambda j: (-sims[i, j], j))[:10]
        assert top[i].tolist() == expect


def test_hand_computed_case():
    # one query; gallery similarities 0.9, 0.8 (tie with index 3), 0.7, 0.8; relevant: 1 and 2
    q = np.array([[1.0, 0.0]])
    sims = [0.9, 0.8, 0.7, 0.8]
    g = np.array([[s, math.sqrt(1 - s * s)] for s in sims])
    gl = np.array([0, 1, 1, 0])
    got, top = retrieval_metrics(q, g, np.array([1]), gl, ap_cut=2, ks=(1, 3), progress=False,
                                 protocols=("default", "hits_over_k", "noninterp"))
    # ranking by (-sim, index): 0, 1, 3, 2 -> relevance 0, 1, 0, 1; precision 0, 1/2, 1/3, 1/2
    # interpolated precision at the hits: max(1/2, 1/3, 1/2) = 1/2 and 1/2 -> AP = (1/2 + 1/2) / 2
    assert top[0].tolist() == [0, 1, 3, 2]
    assert got["default/AP@all"][0] == pytest.approx(0.5)
    assert got["noninterp/AP@all"][0] == pytest.approx((1 / 2 + 2 / 4) / 2)
    # top 2: relevance 0, 1; denominator min(2, 2) = 2 -> (1/2) / 2
    assert got["default/AP@2"][0] == pytest.approx(0.25)
    assert got["default/P@1"][0] == pytest.approx(0.0)
    assert got["default/P@3"][0] == pytest.approx(1 / 2)  # top min(3, 2) = 2
    assert got["hits_over_k/P@3"][0] == pytest.approx(1 / 3)


def test_noninterp_ap_matches_sklearn():
    q, g, ql, gl = random_case(5, ties=False)
    got, _ = retrieval_metrics(q, g, ql, gl, protocols=("noninterp",), progress=False)
    sims = q @ g.T
    for i in range(len(q)):
        rel = gl == ql[i]
        if rel.any():
            assert got["noninterp/AP@all"][i] == pytest.approx(average_precision_score(rel, sims[i]), abs=1e-6)
        else:
            assert math.isnan(got["noninterp/AP@all"][i])


def test_summary_skips_nan_and_per_class():
    per_query = {"default/AP@all": np.array([0.5, math.nan, 1.0])}
    assert summarize(per_query)["default/AP@all"] == pytest.approx(0.75)
    assert per_class(np.array([0.5, 1.0, 0.2, math.nan]), np.array([3, 3, 4, 4])) == {3: 0.75, 4: 0.2}


def test_non_finite_embeddings_are_refused():
    q, g, ql, gl = random_case(0)
    g[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        retrieval_metrics(q, g, ql, gl, progress=False)
