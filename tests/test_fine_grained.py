"""The fine-grained metric (metrics/fine_grained.py) against a brute-force oracle and by hand."""

import math

import numpy as np
import pytest

from metrics.fine_grained import accuracies, fine_grained, own_photo_ranks


def oracle_rank(q, gallery, target, groups=None, group=None):
    """Loop over the gallery: photos (of the query's group) scoring at least the own photo."""
    cos = [float(np.dot(q, g) / np.linalg.norm(q) / np.linalg.norm(g)) for g in gallery]
    own = cos[target]
    return sum(1 for j, c in enumerate(cos) if c >= own and (groups is None or groups[j] == group))


def one_hot_gallery(rng, n, dim):
    """Axis vectors: cosine with a query is one of its coordinates, exactly, so repeated axes tie
    exactly in float32 too."""
    return np.eye(dim, dtype=np.float32)[rng.integers(0, dim, n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_match_the_oracle_with_ties_and_a_class_of_one_photo(seed):
    rng = np.random.default_rng(seed)
    dim, n_g, n_q = 6, 40, 70
    gallery = one_hot_gallery(rng, n_g, dim)  # 40 photos on 6 axes: many exact ties
    g_cls = np.array([f"c{j % 4}" for j in range(n_g)])
    g_cls[7] = "alone"  # a class of one photo: its queries rank 1 in the class gallery
    queries = rng.normal(size=(n_q, dim)).astype(np.float32)
    target = rng.integers(0, n_g, n_q)
    target[:3] = 7
    q_cls = g_cls[target]
    for chunk in (1, 7, 512):
        ranks = own_photo_ranks(queries, gallery, target, q_cls, g_cls, chunk_size=chunk)
        pooled = own_photo_ranks(queries, gallery, target, chunk_size=chunk)
        want = [oracle_rank(queries[i], gallery, target[i], g_cls, q_cls[i]) for i in range(n_q)]
        want_pooled = [oracle_rank(queries[i], gallery, target[i]) for i in range(n_q)]
        assert ranks.tolist() == want
        assert pooled.tolist() == want_pooled
    assert ranks[:3].tolist() == [1, 1, 1]
    # a tie is counted against the query: a duplicate of the own photo means rank >= 2
    dup = [
        i for i in range(n_q) if (gallery[g_cls == q_cls[i]] == gallery[target[i]]).all(1).sum() > 1
    ]
    assert dup and all(ranks[i] >= 2 for i in dup)


def test_continuous_embeddings_match_the_oracle():
    rng = np.random.default_rng(5)
    gallery = rng.normal(size=(50, 16)).astype(np.float32)
    queries = rng.normal(size=(30, 16)).astype(np.float32)
    target = rng.integers(0, 50, 30)
    ranks = own_photo_ranks(queries, gallery, target, chunk_size=4)
    assert ranks.tolist() == [oracle_rank(queries[i], gallery, target[i]) for i in range(30)]


def test_summary_by_hand():
    # gallery: class a = photos 0 (x axis), 1 (y axis); class b = photo 2 (x axis)
    gallery = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
    g_cls = ["a", "a", "b"]
    queries = np.array([[1, 0.1], [0.1, 1], [1, 0.2]], np.float32)
    target = [0, 0, 2]  # query 0 finds its photo first; query 1 second; query 2 alone in b
    q_cls = ["a", "a", "b"]
    out = fine_grained({"original": queries}, gallery, target, q_cls, g_cls, ks=(1, 2))
    s = out["summary"]
    assert out["ranks"]["class"]["original"].tolist() == [1, 2, 1]
    # pooled: query 0 ties its photo 0 with photo 2 (both x axis): rank 2; query 2 likewise
    assert out["ranks"]["unseen"]["original"].tolist() == [2, 3, 2]
    assert s["acc@1"] == [pytest.approx(2 / 3)] and s["acc@2"] == [1.0]
    assert s["chance_acc@1"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert s["gallery"] == "class" and s["n_queries"] == 3
    assert s["unseen"]["acc@1"] == [0.0] and s["unseen"]["acc@2"] == [pytest.approx(2 / 3)]
    assert s["unseen"]["chance_acc@1"] == pytest.approx(1 / 3)
    assert s["per_class"]["a"]["acc@1"] == [0.5] and s["per_class"]["b"]["n_photos"] == 1


def test_two_kinds_are_reported_side_by_side():
    gallery = np.eye(3, dtype=np.float32)
    queries = {
        "original": np.eye(3, dtype=np.float32),
        "converted": np.eye(3, dtype=np.float32)[::-1],
    }
    s = fine_grained(queries, gallery, [0, 1, 2], ["c"] * 3, ["c"] * 3)["summary"]
    assert s["acc@1"] == [1.0, pytest.approx(1 / 3)]


def test_accuracies_without_queries_are_nan():
    assert math.isnan(accuracies(np.zeros(0))["acc@1"])


@pytest.mark.parametrize(
    "target, q_groups, g_groups, message",
    [
        ([0, 5], None, None, "target indices"),
        ([0], None, None, "target indices"),
        ([0, 1], ["a", "a"], ["a", "b"], "outside the query's group"),
    ],
)
def test_bad_targets_are_refused(target, q_groups, g_groups, message):
    with pytest.raises(ValueError, match=message):
        own_photo_ranks(
            np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), target, q_groups, g_groups
        )
