"""The metric engine on hostile inputs: labels of any kind, mismatched shapes, numpy views,
degenerate
galleries across both rankers and 1-3 threads, and an error or Ctrl-C inside one block of the
pool."""

import os
import signal
import time

import numpy as np
import pytest
import torch

from metrics import engine as metrics
from metrics import rank_kernel
from metrics.engine import retrieval_metrics
from tests.test_metrics import random_case, reference

ALL = ("default", "hits_over_k", "noninterp")


@pytest.fixture
def threads():
    """Set torch's thread count for a test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def run(q, g, ql, gl, **kw):
    return retrieval_metrics(
        q, g, ql, gl, protocols=ALL, ap_cut=20, ks=(5, 50), progress=False, **kw
    )


def assert_same(a, b):
    (ma, ta), (mb, tb) = a, b
    assert ma.keys() == mb.keys()
    for k in ma:
        np.testing.assert_array_equal(ma[k], mb[k], err_msg=k)
    np.testing.assert_array_equal(ta, tb)


I64 = np.iinfo(np.int64)
LABELS = {
    "strings": lambda lab: np.array([f"class {x}" for x in lab]),
    "a list of str": lambda lab: [f"c{x}" for x in lab],
    "fractions": lambda lab: lab / 10,  # 0.1, 0.2, ...: int() would merge them
    "negative": lambda lab: -lab - 1,
    "int64 extremes": lambda lab: np.where(lab % 2, I64.max - lab, I64.min + lab),
    "torch": lambda lab: torch.tensor(lab),
}


@pytest.mark.parametrize("q_kind, g_kind", [("int", "str"), ("mixed", "mixed"), ("none", "int")])
def test_labels_of_kinds_that_cannot_match_are_refused(q_kind, g_kind):
    """Integer query labels against string gallery labels (numpy would turn 1 into "1" and match
    them);
    an object array mixing 1 and "1", or holding None, cannot be ordered: both refused, named.
    An object array of plain ints (from pandas, say) ranks as the ints."""
    q, g, ql, gl = random_case(0)
    as_kind = {
        "int": lambda lab: lab.astype(np.int64),
        "str": lambda lab: lab.astype(str),
        "mixed": lambda lab: np.array(
            [int(x) if i % 2 else str(x) for i, x in enumerate(lab)], dtype=object
        ),
        "none": lambda lab: np.array([None] + list(lab[1:]), dtype=object),
    }
    with pytest.raises(ValueError, match="labels of mixed kinds.*give labels of one kind"):
        run(q, g, as_kind[q_kind](ql), as_kind[g_kind](gl))
    assert_same(run(q, g, ql.astype(object), gl), run(q, g, ql, gl))


@pytest.mark.parametrize("kind", LABELS)
@pytest.mark.usefixtures("ranker")
def test_labels_of_any_kind_rank_as_integer_labels(kind):
    q, g, ql, gl = random_case(4)
    assert_same(
        run(q, g, LABELS[kind](ql), LABELS[kind](gl), chunk_size=8), run(q, g, ql, gl, chunk_size=8)
    )


@pytest.mark.parametrize(
    "case", ["short queries", "long queries", "short gallery", "long gallery", "2-D"]
)
def test_labels_that_do_not_match_the_embeddings_are_refused(case, threads):
    """One label per row, or a clear error: a short query label list used to leave queries
    silently unranked (NaN) on two threads."""
    threads(2)
    q, g, ql, gl = random_case(0)
    ql, gl = {
        "short queries": (ql[:-3], gl),
        "long queries": (np.r_[ql, 1], gl),
        "short gallery": (ql, gl[:-3]),
        "long gallery": (ql, np.r_[gl, gl]),
        "2-D": (ql[:, None], gl[:, None]),
    }[case]
    with pytest.raises(ValueError, match=r"labels of shape .*one label per row"):
        run(q, g, ql, gl)


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("chunk", [0, -5, 2.5])
def test_a_chunk_size_below_one_or_fractional_is_refused(chunk, n_threads, threads):
    threads(n_threads)
    q, g, ql, gl = random_case(0)
    with pytest.raises(ValueError, match=f"chunk_size={chunk} must be a whole number from 1"):
        run(q, g, ql, gl, chunk_size=chunk)


def test_embeddings_of_other_shapes_are_refused():
    q, g, ql, gl = random_case(0)
    with pytest.raises(ValueError, match=r"queries have 8 dimensions but the gallery photos 4"):
        run(q, g[:, :4], ql, gl)
    with pytest.raises(
        ValueError, match=r"queries must be a 2-D array \[n, dim\], got shape \(8,\)"
    ):
        run(q[0], g, ql[:1], gl)


def test_numpy_views_and_other_float_types_rank_as_float32():
    """A reversed view (negative strides) used to fail inside torch; Fortran order, float64 and
    float16 are taken as their float32 values."""
    q, g, ql, gl = random_case(1)
    want = run(q, g, ql, gl)
    assert_same(run(q, g[::-1].copy()[::-1], ql, gl[::-1].copy()[::-1]), want)
    assert_same(run(np.asfortranarray(q), torch.tensor(g).T.contiguous().T, ql, gl), want)
    assert_same(run(q.astype(np.float64), g.astype(np.float64), ql, gl), want)
    h = q.astype(np.float16)
    assert_same(run(h, g, ql, gl), run(h.astype(np.float32), g, ql, gl))


def degenerate_cases():
    rng = np.random.default_rng(7)
    ql, gl = rng.integers(0, 3, 9), rng.integers(0, 3, 40)
    unit = rng.normal(size=(9, 4)).astype(np.float32)
    sub = np.float32(1e-45)  # the smallest subnormal
    yield "all equal", np.ones((9, 4), np.float32), np.ones((40, 4), np.float32), ql, gl
    yield (
        "duplicate rows",
        unit,
        np.repeat(rng.normal(size=(4, 4)).astype(np.float32), 10, 0),
        ql,
        gl,
    )
    yield (
        "subnormal",
        np.ones((9, 1), np.float32),
        (rng.integers(-3, 4, (40, 1)) * sub).astype(np.float32),
        ql,
        gl,
    )
    yield (
        "signed zeros",
        np.ones((9, 1), np.float32),
        rng.choice([-0.0, 0.0], (40, 1)).astype(np.float32),
        ql,
        gl,
    )
    extremes = rng.choice([-1e18, 1e-30, 1e18, -1e-38, 0.0], (40, 1)).astype(np.float32)
    yield "large and small", np.ones((9, 1), np.float32), extremes, ql, gl
    yield "gallery of 1", unit, unit[:1], ql, np.array([1])
    rounded = np.round(rng.normal(size=(40, 4))).astype(np.float32)
    yield "every photo relevant", unit, rounded, np.ones(9, int), np.ones(40, int)
    yield "no query", unit[:0], unit, ql[:0], gl[:9]
    yield "no photo", unit, unit[:0], ql, gl[:0]


@pytest.mark.parametrize("case", list(degenerate_cases()), ids=lambda c: c[0])
def test_degenerate_galleries_bit_for_bit_across_rankers_and_threads(case, threads, monkeypatch):
    """Every degenerate case against the plain per-query sort, and the same bits from the kernel
    and the torch ranking on 1, 2 and 3 threads."""
    _, q, g, ql, gl = case
    ref = reference(q.astype(np.float64), g.astype(np.float64), ql, gl, cut=20, ks=(5, 50))
    results = []
    for use_kernel in (True, False):
        monkeypatch.setattr(
            rank_kernel, "kernel", rank_kernel.kernel if use_kernel else (lambda: None)
        )
        for n in (1, 2, 3):
            threads(n)
            results.append(run(q, g, ql, gl, chunk_size=4))
            assert torch.get_num_threads() == n
    got = results[0][0]
    if len(q):
        np.testing.assert_allclose(got["default/AP@all"], ref["ap"], atol=1e-12, equal_nan=True)
        np.testing.assert_allclose(
            got["noninterp/AP@20"], ref["ap_plain_cut"], atol=1e-12, equal_nan=True
        )
        np.testing.assert_allclose(got["default/P@5"], ref["p"][:, 0], atol=1e-12, equal_nan=True)
    for other in results[1:]:
        assert_same(other, results[0])


def slow_failing_ranker(monkeypatch, fail):
    """rank_kernel.hit_ranks that records the thread count it ran with, sleeps a little, and
    calls `fail` on its third call."""
    seen, real = [], rank_kernel.hit_ranks

    def ranks(sims, relevant):
        seen.append(torch.get_num_threads())
        if len(seen) == 3:
            fail()
        time.sleep(0.01)
        return real(sims, relevant)

    monkeypatch.setattr(rank_kernel, "hit_ranks", ranks)
    return seen


def raise_error():
    raise RuntimeError("a block failed")


def press_ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize(
    "fail, error", [(raise_error, RuntimeError), (press_ctrl_c, KeyboardInterrupt)]
)
def test_an_error_or_ctrl_c_in_one_block_stops_the_pool_and_restores_threads(
    fail, error, threads, monkeypatch
):
    """Blocks run on one intra-op thread each; an exception (or Ctrl-C) in one cancels the blocks
    not yet started and torch's thread count comes back."""
    threads(2)
    # Python's own Ctrl-C handler, whatever an earlier test of this process left installed: the
    # fresh-clone CI of 0eaa7d4 once saw the SIGINT swallowed ("DID NOT RAISE"), never alone
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    q, g, ql, gl = random_case(2, nq=300, n_cls=3)
    seen = slow_failing_ranker(monkeypatch, fail)
    try:
        with pytest.raises(error):
            run(q, g, ql, gl, chunk_size=2)  # one query a block: 300 blocks
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.get_num_threads() == 2
    assert set(seen) == {1} and len(seen) < 100


