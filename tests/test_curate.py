"""unialign_train.curate: rarest-first assignment by hand, chunked scoring vs a naive reference, diversity
fill, near-duplicate removal, save/load, input errors."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from unialign_train.data.subsets import load_subset
from unialign_train.curate import (
    CurateInputError,
    CurateOptionError,
    assign_rarest_first,
    curate,
    dedup_pairs,
    fill_diverse,
    near_duplicates,
    report_path,
    score_pool,
)
from unialign.errors import DataError

# Three concepts, K = 3 candidates each (rows sorted by score, as score_pool returns them).
TOP_IDX = np.array([[10, 11, 12], [10, 13, 14], [11, 10, 15]])
TOP_SC = np.array([[0.9, 0.8, 0.7], [0.6, 0.5, 0.2], [0.95, 0.9, 0.85]], dtype=np.float32)


def test_rarest_first_by_hand():
    # K-th best scores: c0 0.7, c1 0.2, c2 0.85 -> visiting order c1 (rarest), c0, c2 (commonest).
    # c1 takes its top two, rows 10 and 13. c0's best (10) is claimed, so it takes 11 and 12.
    # c2's candidates 11 and 10 are both claimed, leaving only 15. Commonest-first would have let c2
    # take 11 and 10, starving c1 of its best pair.
    a = assign_rarest_first(TOP_IDX, TOP_SC, budget=6, per_concept=2)
    assert a.order.tolist() == [1, 0, 2]
    assert a.rows.tolist() == [10, 13, 11, 12, 15]
    assert a.concept.tolist() == [1, 1, 0, 0, 2]
    np.testing.assert_allclose(a.score, [0.6, 0.5, 0.8, 0.7, 0.85])
    assert a.counts.tolist() == [2, 2, 1]
    assert a.no_candidates == []


def test_rarest_first_budget_and_min_score():
    # Budget 4 runs out after c1 and c0 (two each): c2 gets nothing.
    a = assign_rarest_first(TOP_IDX, TOP_SC, budget=4, per_concept=2)
    assert a.rows.tolist() == [10, 13, 11, 12] and a.counts.tolist() == [2, 2, 0]
    # min_score 0.65 removes every candidate of c1 (0.6, 0.5, 0.2): it is reported; c0 then gets 10.
    a = assign_rarest_first(TOP_IDX, TOP_SC, budget=10, per_concept=2, min_score=0.65)
    assert a.no_candidates == [1]
    assert a.rows.tolist() == [10, 11, 15]  # c0: 10, 11; c2: 11, 10 claimed -> 15
    assert len(set(a.rows.tolist())) == len(a.rows)
    # Default per_concept = ceil(budget / C) = ceil(5 / 3) = 2.
    assert assign_rarest_first(TOP_IDX, TOP_SC, budget=5).counts.tolist() == [2, 2, 1]
    # Equal rarity: lower concept index first.
    b = assign_rarest_first(np.array([[0, 1], [0, 1]]), np.ones((2, 2), np.float32), budget=2, per_concept=1)
    assert b.concept.tolist() == [0, 1] and b.rows.tolist() == [0, 1]


def naive_topk(pool, protos, k):
    P = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    Q = protos / np.linalg.norm(protos, axis=1, keepdims=True)
    S = (Q @ P.T).astype(np.float32)
    idx = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(S, idx, 1)


@pytest.mark.parametrize("chunk", [1, 37, 5000])
def test_score_pool_matches_naive(chunk):
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(1000, 16)).astype(np.float16)
    protos = rng.normal(size=(7, 16))
    idx, sc = score_pool(pool, protos, top_k=10, chunk=chunk)
    ref_i, ref_s = naive_topk(pool.astype(np.float64), protos, 10)
    assert idx.shape == (7, 10) and idx.dtype == np.int64 and sc.dtype == np.float32
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(sc, ref_s, atol=1e-5)


def test_score_pool_ties_lowest_index_and_memmap(tmp_path):
    # One-hot rows give exact cosines, so rows 0, 4, 8, ... tie exactly; the lowest indices must win
    # whatever the chunking (chunk 3 splits tied rows across chunks). Read from a memmap on disk.
    pool = np.tile(np.eye(4, dtype=np.float16), (6, 1))  # row r is e_{r % 4}
    mm = np.lib.format.open_memmap(tmp_path / "pool.npy", mode="w+", dtype=np.float16, shape=pool.shape)
    mm[:] = pool
    mm.flush()
    protos = np.array([[1.0, 0, 0, 0], [0, 1.0, 1.0, 0]])
    idx, sc = score_pool(np.load(tmp_path / "pool.npy", mmap_mode="r"), protos, top_k=3, chunk=3)
    assert idx[0].tolist() == [0, 4, 8]
    assert idx[1].tolist() == [1, 2, 5]  # e1 and e2 tie at 1/sqrt(2): index order 1, 2, 5
    assert score_pool(pool, protos, top_k=100)[0].shape == (2, 24)  # K clipped to the pool size


def _ring(angles_deg):
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], 1).astype(np.float32)


def test_farthest_fill_prefers_far_clusters_over_duplicates():
    # 20 near-copies around 0 deg, 3 points around 120 deg, 3 around 240 deg. Starting from row 0
    # (taken), the two fills must be one point from each far cluster, not more copies of cluster A.
    pool = _ring(list(np.linspace(-2, 2, 20)) + [118, 120, 122, 238, 240, 242])
    picks = fill_diverse(pool, [0], 2, method="farthest")
    # Row 0 sits at -2 deg: farthest is 122 deg (row 22, 124 deg away), then 240 deg (row 24: 118 deg
    # from row 0 and from row 22; its neighbours 238/242 are 116 deg from one of them).
    assert picks.tolist() == [22, 24]
    # A seeded candidate subsample (for pools too large for exact sampling) stays valid and repeatable.
    sub = fill_diverse(pool, [0], 3, seed=1, candidates=10)
    assert len(set(sub.tolist())) == 3 and 0 not in sub and (sub == fill_diverse(pool, [0], 3, seed=1, candidates=10)).all()
    # Without a taken set: seeded start, then spread; exact copies of picks come last.
    dup = np.concatenate([pool, pool[:1], pool[:1]])
    p1 = fill_diverse(dup, [], 3, seed=3)
    assert (p1 == fill_diverse(dup, [], 3, seed=3)).all() and len(set(p1.tolist())) == 3
    ang = np.rad2deg(np.arctan2(dup[p1, 1], dup[p1, 0])) % 360
    assert len({int(((a + 60) % 360) // 120) for a in ang}) == 3  # one per cluster


def test_kmeans_fill_valid_and_deterministic():
    rng = np.random.default_rng(1)
    pool = np.concatenate([rng.normal(c, 0.05, size=(30, 8)) for c in (-1.0, 0.0, 1.0)]).astype(np.float32)
    pool[:, 0] += np.repeat([0.0, 3.0, -3.0], 30)
    taken = np.arange(5)
    a = fill_diverse(pool, taken, 6, seed=7, method="kmeans")
    assert len(a) == 6 and len(set(a.tolist())) == 6 and not set(a.tolist()) & set(taken.tolist())
    assert (a == fill_diverse(pool, taken, 6, seed=7, method="kmeans")).all()
    with pytest.raises(CurateOptionError):
        fill_diverse(pool, taken, 6, method="random")  # type: ignore[arg-type]
    with pytest.raises(CurateOptionError):
        fill_diverse(pool, taken, 86)  # only 85 left


def test_curate_budget_exact_fill_and_no_candidates():
    rng = np.random.default_rng(2)
    pool = rng.normal(size=(300, 12)).astype(np.float32)
    pool[:, -1] = 0
    protos = np.concatenate([pool[:3] + 0.01, np.eye(12)[-1:]])  # concept 3: cosine 0 to every row
    names = ["a", "b", "c", "nothing"]
    res = curate(pool, protos, budget=40, per_concept=4, top_k=6, min_score=0.5, concept_names=names)
    assert len(res.rows) == 40 and len(set(res.rows.tolist())) == 40  # candidates ran out -> fill
    assert res.no_candidates == [3] and res.counts[3] == 0
    assert res.n_fill == 40 - int(res.counts.sum()) > 0
    assert set(res.rows[res.concept == 0].tolist()) >= {0}
    assert (res.source[res.concept < 0] == "fill").all() and np.isnan(res.score[res.concept < 0]).all()
    assert "nothing" in res.coverage()["no_candidates"]
    small = curate(pool[:10], protos, budget=25)
    assert sorted(small.rows.tolist()) == list(range(10)) and small.notes


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    pool = rng.normal(size=(100, 6)).astype(np.float16)
    res = curate(pool, rng.normal(size=(3, 6)), budget=15, per_concept=3, concept_names=["x", "y", "z"])
    path = res.save(tmp_path / "sub" / "subset.parquet")
    np.testing.assert_array_equal(load_subset(path), res.rows)
    t = pq.read_table(path).to_pydict()
    assert list(t) == ["row", "concept", "concept_index", "score", "source"]
    assert set(t["concept"]) <= {"x", "y", "z", ""} and t["source"].count("fill") == res.n_fill
    rep = json.loads(report_path(path).read_text())
    assert rep["budget"] == 15 and rep["n_fill"] == res.n_fill
    assert rep["pairs_per_concept"] == {"x": 3, "y": 3, "z": 3}
    assert [p.name for p in (tmp_path / "sub").iterdir()] and not list((tmp_path / "sub").glob(".*tmp"))
    with pytest.raises(DataError):
        load_subset(tmp_path / "missing.parquet")


def test_bad_input():
    pool = np.ones((5, 4), np.float32)
    with pytest.raises(ValueError, match="budget"):
        curate(pool, np.ones((2, 4)), budget=0)
    with pytest.raises(CurateInputError, match=r"dim 4.*dim 3"):
        curate(pool, np.ones((2, 3)), budget=2)
    bad = pool.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*\[3\]"):
        score_pool(bad, np.ones((2, 4)), top_k=2, chunk=2)
    with pytest.raises(DataError):
        near_duplicates(bad)


def naive_dedup(X, thr):
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    kept: list[int] = []
    for j in range(len(U)):
        if not kept or (U[kept] @ U[j]).max() < thr:
            kept.append(j)
    keep = np.zeros(len(U), bool)
    keep[kept] = True
    return keep


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_near_duplicates(chunk):
    rng = np.random.default_rng(4)
    base = rng.normal(size=(6, 64)).astype(np.float32)  # distinct: cosines ~ +-0.3
    X = np.concatenate([base, base[[0]], base[[2]] + 0.01 * rng.normal(size=(1, 64)), 3 * base[[4]]])
    keep, rep = near_duplicates(X.astype(np.float32), threshold=0.95, chunk=chunk, return_representative=True)
    assert keep.tolist() == [True] * 6 + [False] * 3  # exact copy, near copy, scaled copy dropped
    assert rep.tolist() == [0, 1, 2, 3, 4, 5, 0, 2, 4]
    Y = rng.normal(size=(300, 8)).astype(np.float32)
    np.testing.assert_array_equal(near_duplicates(Y, 0.9, chunk=chunk), naive_dedup(Y, 0.9))


def test_dedup_pairs_modes():
    rng = np.random.default_rng(5)
    a, b, c = rng.normal(size=(3, 32))
    x, y, z, w = rng.normal(size=(4, 32))
    img = np.stack([a, a, b, a, c])
    txt = np.stack([x, y, x, x, w])
    # pair 1: same image, new caption; pair 2: new image, same caption; pair 3: same image and caption.
    assert dedup_pairs(img, txt, mode="both").tolist() == [0, 1, 2, 4]
    assert dedup_pairs(img, txt, mode="either").tolist() == [0, 4]
    with pytest.raises(ValueError):
        dedup_pairs(img, txt, mode="any")  # type: ignore[arg-type]
