"""unialign_train.select.metrics against naive full-matrix references, invariances, calibration, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from unialign_train.select import metrics as M

# ------------------------------------------------------------------ naive references (full n x n)


def _unit(A):
    return A / np.linalg.norm(A, axis=1, keepdims=True)


def _naive_knn(A, k):
    S = _unit(A) @ _unit(A).T
    np.fill_diagonal(S, -np.inf)
    return [set(np.argsort(-S[i], kind="stable")[:k].tolist()) for i in range(len(A))]


def naive_mutual_knn(X, Y, k):
    nx, ny = _naive_knn(X, k), _naive_knn(Y, k)
    return float(np.mean([len(a & b) / k for a, b in zip(nx, ny)]))


def _hsic_biased(K, L):
    n = len(K)
    H = np.eye(n) - 1.0 / n
    return float(np.trace(K @ H @ L @ H))


def _hsic_unbiased(K, L):  # Song et al. 2012 eq. 5, as in the PRH code
    m = len(K)
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0)
    np.fill_diagonal(Lt, 0)
    return float(
        (np.sum(Kt * Lt.T) + Kt.sum() * Lt.sum() / ((m - 1) * (m - 2)) - 2 * np.sum(Kt @ Lt) / (m - 2))
        / (m * (m - 3))
    )


def _cka(K, L, hsic):
    return hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))


def naive_linear_cka(X, Y):
    return _cka(X @ X.T, Y @ Y.T, _hsic_biased)  # Gram form; uncentred X is fine since H centres


def naive_rbf_cka(X, Y):
    def gram(A):
        D = cdist(A, A, "sqeuclidean")
        s2 = np.median(D[np.triu_indices(len(A), 1)])
        return np.exp(-D / (2 * s2))

    return _cka(gram(X), gram(Y), _hsic_biased)


def naive_unbiased_cka(X, Y):
    return _cka(X @ X.T, Y @ Y.T, _hsic_unbiased)  # raw (uncentred) features on purpose


def naive_cknna(X, Y, k):  # PRH cknna(unbiased=True) without its +1e-6
    K, L = _unit(X) @ _unit(X).T, _unit(Y) @ _unit(Y).T
    n = len(K)

    def mask(S):
        S = S.copy()
        np.fill_diagonal(S, -np.inf)
        m = np.zeros_like(S)
        for i in range(n):
            m[i, np.argsort(-S[i])[:k]] = 1
        return m

    mk, ml = mask(K), mask(L)
    kl = _hsic_unbiased(mk * ml * K, mk * ml * L)
    return kl / math.sqrt(_hsic_unbiased(mk * K, mk * K) * _hsic_unbiased(ml * L, ml * L))


def naive_svcca(X, Y, keep=0.99):
    def reduce(A):
        A = A - A.mean(0)
        U, s, _ = np.linalg.svd(A, full_matrices=False)
        r = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), keep) + 1)
        return U[:, :r] * s[:r]

    A, B = reduce(X), reduce(Y)
    Saa, Sbb, Sab = A.T @ A, B.T @ B, A.T @ B

    def inv_sqrt(S):
        w, V = np.linalg.eigh(S)
        return V @ np.diag(w**-0.5) @ V.T

    rho = np.linalg.svd(inv_sqrt(Saa) @ Sab @ inv_sqrt(Sbb), compute_uv=False)
    return float(np.mean(np.clip(rho, 0, 1)))


# ------------------------------------------------------------------ fixtures


def related(n=300, dx=48, dy=24, noise=1.0, seed=0):
    """Y = X W + noise: clearly related views of different widths (and an offset, to test centring)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, dx)) @ np.diag(np.linspace(2.0, 0.3, dx)) + 0.5
    Y = X @ rng.standard_normal((dx, dy)) + noise * rng.standard_normal((n, dy))
    return X, Y


def orthogonal(d, seed=1):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


NAIVE = {
    "mutual_knn": lambda X, Y: naive_mutual_knn(X, Y, 10),
    "linear_cka": naive_linear_cka,
    "rbf_cka": naive_rbf_cka,
    "unbiased_cka": naive_unbiased_cka,
    "cknna": lambda X, Y: naive_cknna(X, Y, 10),
    "svcca": naive_svcca,
}


# ------------------------------------------------------------------ agreement with naive versions


@pytest.mark.parametrize("name", list(NAIVE))
@pytest.mark.parametrize("noise", [0.5, 3.0])
def test_matches_naive(name, noise):
    X, Y = related(noise=noise)
    got, want = M.METRICS[name](X, Y), NAIVE[name](X, Y)
    assert got == pytest.approx(want, abs=1e-5), (got, want)


