"""The metric engine against a straightforward per-query reference written independently here."""

import math
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from metrics import engine as metrics
from metrics import rank_kernel
from metrics.engine import per_class, retrieval_metrics, summarize


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
        out["p"].append([sum(rel[: min(k, npos)]) / min(k, npos) for k in ks])
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
def test_engine_matches_reference(seed, chunk, ranker):
    q, g, ql, gl = random_case(seed)
    ref = reference(q.astype(np.float64), g.astype(np.float64), ql, gl, cut=50, ks=(20, 300))
    got, top = retrieval_metrics(
        q,
        g,
        ql,
        gl,
        chunk_size=chunk,
        protocols=("default", "hits_over_k", "noninterp"),
        ap_cut=50,
        ks=(20, 300),
        topk=10,
        progress=False,
    )
    assert np.isnan(ref["ap"]).any()  # some queries have no relevant photo
    np.testing.assert_allclose(got["default/AP@all"], ref["ap"], atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got["default/AP@50"], ref["ap_cut"], atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got["default/P@20"], ref["p"][:, 0], atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(
        got["default/P@300"], ref["p"][:, 1], atol=1e-6, equal_nan=True
    )  # k > gallery
    np.testing.assert_allclose(
        got["hits_over_k/P@20"], ref["p_hits"][:, 0], atol=1e-6, equal_nan=True
    )
    np.testing.assert_allclose(
        got["hits_over_k/P@300"], ref["p_hits"][:, 1], atol=1e-6, equal_nan=True
    )
    np.testing.assert_allclose(got["noninterp/AP@all"], ref["ap_plain"], atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(
        got["noninterp/AP@50"], ref["ap_plain_cut"], atol=1e-6, equal_nan=True
    )
    sims = q @ g.T
    for i in range(len(q)):
        expect = sorted(range(len(g)), key=lambda j: (-sims[i, j], j))[:10]
        assert top[i].tolist() == expect


def sorted_ranks(sims, relevant):
    """1-based ranks of the relevant columns in each row, by a plain sort on (-similarity,
    index)."""
    out = []
    for row in sims.tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        place = {j: k + 1 for k, j in enumerate(order)}
        out.append(sorted(place[j] for j in relevant.tolist()))
    return torch.tensor(out)


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "extremes"])
def test_both_rankers_place_every_relevant_photo_exactly(kind):
    """The numba kernel and the torch ranking against a plain sort: tied similarities (ties go to
    the lower index), -0.0 against +0.0, 1e30 beside 1e-30, galleries of 1 to 3 photos, every photo
    relevant."""
    rng = np.random.default_rng(["normal", "ties", "zeros", "extremes"].index(kind))
    for case in range(40):
        n, g = (
            int(rng.integers(1, 6)),
            int(rng.integers(1, 4) if case < 10 else rng.integers(4, 200)),
        )
        p = int(rng.integers(1, g + 1)) if case % 5 else g
        if kind == "normal":
            s = rng.normal(size=(n, g))
        elif kind == "ties":
            s = np.round(rng.normal(size=(n, g)) * 2) / 2
        elif kind == "zeros":
            s = np.where(rng.random((n, g)) < 0.5, -0.0, 0.0)
        else:
            s = rng.choice([-1e30, 1e30, 0.0, 1e-30, -1e-30, 3.0], size=(n, g))
        sims = torch.tensor(s, dtype=torch.float32)
        relevant = torch.tensor(np.sort(rng.choice(g, p, replace=False)))
        expect = sorted_ranks(sims, relevant)
        assert torch.equal(rank_kernel.hit_ranks(sims, relevant), expect), (kind, case)
        assert torch.equal(metrics.hit_ranks(sims, relevant), expect), (kind, case)