def test_two_overlapping_rankings_restore_torch_threads(threads):
    """Two threads ranking at once (a library user's thread pool): the first to finish must not
    restore its count while the other still runs, nor the last leave torch on one thread."""
    threads(2)
    first, second = metrics._one_thread_per_op(), metrics._one_thread_per_op()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert torch.get_num_threads() == 1  # the second is still ranking
    second.__exit__(None, None, None)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("n_threads, chunk", [(1, 1), (1, 3), (2, 6), (3, 512), (2, 2 * 149 + 3)])
def test_the_numbers_do_not_depend_on_threads_or_chunk_size(n_threads, chunk, threads):
    """MKL computes a product of 1-3 rows (its matrix-vector paths) to other last bits than a
    larger one; blocks of that size (a small chunk, a tail of 1-3 queries) changed some ranks of
    near-tied photos, so the numbers depended on the machine's thread count."""
    rng = np.random.default_rng(3)
    q, g = (
        x / np.linalg.norm(x, axis=1, keepdims=True)
        for x in (
            rng.standard_normal((301, 64), dtype=np.float32),
            rng.standard_normal((3000, 64), dtype=np.float32),
        )
    )
    ql, gl = rng.integers(0, 5, 301), rng.integers(0, 5, 3000)
    threads(1)
    want = run(q, g, ql, gl, chunk_size=512)
    threads(n_threads)
    assert_same(run(q, g, ql, gl, chunk_size=chunk), want)


def test_nan_labels_are_refused():
    """A NaN label (a missing class) matches nothing by ==, but one code once labels are encoded:
    refused rather than either."""
    q, g, ql, gl = random_case(0)
    gl = gl.astype(float)
    gl[4] = np.nan
    with pytest.raises(ValueError, match="gallery photos' labels contain NaN"):
        run(q, g, ql, gl)


@pytest.mark.usefixtures("ranker")
def test_embeddings_that_require_grad_rank_as_plain_tensors():
    """Model outputs taken outside torch.no_grad(): the kernel's numpy view used to fail, and the
    torch ranking would build an autograd graph of every block."""
    q, g, ql, gl = random_case(2)
    tracked = run(torch.tensor(q, requires_grad=True), torch.tensor(g, requires_grad=True), ql, gl)
    assert_same(tracked, run(q, g, ql, gl))