def test_svcca_component_count_and_wide_views():
    X, Y = related(n=60, dx=80, dy=30)  # d_x > n exercises the sample-space branch
    assert M.svcca(X, Y) == pytest.approx(naive_svcca(X, Y), abs=1e-5)
    assert M.linear_cka(X, Y) == pytest.approx(naive_linear_cka(X, Y), abs=1e-5)
    assert M.unbiased_cka(X, Y) == pytest.approx(naive_unbiased_cka(X, Y), abs=1e-5)
    X, Y = related()
    ux, sx, _ = np.linalg.svd(X - X.mean(0), full_matrices=False)
    uy, sy, _ = np.linalg.svd(Y - Y.mean(0), full_matrices=False)
    rho = np.linalg.svd(ux[:, :5].T @ uy[:, :5], compute_uv=False)
    assert M.svcca(X, Y, keep=5) == pytest.approx(rho.mean(), abs=1e-8)


def test_registry_and_score_all():
    assert list(M.METRICS) == ["mutual_knn", "linear_cka", "rbf_cka", "unbiased_cka", "cknna", "svcca"]
    X, Y = related()
    scores = M.score_all(X, Y, options={"svcca": {"keep": 0.9}})
    assert scores["mutual_knn"] == M.mutual_knn(X, Y)
    assert scores["svcca"] == M.svcca(X, Y, keep=0.9)
    assert scores["rbf_cka"] == pytest.approx(naive_rbf_cka(X, Y), abs=1e-5)
    some = M.score_all(X, Y, ["cknna"], k="rice", calibrate=True, n_perm=3)
    assert set(some) == {"cknna"} and some["cknna"].raw == M.cknna(X, Y, k="rice")
    with pytest.raises(ValueError, match="unknown metric 'cka'"):
        M.score_all(X, Y, ["cka"])


# ------------------------------------------------------------------ invariances


@pytest.mark.parametrize("name", ["linear_cka", "rbf_cka", "unbiased_cka"])
def test_cka_invariant_to_rotation_and_scaling(name):
    X, Y = related()
    fn = M.METRICS[name]
    base = fn(X, Y)
    tol = 1e-7 if name == "rbf_cka" else 1e-10  # rbf: bandwidth median is taken in float32
    assert fn(X @ orthogonal(X.shape[1]), Y) == pytest.approx(base, abs=tol)
    assert fn(X, 7.3 * Y @ orthogonal(Y.shape[1], seed=2)) == pytest.approx(base, abs=tol)
    assert fn(0.01 * X, Y) == pytest.approx(base, abs=tol)


def test_identical_views_score_one():
    X, _ = related()
    Xr = X @ orthogonal(X.shape[1])
    for k in (10, "rice"):
        assert M.mutual_knn(X, X, k=k) == 1.0
    # cosine kNN needs the rotation about the origin: rotate raw X, not a centred copy
    assert M.mutual_knn(X, Xr) == 1.0
    assert M.cknna(X, Xr) == pytest.approx(1.0, abs=1e-6)
    for name in ("linear_cka", "rbf_cka", "unbiased_cka", "svcca"):
        assert M.METRICS[name](X, Xr) == pytest.approx(1.0, abs=1e-8), name


def test_disjoint_neighbourhoods_score_zero():
    # 12 points on a circle; Y places item i at angle 5i, so X's neighbours i+-1 become Y's i+-5
    ang = 2 * np.pi * np.arange(12) / 12
    X = np.stack([np.cos(ang), np.sin(ang)], 1)
    Y = X[(5 * np.arange(12)) % 12]
    assert M.mutual_knn(X, Y, k=2) == 0.0
    assert M.cknna(X, Y, k=2) == 0.0
    assert M.cknna(X, X, k=2) == pytest.approx(1.0)


def test_rice_k():
    # ceil(2 n^(1/3)); 27 and 1000 are perfect cubes where float cube roots round the wrong way
    assert [M.rice_k(n) for n in (1, 8, 27, 100, 1000, 5000, 80000)] == [2, 4, 6, 10, 20, 35, 87]
    X, Y = related(n=100)
    assert M.mutual_knn(X, Y, k="rice") == M.mutual_knn(X, Y, k=10)


# ------------------------------------------------------------------ chunking


def test_chunked_equals_unchunked():
    X, Y = related(n=211)
    knn = M.mutual_knn
    assert knn(X, Y, chunk_size=7) == knn(X, Y, chunk_size=None) == knn(X, Y, chunk_size=10_000)
    # Same neighbour sets; the float32 cosine values may differ in the last bits with the block shape.
    assert M.cknna(X, Y, chunk_size=7) == pytest.approx(M.cknna(X, Y), abs=1e-7)
    assert M.rbf_cka(X, Y, chunk_size=7) == pytest.approx(M.rbf_cka(X, Y), abs=1e-12)


def test_median_subsample_for_large_n(monkeypatch):
    X, Y = related(n=120)
    exact = M.rbf_cka(X, Y)
    monkeypatch.setattr(M, "_MEDIAN_MAX_ROWS", 100)
    approx = M.rbf_cka(X, Y)
    assert approx != exact and approx == pytest.approx(exact, abs=0.02)