def test_cpu_engine_ranks_with_the_kernel_in_threads(monkeypatch):
    """On a CPU with two threads, blocks of queries go to two threads, each through the kernel;
    with one thread, blocks run one after the other: the same numbers either way."""
    q, g, ql, gl = random_case(3, nq=120, ng=500)
    calls = []
    real = rank_kernel.hit_ranks
    monkeypatch.setattr(
        rank_kernel, "hit_ranks", lambda s, r: calls.append(s.shape[0]) or real(s, r)
    )
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two, top2 = retrieval_metrics(q, g, ql, gl, chunk_size=40, progress=False)
        assert calls and sum(calls) == sum(int((gl == lab).any()) for lab in ql)
        torch.set_num_threads(1)
        one, top1 = retrieval_metrics(q, g, ql, gl, chunk_size=40, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert max(calls) <= 40
    np.testing.assert_array_equal(top1, top2)
    for k in one:
        np.testing.assert_array_equal(one[k], two[k])


def test_kernel_without_a_writable_cache_folder_compiles_per_process(monkeypatch, caplog):
    """A read-only checkout and home: numba cannot cache the kernel, so it is compiled uncached,
    with one warning naming NUMBA_CACHE_DIR; the ranks are the same."""
    numba = pytest.importorskip("numba")
    real = numba.njit

    def no_locator(*args, **kwargs):
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function '_rank_rows': no locator available")
        return real(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", no_locator)
    rank_kernel.kernel.cache_clear()
    try:
        assert rank_kernel.kernel() is not None
        sims, relevant = torch.randn(3, 50), torch.tensor([2, 7, 30])
        assert torch.equal(rank_kernel.hit_ranks(sims, relevant), sorted_ranks(sims, relevant))
    finally:
        rank_kernel.kernel.cache_clear()
    assert "cannot cache the ranking kernel" in caplog.text and "NUMBA_CACHE_DIR" in caplog.text


def test_torch_ranking_splits_rows_whose_flat_indices_would_pass_int32(monkeypatch):
    """The torch ranking (the GPU's) indexes rows x buckets with int32: past 2^31 (a block of 4,096
    queries and half a million photos) it ranks the rows in parts. The limit is lowered here, so
    that 10 rows of 30 photos take four parts, with the same ranks."""
    sims, relevant = torch.randn(10, 30), torch.tensor([0, 3, 17, 29])
    monkeypatch.setattr(metrics, "INDEX_LIMIT", 200)
    assert 200 // (2 * 30 + 2) == 3
    assert torch.equal(metrics.hit_ranks(sims, relevant), sorted_ranks(sims, relevant))


def test_hand_computed_case():
    # one query; gallery similarities 0.9, 0.8 (tie with index 3), 0.7, 0.8; relevant: 1 and 2
    q = np.array([[1.0, 0.0]])
    sims = [0.9, 0.8, 0.7, 0.8]
    g = np.array([[s, math.sqrt(1 - s * s)] for s in sims])
    gl = np.array([0, 1, 1, 0])
    got, top = retrieval_metrics(
        q,
        g,
        np.array([1]),
        gl,
        ap_cut=2,
        ks=(1, 3),
        progress=False,
        protocols=("default", "hits_over_k", "noninterp"),
    )
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
            assert got["noninterp/AP@all"][i] == pytest.approx(
                average_precision_score(rel, sims[i]), abs=1e-6
            )
        else:
            assert math.isnan(got["noninterp/AP@all"][i])


def test_summary_skips_nan_and_per_class():
    per_query = {"default/AP@all": np.array([0.5, math.nan, 1.0])}
    assert summarize(per_query)["default/AP@all"] == pytest.approx(0.75)
    assert per_class(np.array([0.5, 1.0, 0.2, math.nan]), np.array([3, 3, 4, 4])) == {
        3: 0.75,
        4: 0.2,
    }


def test_non_finite_embeddings_are_refused():
    q, g, ql, gl = random_case(0)
    g[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        retrieval_metrics(q, g, ql, gl, progress=False)


def test_similarities_that_overflow_are_refused():
    """Finite embeddings whose products overflow float32 (inf, or NaN from inf - inf) would rank
    by accident; the engine refuses them and names the fix."""
    q, g, ql, gl = random_case(0, ties=False)
    with pytest.raises(ValueError, match="overflow float32.*L2-normalise"):
        retrieval_metrics(q * 1e20, g * 1e20, ql, gl, progress=False)


def test_kernel_refuses_a_gallery_beyond_its_int32_buckets():
    """2 buckets a photo, numbered in int32: from 2^30 photos the relevant photos' marker (bucket
    2G) wrapped to a negative index, read as another bucket: wrong ranks, silently. A row of 2^30
    equal similarities, expanded from one number, costs no memory."""
    sims = torch.zeros(1, 1).expand(1, 2**30)
    with pytest.raises(ValueError, match="1,073,741,824 photos.*at most 1,073,741,823"):
        rank_kernel.hit_ranks(sims, torch.tensor([0, 5]))


@pytest.mark.parametrize("how", ["numba missing", "MA_SBIR_NO_NUMBA=1"])
def test_without_the_kernel_the_torch_ranking_gives_the_same_numbers(how, monkeypatch, caplog):
    """numba not installed: one warning naming the fix; MA_SBIR_NO_NUMBA=1: silently. Either way the
    engine ranks with torch operations, to the same numbers as the kernel."""
    q, g, ql, gl = random_case(5)
    with_kernel = retrieval_metrics(q, g, ql, gl, chunk_size=16, progress=False)
    if how == "numba missing":
        monkeypatch.setitem(
            sys.modules, "numba", None
        )  # `from numba import njit` raises ImportError
    else:
        monkeypatch.setenv("MA_SBIR_NO_NUMBA", "1")
    rank_kernel.kernel.cache_clear()
    try:
        assert rank_kernel.kernel() is None
        without = retrieval_metrics(q, g, ql, gl, chunk_size=16, progress=False)
    finally:
        rank_kernel.kernel.cache_clear()
    assert ("numba is not installed" in caplog.text) == (how == "numba missing")
    np.testing.assert_array_equal(with_kernel[1], without[1])
    for k in with_kernel[0]:
        np.testing.assert_array_equal(with_kernel[0][k], without[0][k])


@pytest.mark.parametrize("value, uses_kernel", [("1", False), ("0", True), ("", True)])
def test_ma_sbir_no_numba_0_keeps_the_kernel(value, uses_kernel, monkeypatch):
    """MA_SBIR_NO_NUMBA=1 turns the kernel off; =0 (or empty) leaves it on, as the name reads."""
    monkeypatch.setenv("MA_SBIR_NO_NUMBA", value)
    rank_kernel.kernel.cache_clear()
    try:
        assert (rank_kernel.kernel() is not None) == uses_kernel
    finally:
        rank_kernel.kernel.cache_clear()
