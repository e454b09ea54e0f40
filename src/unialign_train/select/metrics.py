"""Representation-similarity scores for choosing which (image encoder, text encoder, layer) pair to align.

Every metric takes two row-paired feature matrices ``X`` (n, d_x) and ``Y`` (n, d_y) -- row i of both
describes the same image/caption pair -- and returns one float, higher meaning "more alike geometry".
Definitions follow REFERENCE.md section 4 (Platonic Representation Hypothesis code, CKA literature).

Why the implementation looks the way it does:

* Inputs may be numpy arrays or torch tensors of any float dtype (fp16 feature caches included); they are
  cast to float64 once, because CKA-type scores are ratios of sums over n^2 terms where fp16/fp32
  accumulation visibly moves the third decimal.
* Anything that would need an n x n matrix (kNN search, RBF kernels) is computed in row blocks, so
  n = 50k never holds more than ``block`` x n numbers at once. Linear CKA, unbiased CKA and SVCCA work
  in feature space (d x d) when d < n, which is what makes n = 5000 cheap.
* Raw scores rise with width and depth alone, so comparing encoders of different sizes needs
  :func:`calibrate` (permutation null: the same metric on deliberately mismatched pairs).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence, Union

import numpy as np
import torch

from unialign.errors import ConfigError, DataError

__all__ = [
    "METRICS",
    "CalibratedScore",
    "MetricInputError",
    "MetricOptionError",
    "calibrate",
    "cknna",
    "linear_cka",
    "mutual_knn",
    "rbf_cka",
    "rice_k",
    "score_all",
    "svcca",
    "unbiased_cka",
]

ArrayLike = Union[np.ndarray, torch.Tensor]
KSpec = Union[int, Literal["rice"]]
MetricFn = Callable[..., float]

#: Numbers per n x n block (64 MiB in float32): bounds memory for kNN and RBF at any n.
_BLOCK_ELEMS = 1 << 24
#: Above this many rows the RBF median heuristic uses a fixed random subset of this many rows, because
#: an exact median needs all n(n-1)/2 distances in memory (8192 rows -> 33.5M floats, 134 MB).
_MEDIAN_MAX_ROWS = 8192


class MetricInputError(DataError, ValueError):
    """Feature matrices that cannot be scored (shape, pairing, NaN/Inf, too few rows, constant)."""


class MetricOptionError(ConfigError, ValueError):
    """An invalid metric option (k, keep, mode, metric name); the message lists what is accepted."""


# ----------------------------------------------------------------------------------------- helpers


def rice_k(n: int) -> int:
    """Rice-rule neighbourhood size ``ceil(2 * n ** (1/3))``, computed exactly (STRUCTURE's default).

    Integer arithmetic (smallest k with k^3 >= 8n) avoids float cube roots such as 27 ** (1/3) =
    3.0000000000000004, which would turn the exact answer 6 into 7.
    """
    if n < 1:
        raise MetricOptionError(f"rice_k needs n >= 1, got {n}")
    k = max(1, math.ceil(2 * n ** (1 / 3)))
    while (k - 1) ** 3 >= 8 * n:
        k -= 1
    while k**3 < 8 * n:
        k += 1
    return k


def _resolve_k(k: KSpec, n: int) -> int:
    if k == "rice":
        return rice_k(n)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise MetricOptionError(f"k must be a positive integer or 'rice', got {k!r}")
    return int(k)


def _as_matrix(A: ArrayLike, name: str) -> torch.Tensor:
    """Return ``A`` as a 2-D float64 tensor (no copy when it already is one; never modified in place)."""
    t = A.detach() if isinstance(A, torch.Tensor) else torch.as_tensor(np.asarray(A))
    if t.ndim != 2:
        raise MetricInputError(
            f"{name} must be a 2-D (n_samples, n_features) array, got shape {tuple(t.shape)}"
        )
    if t.is_complex() or t.dtype == torch.bool:
        raise MetricInputError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.device.type == "mps":  # no float64 on Apple GPUs
        t = t.cpu()
    return t.to(torch.float64)


def _check_finite(t: torch.Tensor, name: str) -> None:
    bad = ~torch.isfinite(t).all(dim=1)
    n_bad = int(bad.sum())
    if n_bad:
        first = int(bad.nonzero()[0, 0])
        raise MetricInputError(
            f"{name} has {n_bad} of {t.shape[0]} rows containing NaN or Inf (first: row {first}); "
            "drop or impute those rows in both views before scoring"
        )


def _pair(X: ArrayLike, Y: ArrayLike, min_rows: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a row-paired (X, Y) and return both as float64 tensors on X's device."""
    Xt, Yt = _as_matrix(X, "X"), _as_matrix(Y, "Y")
    if Xt.shape[0] != Yt.shape[0]:
        raise MetricInputError(
            "X and Y must describe the same samples row for row, but X has shape "
            f"{tuple(Xt.shape)} and Y has shape {tuple(Yt.shape)}"
        )
    if Xt.shape[1] == 0 or Yt.shape[1] == 0:
        raise MetricInputError(f"features must be non-empty: X {tuple(Xt.shape)}, Y {tuple(Yt.shape)}")
    if Xt.shape[0] < min_rows:
        raise MetricInputError(f"{what} needs at least {min_rows} rows, got {Xt.shape[0]}")
    _check_finite(Xt, "X")
    _check_finite(Yt, "Y")
    return Xt, Yt.to(Xt.device)


def _block_rows(n: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or int(chunk_size) < 1:
            raise MetricOptionError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        return int(chunk_size)
    return max(1, _BLOCK_ELEMS // max(n, 1))


def _unit_rows(X: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(X, dim=1)


def _knn(Xn: torch.Tensor, k: int, chunk_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (n, k) and cosine values (n, k, float64) of each row's k nearest other rows.

    Similarities are computed in float32 blocks: ranking only needs to separate neighbours, and fp32
    rounding (~1e-7) flips a rank only between near-ties, which moves scores by O(1/(n k)); it halves
    the dominant n^2 d cost compared with float64.
    """
    n = Xn.shape[0]
    A = Xn.to(torch.float32)
    step = _block_rows(n, chunk_size)
    idx = torch.empty(n, k, dtype=torch.long, device=A.device)
    val = torch.empty(n, k, dtype=torch.float32, device=A.device)
    for s in range(0, n, step):
        e = min(s + step, n)
        S = A[s:e] @ A.T
        r = torch.arange(e - s, device=A.device)
        S[r, r + s] = -math.inf  # a point is not its own neighbour
        top = S.topk(k, dim=1)
        idx[s:e], val[s:e] = top.indices, top.values
    return idx, val.to(torch.float64)


def _centre(X: torch.Tensor) -> torch.Tensor:
    return X - X.mean(dim=0, keepdim=True)


def _fro2_cross(X: torch.Tensor, Y: torch.Tensor) -> float:
    """``||Y^T X||_F^2 = <X X^T, Y Y^T>_F`` via whichever side is cheaper (feature space when d < n)."""
    n, dx = X.shape
    dy = Y.shape[1]
    if dx * dy <= n * (dx + dy):
        return float((Y.T @ X).square().sum())
    Kx = X @ X.T
    return float(Kx.square().sum()) if X is Y else float((Kx * (Y @ Y.T)).sum())


def _cka_ratio(hxy: float, hxx: float, hyy: float, what: str) -> float:
    for h, name in ((hxx, "X"), (hyy, "Y")):
        if not h > 0:
            raise MetricInputError(
                f"{what} is undefined: {name} has no variance left to compare (constant rows or all "
                "rows identical after centring)"
            )
    return hxy / math.sqrt(hxx * hyy)


# ----------------------------------------------------------------------------------------- metrics


def mutual_knn(X: ArrayLike, Y: ArrayLike, k: KSpec = 10, *, chunk_size: int | None = None) -> float:
    """Mean fraction of each sample's k nearest neighbours (cosine, self excluded) shared by both views.

    ``mean_i |N_X(i) & N_Y(i)| / k`` as in the Platonic Representation Hypothesis code; ``k="rice"``
    gives STRUCTURE's ``ceil(2 n^(1/3))``. Independent views score about k/(n-1), not 0; use
    :func:`calibrate` to compare encoders. ``chunk_size`` (rows per similarity block) only trades
    memory for speed; the result is identical. All-zero rows have no direction (cosine 0 to all).
    """
    Xt, Yt = _pair(X, Y, 2, "mutual_knn")
    n = Xt.shape[0]
    kk = _resolve_k(k, n)
    if n < kk + 1:
        raise MetricInputError(f"mutual_knn with k={kk} needs at least {kk + 1} rows, got {n}")
    ix, _ = _knn(_unit_rows(Xt), kk, chunk_size)
    iy, _ = _knn(_unit_rows(Yt), kk, chunk_size)
    rows = torch.arange(n, device=ix.device).unsqueeze(1) * n
    shared = torch.isin(rows + ix, rows + iy)  # pair keys i*n+j are unique per (i, j)
    return float(shared.sum()) / (n * kk)


def linear_cka(X: ArrayLike, Y: ArrayLike) -> float:
    """Linear CKA ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on column-centred X, Y.

    Equal to the biased-HSIC CKA with linear kernels (the Freeze-Align selection score) but computed
    on d x d cross-covariances when d < n, so n never enters quadratically. Invariant to orthogonal
    transforms and isotropic scaling of either view.
    """
    Xt, Yt = _pair(X, Y, 2, "linear_cka")
    Xc, Yc = _centre(Xt), _centre(Yt)
    return _cka_ratio(_fro2_cross(Xc, Yc), _fro2_cross(Xc, Xc), _fro2_cross(Yc, Yc), "linear_cka")


def _sq_dist_block(Xc: torch.Tensor, sq: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """Rows s:e of the squared-distance matrix, ||x_i||^2 + ||x_j||^2 - 2 x_i.x_j (one fused GEMM)."""
    D = torch.addmm(sq[None, :], Xc[s:e], Xc.T, alpha=-2.0).add_(sq[s:e, None]).clamp_(min=0.0)
    r = torch.arange(e - s, device=D.device)
    D[r, r + s] = 0.0
    return D


def _median_sq_dist(Xc: torch.Tensor, chunk_size: int | None) -> float:
    """Median over pairs i < j of ``||x_i - x_j||^2`` (numpy convention: mean of the two middle values).

    Exact up to ``_MEDIAN_MAX_ROWS`` rows; beyond that, over a fixed (seed 0) random subset of that many
    rows -- a heuristic bandwidth does not need more, and the exact median would need n^2/2 numbers.
    Distances are formed in float32 (half the cost): a bandwidth off by 1e-7 relative is immaterial.
    """
    n = Xc.shape[0]
    if n > _MEDIAN_MAX_ROWS:
        g = torch.Generator().manual_seed(0)
        Xc = Xc[torch.randperm(n, generator=g)[:_MEDIAN_MAX_ROWS].to(Xc.device)]
        n = Xc.shape[0]
    Xc = Xc.to(torch.float32)
    sq = Xc.square().sum(dim=1)
    step = _block_rows(n, chunk_size)
    parts = []
    for s in range(0, n, step):
        e = min(s + step, n)
        D = _sq_dist_block(Xc, sq, s, e)
        upper = torch.arange(n, device=D.device)[None, :] > torch.arange(s, e, device=D.device)[:, None]
        parts.append(D[upper].cpu().numpy())
    return float(np.median(np.concatenate(parts)))


def rbf_cka(
    X: ArrayLike,
    Y: ArrayLike,
    sigma: float | tuple[float, float] | None = None,
    *,
    chunk_size: int | None = None,
) -> float:
    """CKA with Gaussian kernels ``exp(-||x_i - x_j||^2 / (2 sigma^2))`` and biased (centred) HSIC.

    ``sigma=None`` uses the median heuristic per view, ``sigma = sqrt(median_{i<j} ||x_i - x_j||^2)``,
    which makes the score invariant to isotropic rescaling of either view (a fixed sigma is not);
    a float applies to both views, a pair gives (sigma_X, sigma_Y). The centred HSIC
    ``tr(K H L H) = sum(K*L) - 2/n (K1).(L1) + (1'K1)(1'L1)/n^2`` is accumulated over row blocks, so no
    n x n kernel is ever held.
    """
    Xt, Yt = _pair(X, Y, 2, "rbf_cka")
    Xc, Yc = _centre(Xt), _centre(Yt)  # distances are translation-invariant; centring limits cancellation
    if sigma is None:
        sx2, sy2 = _median_sq_dist(Xc, chunk_size), _median_sq_dist(Yc, chunk_size)
    else:
        sx, sy = (sigma, sigma) if isinstance(sigma, (int, float)) else sigma
        if not (0 < float(sx) < math.inf and 0 < float(sy) < math.inf):
            raise MetricOptionError(f"sigma must be positive and finite, got {sigma!r}")
        sx2, sy2 = float(sx) ** 2, float(sy) ** 2
    for s2, name in ((sx2, "X"), (sy2, "Y")):
        if not s2 > 0:
            raise MetricInputError(
                f"rbf_cka: median pairwise distance of {name} is 0 (most rows identical); "
                "the median-heuristic bandwidth is undefined -- pass sigma explicitly"
            )
    n = Xc.shape[0]
    qx, qy = Xc.square().sum(dim=1), Yc.square().sum(dim=1)
    rk = torch.zeros(n, dtype=torch.float64, device=Xc.device)
    rl = torch.zeros_like(rk)
    kl = kk = ll = 0.0
    step = _block_rows(n, chunk_size)
    for s in range(0, n, step):
        e = min(s + step, n)
        K = _sq_dist_block(Xc, qx, s, e).mul_(-0.5 / sx2).exp_()
        L = _sq_dist_block(Yc, qy, s, e).mul_(-0.5 / sy2).exp_()
        rk[s:e], rl[s:e] = K.sum(dim=1), L.sum(dim=1)
        k1, l1 = K.view(-1), L.view(-1)
        kl, kk, ll = kl + float(k1 @ l1), kk + float(k1 @ k1), ll + float(l1 @ l1)

    def hsic(a: float, ra: torch.Tensor, rb: torch.Tensor) -> float:
        return a - 2.0 / n * float(ra @ rb) + float(ra.sum()) * float(rb.sum()) / n**2

    return _cka_ratio(hsic(kl, rk, rl), hsic(kk, rk, rk), hsic(ll, rl, rl), "rbf_cka")


def _linear_hsic_u(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Unbiased HSIC (Song et al. 2012, eq. 5) for linear kernels K = X X^T, L = Y Y^T, in O(n d^2).

    With K~ = K - diag(K): tr(K~ L~) = ||Y^T X||^2 - sum_i K_ii L_ii; 1'K~1 = ||X^T 1||^2 - tr K;
    K~1 = X (X^T 1) - diag K.
    """
    n = X.shape[0]
    kd, ld = X.square().sum(dim=1), Y.square().sum(dim=1)
    kr = X @ X.sum(dim=0) - kd
    lr = Y @ Y.sum(dim=0) - ld
    trace = _fro2_cross(X, Y) - float(kd @ ld)
    return (
        trace + float(kr.sum()) * float(lr.sum()) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(kr @ lr)
    ) / (n * (n - 3))


def unbiased_cka(X: ArrayLike, Y: ArrayLike) -> float:
    """Linear CKA with the unbiased HSIC estimator of Song et al. (2012), as PRH's ``unbiased_cka``.

    The biased estimator's bias grows with d/n, inflating scores of wide encoders on small samples;
    the unbiased one removes it (and can be slightly negative for unrelated views). Computed in
    feature space; translation-invariant, so centring first only improves rounding. Needs n >= 4.
    """
    Xt, Yt = _pair(X, Y, 4, "unbiased_cka")
    Xc, Yc = _centre(Xt), _centre(Yt)
    return _cka_ratio(_linear_hsic_u(Xc, Yc), _linear_hsic_u(Xc, Xc), _linear_hsic_u(Yc, Yc), "unbiased_cka")


def _masked_hsic_u(rows: torch.Tensor, cols: torch.Tensor, a: torch.Tensor, b: torch.Tensor, n: int) -> float:
    """Unbiased HSIC of the sparse matrices K~ (values ``a``) and L~ (values ``b``) on entries (rows, cols).

    Same formula as PRH's ``hsic_unbiased(mask*K, mask*L)`` but touching only the O(n k) masked entries:
    sum(K~ * L~^T) needs, for each entry (i, j), the entry (j, i) if it is in the mask too.
    """
    if rows.numel() == 0:  # no mutual neighbours at all: both masked kernels are zero
        return 0.0
    keys = rows * n + cols
    order = keys.argsort()
    keys, sb = keys[order], b[order]
    tkeys = cols * n + rows
    pos = torch.searchsorted(keys, tkeys).clamp_(max=keys.numel() - 1)
    hit = keys[pos] == tkeys
    trace = float((a[hit] * sb[pos[hit]]).sum())
    col_k = torch.zeros(n, dtype=torch.float64, device=a.device).index_add_(0, cols, a)
    row_l = torch.zeros(n, dtype=torch.float64, device=a.device).index_add_(0, rows, b)
    return (
        trace + float(a.sum()) * float(b.sum()) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(col_k @ row_l)
    ) / (n * (n - 3))


def cknna(X: ArrayLike, Y: ArrayLike, k: KSpec = 10, *, chunk_size: int | None = None) -> float:
    """CKNNA: kernel alignment restricted to mutual nearest neighbours (PRH ``cknna``, unbiased=True).

    Follows the reference code exactly, except for its ``+1e-6`` in the denominator (dropped: it biases
    small scores by ~1e-3 relative): rows are L2-normalised, K = X X^T, L = Y Y^T (cosines);
    M_KL = entries (i, j), j != i, that are among i's k nearest in *both* views, M_K / M_L those of one
    view; ``score = HSIC_u(M_KL*K, M_KL*L) / sqrt(HSIC_u(M_K*K, M_K*K) HSIC_u(M_L*L, M_L*L))`` with
    Song et al.'s unbiased HSIC. Only the n k masked entries are ever formed. Needs k >= 2; returns
    NaN if a self-term is not positive (possible for the unbiased estimator at tiny n).
    """
    Xt, Yt = _pair(X, Y, 4, "cknna")
    n = Xt.shape[0]
    kk = _resolve_k(k, n)
    if kk < 2:
        raise MetricOptionError(f"cknna needs k >= 2, got {kk}")
    if n < kk + 1:
        raise MetricInputError(f"cknna with k={kk} needs at least {kk + 1} rows, got {n}")
    ix, vx = _knn(_unit_rows(Xt), kk, chunk_size)
    iy, vy = _knn(_unit_rows(Yt), kk, chunk_size)
    rows = torch.arange(n, device=ix.device).repeat_interleave(kk)
    kx, ky = rows * n + ix.reshape(-1), rows * n + iy.reshape(-1)
    vx, vy = vx.reshape(-1), vy.reshape(-1)
    order = ky.argsort()
    ky_sorted, vy_sorted = ky[order], vy[order]
    pos = torch.searchsorted(ky_sorted, kx).clamp_(max=kx.numel() - 1)
    both = ky_sorted[pos] == kx
    j_x, j_y = ix.reshape(-1), iy.reshape(-1)
    h_kl = _masked_hsic_u(rows[both], j_x[both], vx[both], vy_sorted[pos[both]], n)
    h_kk = _masked_hsic_u(rows, j_x, vx, vx, n)
    h_ll = _masked_hsic_u(rows, j_y, vy, vy, n)
    if not (h_kk > 0 and h_ll > 0):
        return math.nan
    return h_kl / math.sqrt(h_kk * h_ll)


def _eigh_desc(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of a symmetric matrix, largest first. torch's LAPACK rather than scipy's: mixing the
    two thread pools made scipy's eigh several times slower right after torch GEMMs."""
    lam, V = torch.linalg.eigh(A)
    return lam.flip(0).clamp(min=0.0), V.flip(1)


def _whitening_map(Xc: torch.Tensor, keep: float | int) -> torch.Tensor:
    """W (d, r) such that ``Xc @ W`` is an orthonormal basis of Xc's top-r principal directions.

    This is SVCCA's SVD step done through the eigendecomposition of the smaller of X^T X and X X^T
    (an SVD of the n x d matrix is ~3x slower at n=5000, d=1280); the kept components carry most of
    the variance, so squaring their condition number loses nothing that matters in float64.
    """
    n, d = Xc.shape
    lam, V = _eigh_desc(Xc.T @ Xc if d <= n else Xc @ Xc.T)
    rank = int((lam > lam[0] * max(n, d) * torch.finfo(torch.float64).eps).sum())
    if rank == 0:
        raise MetricInputError("svcca: a view is constant across rows (no variance to compare)")
    if isinstance(keep, (int, np.integer)):
        r = min(int(keep), rank)
    else:
        frac = torch.cumsum(lam[:rank], 0) / lam[:rank].sum()
        r = min(int((frac < float(keep) - 1e-12).sum()) + 1, rank)
    lam, V = lam[:r], V[:, :r]
    # d > n: V holds left singular vectors U; X^T U / lam maps X onto them (X X^T U = U lam).
    return V / lam.sqrt() if d <= n else (Xc.T @ V) / lam


def svcca(X: ArrayLike, Y: ArrayLike, keep: float | int = 0.99) -> float:
    """SVCCA (Raghu et al. 2017): per view keep the top principal components, then mean CCA correlation.

    ``keep`` as a float in (0, 1] keeps the fewest components explaining that fraction of variance;
    as an int, that many components. Canonical correlations of the reduced views are the singular
    values of U_X^T U_Y (orthonormal bases), averaged over min(r_X, r_Y). Beware: when r_X + r_Y
    approaches n, CCA fits noise and every score tends to 1 -- :func:`calibrate` exposes this.
    (PRH's ``svcca`` instead standardises features and keeps a fixed 10 components.)
    """
    if isinstance(keep, bool) or not (
        (isinstance(keep, (int, np.integer)) and keep >= 1) or (isinstance(keep, float) and 0 < keep <= 1)
    ):
        raise MetricOptionError(
            f"keep must be a variance fraction in (0, 1] or a positive number of components, got {keep!r}"
        )
    Xt, Yt = _pair(X, Y, 2, "svcca")
    Xc, Yc = _centre(Xt), _centre(Yt)
    Wx, Wy = _whitening_map(Xc, keep), _whitening_map(Yc, keep)
    n, (dx, rx), (dy, ry) = Xc.shape[0], Wx.shape, Wy.shape
    via_cross_cov = n * dx * dy + rx * dy * (dx + ry)  # multiply-adds of the two equivalent routes
    via_bases = n * (dx * rx + dy * ry + rx * ry)
    if via_cross_cov <= via_bases:
        M = (Wx.T @ (Xc.T @ Yc)) @ Wy
    else:
        M = (Xc @ Wx).T @ (Yc @ Wy)
    return float(torch.linalg.svdvals(M).clamp(0.0, 1.0).mean())


# ------------------------------------------------------------------------------------- calibration

METRICS: dict[str, MetricFn] = {
    "mutual_knn": mutual_knn,
    "linear_cka": linear_cka,
    "rbf_cka": rbf_cka,
    "unbiased_cka": unbiased_cka,
    "cknna": cknna,
    "svcca": svcca,
}


#: Metrics that later stages add to ``unialign select`` (the alignment probe of the align stage).
EXTRA_METRICS: dict[str, MetricFn] = {}


def register_metric(name: str, fn: MetricFn) -> None:
    """Offer ``fn(X, Y, **kw) -> float`` to :func:`unialign_train.select.select` under ``name``."""
    EXTRA_METRICS[name] = fn


@dataclass(frozen=True)
class CalibratedScore:
    """A metric's raw score next to its permutation null.

    ``calibrated`` is ``raw - null_mean`` (mode "diff") or ``(raw - null_mean) / null_std`` (mode "z");
    ``null`` holds the individual shuffled-pair scores.
    """

    raw: float
    null_mean: float
    null_std: float
    calibrated: float
    mode: str
    null: tuple[float, ...]


def _lookup(metric: MetricFn | str) -> MetricFn:
    if isinstance(metric, str):
        if metric not in METRICS:
            raise MetricOptionError(f"unknown metric {metric!r}; choose from {sorted(METRICS)}")
        return METRICS[metric]
    return metric


def calibrate(
    metric_fn: MetricFn | str,
    X: ArrayLike,
    Y: ArrayLike,
    n_perm: int = 10,
    seed: int = 0,
    mode: Literal["diff", "z"] = "diff",
    **metric_kwargs: Any,
) -> CalibratedScore:
    """Score (X, Y) against a permutation null: the same metric with the rows of Y shuffled.

    Shuffling keeps each view's own geometry (width, depth, anisotropy -- what inflates raw CKA and
    mutual-kNN scores) but destroys the pairing, so ``raw - null_mean`` is ~0 for unrelated views and
    comparable across encoders of different sizes. Mode "z" divides by the null's standard deviation
    (ddof=1, needs n_perm >= 2). ``metric_fn`` is a callable ``f(X, Y, **metric_kwargs) -> float`` or a
    name in :data:`METRICS`. Deterministic for a given ``seed``.
    """
    fn = _lookup(metric_fn)
    if mode not in ("diff", "z"):
        raise MetricOptionError(f"mode must be 'diff' or 'z', got {mode!r}")
    least = 2 if mode == "z" else 1
    if isinstance(n_perm, bool) or n_perm < least:
        raise MetricOptionError(f"n_perm must be >= {least} for mode {mode!r}, got {n_perm}")
    Xt, Yt = _pair(X, Y, 2, "calibrate")
    raw = float(fn(Xt, Yt, **metric_kwargs))
    g = torch.Generator().manual_seed(seed)
    null = tuple(
        float(fn(Xt, Yt[torch.randperm(Yt.shape[0], generator=g).to(Yt.device)], **metric_kwargs))
        for _ in range(n_perm)
    )
    mean = float(np.mean(null))
    std = float(np.std(null, ddof=1)) if n_perm > 1 else 0.0
    if mode == "diff":
        value = raw - mean
    elif std > 0:
        value = (raw - mean) / std
    else:
        value = 0.0 if raw == mean else math.copysign(math.inf, raw - mean)
    return CalibratedScore(raw, mean, std, value, mode, null)


_calibrate = calibrate  # score_all's ``calibrate`` flag shadows the function inside it


def score_all(
    X: ArrayLike,
    Y: ArrayLike,
    metrics: Sequence[str] | None = None,
    *,
    calibrate: bool = False,
    n_perm: int = 10,
    seed: int = 0,
    mode: Literal["diff", "z"] = "diff",
    k: KSpec = 10,
    chunk_size: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, float] | dict[str, CalibratedScore]:
    """Run several metrics (default: all of :data:`METRICS`, in registry order) on one (X, Y) pair.

    ``k`` and ``chunk_size`` go to the metrics that take them; ``options`` adds per-metric keyword
    arguments, e.g. ``{"svcca": {"keep": 0.95}}``. Returns ``{name: float}``, or
    ``{name: CalibratedScore}`` with ``calibrate=True``. Inputs are validated and cast once.
    """
    names = list(METRICS) if metrics is None else list(metrics)
    fns = {name: _lookup(name) for name in names}
    unknown = set(options or {}) - set(names)
    if unknown:
        raise MetricOptionError(f"options given for metrics not being run: {sorted(unknown)}")
    Xt, Yt = _pair(X, Y, 2, "score_all")
    out: dict[str, Any] = {}
    for name, fn in fns.items():
        params = inspect.signature(fn).parameters
        kw: dict[str, Any] = {key: v for key, v in (("k", k), ("chunk_size", chunk_size)) if key in params}
        kw.update((options or {}).get(name, {}))
        if calibrate:
            out[name] = _calibrate(fn, Xt, Yt, n_perm=n_perm, seed=seed, mode=mode, **kw)
        else:
            out[name] = float(fn(Xt, Yt, **kw))
    return out