# ------------------------------------------------------------------ calibration


@pytest.mark.parametrize("name", list(M.METRICS))
def test_calibrated_scores_near_zero_when_unrelated_and_positive_when_related(name):
    rng = np.random.default_rng(3)
    X, Y = rng.standard_normal((300, 48)), rng.standard_normal((300, 24))
    null = M.calibrate(name, X, Y, n_perm=20, seed=0)
    # Unrelated views are exchangeable with their shuffles, so raw - null_mean has mean 0 and standard
    # deviation null_std * sqrt(1 + 1/n_perm); 4 of those is a < 1e-4 false-alarm bound (Gaussian)
    # that also stays small in absolute terms (checked: below 0.05 for every metric here).
    tol = 4 * null.null_std * math.sqrt(1 + 1 / 20)
    assert abs(null.calibrated) < tol and tol < 0.05, (null, tol)
    assert null.raw > 0.01 if name in ("svcca", "mutual_knn", "linear_cka") else True  # raw is biased
    Xr, Yr = related(noise=3.0)
    rel = M.calibrate(name, Xr, Yr, n_perm=8, seed=0)
    assert rel.calibrated > 10 * tol and rel.calibrated > 0.05, rel
    z = M.calibrate(name, Xr, Yr, n_perm=8, seed=0, mode="z")
    assert z.calibrated > 10 and z.raw == rel.raw and z.null == rel.null  # same seed, same shuffles


def test_calibrate_custom_metric_and_options():
    X, Y = related()
    res = M.calibrate(M.mutual_knn, X, Y, n_perm=4, seed=5, k=5)
    assert res.raw == M.mutual_knn(X, Y, k=5) and len(res.null) == 4
    assert res.calibrated == pytest.approx(res.raw - res.null_mean)
    with pytest.raises(ValueError, match="mode"):
        M.calibrate(M.linear_cka, X, Y, mode="ratio")
    with pytest.raises(ValueError, match="n_perm"):
        M.calibrate(M.linear_cka, X, Y, n_perm=1, mode="z")


# ------------------------------------------------------------------ input handling


def test_accepts_torch_and_fp16():
    X, Y = related()
    ref = M.linear_cka(X, Y)
    assert M.linear_cka(torch.from_numpy(X), torch.from_numpy(Y)) == pytest.approx(ref, abs=1e-12)
    half = M.linear_cka(X.astype(np.float16), torch.from_numpy(Y).half())
    assert half == pytest.approx(ref, abs=1e-3)
    assert M.mutual_knn(torch.from_numpy(X).bfloat16(), Y.astype(np.float16)) > 0.05
    Xc = X.copy()
    M.rbf_cka(Xc, Y)
    assert np.array_equal(Xc, X)  # inputs are never modified in place


@pytest.mark.parametrize("name", list(M.METRICS))
def test_bad_input_errors(name):
    fn = M.METRICS[name]
    X, Y = related(n=50)
    with pytest.raises(ValueError, match=r"X has shape \(50, 48\) and Y has shape \(49, 24\)"):
        fn(X, Y[:49])
    Xb = X.copy()
    Xb[[3, 7, 7], [0, 1, 2]] = [np.nan, np.inf, -np.inf]
    with pytest.raises(ValueError, match="X has 2 of 50 rows containing NaN or Inf .first: row 3"):
        fn(Xb, Y)
    with pytest.raises(ValueError, match="2-D"):
        fn(X[:, 0], Y)
    with pytest.raises(M.MetricInputError):  # also a unialign DataError, for the CLI
        if name in ("mutual_knn", "cknna"):
            fn(X[:5], Y[:5])  # fewer than k + 1 rows
        else:
            fn(X, np.ones_like(Y))  # constant view: nothing to compare


def test_knn_row_and_k_errors():
    X, Y = related(n=10)
    with pytest.raises(ValueError, match="k=10 needs at least 11 rows, got 10"):
        M.mutual_knn(X, Y)
    with pytest.raises(ValueError, match="k=10 needs at least 11 rows"):
        M.cknna(X, Y)
    for bad in (0, -1, 2.5, "sqrt", True):
        with pytest.raises(ValueError, match="k must be"):
            M.mutual_knn(X, Y, k=bad)
    with pytest.raises(ValueError, match="keep"):
        M.svcca(X, Y, keep=1.5)
    with pytest.raises(ValueError, match="sigma must be positive"):
        M.rbf_cka(X, Y, sigma=-1.0)
    assert M.rbf_cka(X, Y, sigma=(3.0, 10.0)) != M.rbf_cka(X, Y, sigma=3.0)
    with pytest.raises(ValueError, match="unbiased_cka needs at least 4 rows"):
        M.unbiased_cka(X[:3], Y[:3])
    assert M.mutual_knn(X, Y, k=9) == pytest.approx(1.0)  # k = n - 1: every row is every row's neighbour
