"""Training-free and closed-form aligners (REFERENCE.md section 5), as scikit-learn-style estimators.

Each estimator fits on paired cached features (row i of ``x`` describes the same thing as row i of
``y``: an image and one of its captions, an audio clip and its word) and produces the two projection
modules of :mod:`unialign.projections` that map each modality into one shared space, so a fitted map
is saved, loaded and served exactly like a trained head. ``transform_x`` / ``transform_y`` run those
modules and L2-normalise, so a plain dot product is the cosine alignment score.

Why these exist next to trained heads: on the emoji benchmark (section 8) mean-centred ASIF beat every
trained head in under a second, and Procrustes / ridge least squares are the natural linear floors.

Conventions shared by every estimator (they keep results comparable across methods):
- inputs are L2-normalised per row, then centred by the fit-set mean of their modality (the same
  "normalise then centre" order as STRUCTURE), so an encoder's raw feature scale never matters;
- fitting runs in float64 for stable solves; transforms return float32;
- ``fit`` returns the estimator; its learned state is ``projections_`` (one module per side) and
  ``config()`` gives the constructor arguments, as scikit-learn's ``get_params``.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from unialign.errors import ConfigError, DataError, UnialignError
from unialign.projections import AnchorMap, Chain, LinearMap

__all__ = [
    "ASIF",
    "CCA",
    "CLOSED_FORM",
    "CSA",
    "ClosedFormAligner",
    "ClosedFormConfigError",
    "ClosedFormInputError",
    "LeastSquares",
    "NotFittedError",
    "Procrustes",
    "RelativeRepresentation",
    "canonical_directions",
    "group_means",
    "make_closed_form",
    "nuisance_directions",
]

_EPS = 1e-12
T = TypeVar("T", bound="ClosedFormAligner")


class ClosedFormInputError(DataError, ValueError):
    """Bad features given to fit/transform; a ValueError so plain Python callers can catch it too."""


class ClosedFormConfigError(ConfigError, ValueError):
    """An invalid hyper-parameter or an unknown estimator name."""


class NotFittedError(UnialignError, RuntimeError):
    """transform_* called before fit."""


# ----------------------------------------------------------------------------------------- helpers
def _as_matrix(x: Any, what: str) -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor or nested list) as a finite float64 2-D array."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.element_size() < 4:  # bfloat16/half: numpy lacks bfloat16
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ClosedFormInputError(f"{what} must be a 2-D (rows, dim) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ClosedFormInputError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ClosedFormInputError(
            f"{what} has {rows.size} row(s) with NaN/inf values (first at row {int(rows[0])})"
        )
    return arr


def _l2n(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation; all-zero rows stay zero instead of becoming NaN."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def _check_pairs(img: np.ndarray, txt: np.ndarray) -> None:
    if img.shape[0] != txt.shape[0]:
        raise ClosedFormInputError(
            f"img and txt must have the same number of rows (pairs), got img {img.shape} and txt {txt.shape}"
        )
    if img.shape[0] < 2:
        raise ClosedFormInputError(f"need at least 2 pairs to fit, got {img.shape[0]}")


def _is_int(v: Any) -> bool:
    """An integral number (3, np.int64(3), 3.0), not a bool or a string: hyper-parameters from configs."""
    return (isinstance(v, (int, np.integer)) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _is_real(v: Any) -> bool:
    """A finite real number, not a bool or a string."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and bool(np.isfinite(v))


def _check_bool(v: Any, what: str) -> None:
    if not isinstance(v, (bool, np.bool_)):
        raise ClosedFormConfigError(f"{what} must be true or false, got {v!r}")


def _check_groups(groups: Any, n: int) -> np.ndarray | None:
    if groups is None:
        return None
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise ClosedFormInputError(f"groups must be one label per pair ({n}), got shape {g.shape}")
    return g


def nuisance_directions(xc: np.ndarray, groups: np.ndarray | None, rank: int) -> np.ndarray:
    """Top-``rank`` principal axes (d, r) of the *within-group* scatter of centred rows.

    Rows of one group share a description (the same concept in several styles, or images with the
    same caption), so how they differ (rendering style, colour, background) is exactly what the paired
    text cannot see. Removing these directions before comparing images is nuisance attribute
    projection (as in speaker verification). Only directions with non-zero within-group variance are
    returned, so ``r`` is 0 when no group has two members; then nothing is removed. At most half the
    dimensions go: a rank chosen for wide features (64 of 2,592) must not empty a narrow encoder's space,
    which would map every input to one point.
    """
    rank = min(rank, xc.shape[1] // 2)
    if rank <= 0 or groups is None:
        return np.zeros((xc.shape[1], 0))
    means, labels = group_means(xc, groups)
    resid = xc - means[np.searchsorted(labels, groups)]
    w, v = _scatter_axes(resid, top=rank)
    keep = w[:rank] > 1e-9 * max(float(np.einsum("ij,ij->", xc, xc)), _EPS)  # drop numerically-zero axes
    return v[:, :rank][:, keep]


def _reg_eye(c: np.ndarray, rel: float) -> np.ndarray:
    """``c + rel * mean(diag c) * I``: ridge scaled to the matrix's own trace, so ``rel`` is unitless."""
    d = c.shape[0]
    return c + (rel * max(float(np.trace(c)) / d, _EPS)) * np.eye(d)


def _inv_sqrt_psd(c: np.ndarray) -> np.ndarray:
    """Symmetric inverse square root of a (regularised, so positive definite) covariance."""
    w, v = np.linalg.eigh(c)
    return (v / np.sqrt(np.maximum(w, _EPS))) @ v.T


def _top_components(xc: np.ndarray, r: int) -> np.ndarray:
    """Top-``r`` principal axes (d, r) of centred rows, via the d x d scatter: cheaper than an SVD of
    the n x d data when n >> d, and float64 keeps the squared condition number harmless here."""
    return _scatter_axes(xc)[1][:, :r]


def _scatter_axes(x: np.ndarray, top: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns, same order) of the scatter ``x^T x``; only the
    ``top`` largest when given: LAPACK's selective solver (``evx``) skips the other eigenvectors, about 3x
    faster than the full solve for the 32 nuisance axes of a 2000-wide feature."""
    c = x.T @ x
    d = c.shape[0]
    if top is not None and 0 < top < d:
        from scipy.linalg import eigh

        w, v = eigh(c, subset_by_index=[d - top, d - 1], driver="evx")
    else:
        w, v = np.linalg.eigh(c)
    order = np.argsort(w)[::-1]
    return w[order], v[:, order]


def canonical_directions(xc: np.ndarray, yc: np.ndarray, reg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Regularised CCA of centred pairs: canonical directions ``a`` (d_x, c), ``b`` (d_y, c) and the
    canonical correlations ``rho`` (c, descending), from the SVD of ``Cxx^-1/2 Cxy Cyy^-1/2``.

    ``reg`` adds ``reg * mean variance`` to each covariance's diagonal (``_reg_eye``): with 0 the result
    is plain CCA, which needs more pairs than dimensions; with wide features and few pairs it needs
    some ridge, or every direction looks perfectly correlated on the fit set."""
    n = xc.shape[0]
    wx = _inv_sqrt_psd(_reg_eye(xc.T @ xc / (n - 1), reg))
    wy = _inv_sqrt_psd(_reg_eye(yc.T @ yc / (n - 1), reg))
    u, rho, vt = np.linalg.svd(wx @ (xc.T @ yc / (n - 1)) @ wy, full_matrices=False)
    return wx @ u, wy @ vt.T, rho


def unique_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct rows of ``a`` in first-seen order, each row's index among them): an image paired with
    several captions is one anchor, stored once. Rows are compared by their bytes, which is exact for the
    copies this finds and much faster than ``np.unique(axis=0)``'s field-by-field sort."""
    seen: dict[bytes, int] = {}
    inverse = np.fromiter((seen.setdefault(r.tobytes(), len(seen)) for r in np.ascontiguousarray(a)), np.int64, len(a))
    first = np.full(len(seen), -1, dtype=np.int64)
    first[inverse[::-1]] = np.arange(len(a) - 1, -1, -1)  # the lowest row index of each distinct row
    return a[first], inverse


def group_means(x: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean row of each group, the group labels in that order): concept prototypes, e.g. the mean of a
    concept's images across drawing styles, or of its captions."""
    labels, inv = np.unique(groups, return_inverse=True)
    inv = inv.reshape(-1)
    sums = np.zeros((len(labels), x.shape[1]))
    np.add.at(sums, inv, x)
    return sums / np.bincount(inv)[:, None], labels


# ------------------------------------------------------------------------------------- base class
class ClosedFormAligner(ABC):
    """Base class: paired features in, two projection modules into one shared space out.

    Subclasses implement ``_fit(xc, yc, groups)`` on normalised-and-centred float64 features and return
    the two modules (means ``mu_x``, ``mu_y`` are passed along to go into them); the base class owns
    input validation, centring, normalisation and the transforms.
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self.projections_: tuple[torch.nn.Module, torch.nn.Module] | None = None

    # -- public API -------------------------------------------------------------------------------
    def fit(self: T, x: Any, y: Any, groups: Any = None) -> T:
        """Fit on paired features ``x`` (n, d_x) and ``y`` (n, d_y); returns ``self``.

        ``groups`` (optional, n integers or strings) says which pairs share a description, e.g. the same
        concept drawn in several styles; estimators that model within-group variation use it, the
        others ignore it.
        """
        xn = _l2n(_as_matrix(x, "x"))
        yn = _l2n(_as_matrix(y, "y"))
        _check_pairs(xn, yn)
        g = _check_groups(groups, xn.shape[0])
        mu_x, mu_y = self._means(xn, yn)
        self.projections_ = self._fit(xn - mu_x, yn - mu_y, g, mu_x, mu_y)
        for m in self.projections_:
            m.eval()
        return self

    def transform_x(self, x: Any) -> np.ndarray:
        """Map first-modality features (m, d_x) into the shared space: (m, out_dim) float32, unit rows."""
        return self._transform(0, x, "x")

    def transform_y(self, y: Any) -> np.ndarray:
        """Map second-modality features (m, d_y) into the shared space: (m, out_dim) float32, unit rows."""
        return self._transform(1, y, "y")

    def similarity(self, x: Any, y: Any) -> np.ndarray:
        """Cosine alignment scores (m_x, m_y)."""
        return self.transform_x(x) @ self.transform_y(y).T

    @property
    def out_dim(self) -> int:
        """Dimension of the shared space."""
        mod = self._fitted()[1]
        return int(mod(torch.zeros(1, mod.in_dim)).shape[1])

    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments: ``type(self)(**self.config())`` rebuilds an unfitted twin."""
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k != "self"}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args}){'' if self.projections_ else ' [unfitted]'}"

    # -- hooks ------------------------------------------------------------------------------------
    def _means(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x.mean(axis=0), y.mean(axis=0)

    @abstractmethod
    def _fit(self, xc: np.ndarray, yc: np.ndarray, groups: np.ndarray | None, mu_x: np.ndarray,
             mu_y: np.ndarray) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Fit on normalised, centred float64 pairs (``groups``: see ``fit``); return the two modules."""

    # -- internals --------------------------------------------------------------------------------
    def _fitted(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        if self.projections_ is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit() first")
        return self.projections_

    @torch.inference_mode()
    def _transform(self, side: int, x: Any, what: str) -> np.ndarray:
        mod = self._fitted()[side]
        arr = _as_matrix(x, what)
        if arr.shape[1] != mod.in_dim:
            raise ClosedFormInputError(f"{what} features have dim {arr.shape[1]} (shape {arr.shape}) but the model "
                                       f"was fitted on dim {mod.in_dim}")
        return F.normalize(mod(torch.from_numpy(arr)), dim=-1).numpy()


def linear_map(mu: np.ndarray, weight: np.ndarray | None) -> LinearMap:
    """``(normalize(x) - mu) @ weight`` as a module (float64); ``weight=None``: centring only."""
    out = mu.shape[0] if weight is None else weight.shape[1]
    m = LinearMap(mu.shape[0], out, identity=weight is None)
    with torch.no_grad():
        m.mean.copy_(torch.from_numpy(mu))
        if weight is not None:
            m.weight = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float64))
    return m


# ------------------------------------------------------------------------------------------ ASIF
class ASIF(ClosedFormAligner):
    """ASIF (Norelli et al. 2023): a sample is its similarity profile over N anchor pairs.

    An image becomes the vector of its cosines to the N anchor images, a text the vector of its cosines
    to the N anchor captions; since anchor i is the same pair on both sides, the two profiles live in
    one N-dim space. Each profile keeps its ``k`` largest cosines (others 0), raised to power ``p``,
    then L2-normalised. Anchors are the fit pairs.

    Power is **sign-preserving** (``sign(s) * |s|**p``), not clamped at 0: with ``center=True`` about half
    the cosines are negative and a clamp would make ``p=1, k=N`` differ from plain relative
    representations; with the default ``k`` << N the kept top-k cosines are nearly always positive, so
    the choice rarely matters there.

    ``center=True`` (default, the measured-best variant here) subtracts each modality's anchor mean before
    the cosine, removing the shared "everything is an emoji" direction that otherwise dominates every
    profile. ``k >= N`` (or ``k=None``) disables sparsification. The anchors are stored as float32 and
    de-duplicated (:class:`~unialign.projections.AnchorMap`: the cut at the k-th cosine keeps all or none
    of a set of identical anchors, so an embedding never depends on its batch); transforms run
    ``chunk_size`` query rows at a time so memory is O(chunk_size * N), but the returned profile matrix
    itself is dense (m, N).

    ``nuisance_rank=r > 0`` (unialign's extension, off in the published default) first projects the
    first modality's features (images) off the top-r directions along which items *of one group*
    differ (``nuisance_directions``: the same concept in different styles), for anchors and queries
    alike, so neighbours are found by content rather than by drawing style. It needs ``groups`` in ``fit``; without groups, or with no
    group of two or more pairs, it removes nothing (``removed_rank`` says how many were removed).

    ``prototypes=True`` (concept prototypes, He et al. 2025; Li et al. 2024) makes the anchors one pair
    per group: the mean of the group's (normalised, centred, nuisance-projected) images and the mean of
    its captions, so an anchor describes a concept rather than one drawing of it. Without groups it
    changes nothing.
    """

    name: ClassVar[str] = "asif"

    def __init__(self, k: int | None = 800, p: float = 8.0, center: bool = True, chunk_size: int = 4096,
                 nuisance_rank: int = 0, prototypes: bool = False):
        super().__init__()
        _check_bool(prototypes, "ASIF prototypes")
        if not _is_int(nuisance_rank) or nuisance_rank < 0:
            raise ClosedFormConfigError(f"ASIF nuisance_rank must be an integer >= 0, got {nuisance_rank!r}")
        if k is not None and (not _is_int(k) or k < 1):
            raise ClosedFormConfigError(f"ASIF k must be a positive integer or None, got {k!r}")
        if not (_is_real(p) and p > 0):
            raise ClosedFormConfigError(f"ASIF p must be a positive number, got {p!r}")
        if not _is_int(chunk_size) or chunk_size < 1:
            raise ClosedFormConfigError(f"chunk_size must be >= 1, got {chunk_size!r}")
        self.k = None if k is None else int(k)
        self.p = float(p)
        self.center = bool(center)
        self.chunk_size = int(chunk_size)
        self.nuisance_rank = int(nuisance_rank)
        self.prototypes = bool(prototypes)

    @property
    def n_anchors(self) -> int:
        return int(self._fitted()[0].n_anchors)

    @property
    def removed_rank(self) -> int:
        """How many nuisance directions the fit found and removes (<= ``nuisance_rank``)."""
        return int(self._fitted()[0].nuisance_rank)

    def _means(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return super()._means(x, y) if self.center else (np.zeros(x.shape[1]), np.zeros(y.shape[1]))

    def _fit(self, xc: np.ndarray, yc: np.ndarray, groups: np.ndarray | None, mu_x: np.ndarray,
             mu_y: np.ndarray) -> tuple[AnchorMap, AnchorMap]:
        nuisance = nuisance_directions(xc, groups, self.nuisance_rank) if self.nuisance_rank else np.zeros((xc.shape[1], 0))
        if nuisance.shape[1]:
            xc = xc - (xc @ nuisance) @ nuisance.T
        if self.prototypes and groups is not None:  # one anchor per concept: its mean image, its mean caption
            xc, yc = group_means(xc, groups)[0], group_means(yc, groups)[0]
        # float32 anchors: halves the dominant memory cost; cosines need no more precision.
        return (self._anchor_map(_l2n(xc).astype(np.float32), mu_x, nuisance),
                self._anchor_map(_l2n(yc).astype(np.float32), mu_y, np.zeros((yc.shape[1], 0))))

    def _anchor_map(self, anchors: np.ndarray, mu: np.ndarray, nuisance: np.ndarray) -> AnchorMap:
        uniq, inverse = unique_rows(anchors)
        m = AnchorMap(anchors.shape[1], len(anchors), len(uniq), self.k, self.p, nuisance.shape[1], self.chunk_size)
        with torch.no_grad():
            m.mean.copy_(torch.from_numpy(mu))
            m.nuisance.copy_(torch.from_numpy(np.ascontiguousarray(nuisance)))
            m.anchors.copy_(torch.from_numpy(uniq))
            m.inverse.copy_(torch.from_numpy(inverse.reshape(-1).astype(np.int64)))
        return m


class RelativeRepresentation(ASIF):
    """Relative representations (Moschella et al. 2023): ASIF with every anchor kept and no power.

    Identical to ``ASIF(k=None, p=1, center=...)`` by construction (same code path), so the two can be
    compared as a pure ablation of ASIF's sparsification and sharpening.
    """

    name: ClassVar[str] = "relative"

    def __init__(self, center: bool = True, chunk_size: int = 4096):
        super().__init__(k=None, p=1.0, center=center, chunk_size=chunk_size)


# ---------------------------------------------------------------------------------- least squares
class LeastSquares(ClosedFormAligner):
    """Ridge regression from centred image features onto centred text features.

    ``W = argmin ||Xc W - Yc||^2 + lam ||W||^2`` with ``lam = alpha * trace(Xc^T Xc) / d_img``, so
    ``alpha`` is relative to the mean feature variance and means the same for any encoder. The shared
    space is the text space (d_txt): text -> normalised centred text, image -> normalised ``Xc W``.
    Solved in the primal (d_img x d_img) or dual (n x n) form, whichever is smaller.
    """

    name: ClassVar[str] = "lstsq"

    def __init__(self, alpha: float = 1e-2):
        super().__init__()
        if not (_is_real(alpha) and alpha >= 0):
            raise ClosedFormConfigError(f"LeastSquares alpha must be >= 0, got {alpha!r}")
        self.alpha = float(alpha)

    def _fit(self, xc: np.ndarray, yc: np.ndarray, groups: np.ndarray | None, mu_x: np.ndarray,
             mu_y: np.ndarray) -> tuple[LinearMap, LinearMap]:
        n, d = xc.shape
        lam = max(self.alpha * float(np.einsum("ij,ij->", xc, xc)) / d, _EPS)
        if d <= n:
            w = np.linalg.solve(xc.T @ xc + lam * np.eye(d), xc.T @ yc)
        else:
            w = xc.T @ np.linalg.solve(xc @ xc.T + lam * np.eye(n), yc)
        return linear_map(mu_x, w), linear_map(mu_y, None)


# ------------------------------------------------------------------------------------- Procrustes
class Procrustes(ClosedFormAligner):
    """Orthogonal Procrustes after PCA of each side to a common dimension.

    Both sides are reduced by PCA to ``r = min(d_img, d_txt, n - 1, dim)`` (the encoders' widths differ,
    and an orthogonal map needs equal dimensions), then ``W = U V^T`` from the SVD of ``X_r^T Y_r`` is
    the rotation that best superimposes the image cloud on the text cloud. Being orthogonal it cannot
    shrink or distort either geometry, unlike least squares. image -> ``X_r W``, text -> ``Y_r``.
    """

    name: ClassVar[str] = "procrustes"

    def __init__(self, dim: int | None = None):
        super().__init__()
        if dim is not None and (not _is_int(dim) or dim < 1):
            raise ClosedFormConfigError(f"Procrustes dim must be a positive integer or None, got {dim!r}")
        self.dim = None if dim is None else int(dim)

    def _fit(self, xc: np.ndarray, yc: np.ndarray, groups: np.ndarray | None, mu_x: np.ndarray,
             mu_y: np.ndarray) -> tuple[LinearMap, LinearMap]:
        n = xc.shape[0]
        r = min(xc.shape[1], yc.shape[1], n - 1, self.dim or n)
        px, py = _top_components(xc, r), _top_components(yc, r)
        u, _, vt = np.linalg.svd((xc @ px).T @ (yc @ py))
        return linear_map(mu_x, px @ (u @ vt)), linear_map(mu_y, py)


# -------------------------------------------------------------------------------------------- CCA
class CCA(ClosedFormAligner):
    """Regularised canonical correlation analysis.

    Covariances get a ridge of ``reg * mean variance`` (relative, so unitless) which keeps the solve
    well-posed when d > n. Canonical directions come from the SVD of
    ``Cxx^-1/2 Cxy Cyy^-1/2``; both views are projected onto the top ``n_components`` (default
    ``min(d_img, d_txt, n - 1, 256)``) canonical directions, where each coordinate has unit variance.
    Coordinate j is then multiplied by ``rho_j ** corr_power`` (rho = canonical correlations): 0 keeps
    the plainly whitened canonical variates, in which weakly correlated (noise) directions count as much
    as strong ones in the cosine; the default 1 downweights them by how little they agree across views.
    """

    name: ClassVar[str] = "cca"

    def __init__(self, n_components: int | None = None, reg: float = 1e-3, corr_power: float = 1.0):
        super().__init__()
        if n_components is not None and (not _is_int(n_components) or n_components < 1):
            raise ClosedFormConfigError(f"CCA n_components must be a positive integer or None, got {n_components!r}")
        if not (_is_real(reg) and reg > 0):
            raise ClosedFormConfigError(f"CCA reg must be > 0, got {reg!r}")
        if not (_is_real(corr_power) and corr_power >= 0):
            raise ClosedFormConfigError(f"CCA corr_power must be >= 0, got {corr_power!r}")
        self.n_components = None if n_components is None else int(n_components)
        self.reg = float(reg)
        self.corr_power = float(corr_power)

    def _fit(self, xc: np.ndarray, yc: np.ndarray, groups: np.ndarray | None, mu_x: np.ndarray,
             mu_y: np.ndarray) -> tuple[LinearMap, LinearMap]:
        c = min(xc.shape[1], yc.shape[1], xc.shape[0] - 1, self.n_components or 256)
        a, b, rho = canonical_directions(xc, yc, self.reg)
        self.canonical_correlations_ = rho[:c].copy()
        weights = np.clip(rho[:c], 0.0, None) ** self.corr_power  # folded into both maps
        return linear_map(mu_x, a[:, :c] * weights), linear_map(mu_y, b[:, :c] * weights)


# -------------------------------------------------------------------------------------------- CSA
class CSA(ClosedFormAligner):
    """Canonical Similarity Analysis (Li, Chinchali, Topcu, ICLR 2025): regularised CCA, then a pair is
    scored by ``sum_{i<=s} rho_i x_i y_i`` over the first ``s`` canonical coordinates, ``x`` and ``y``
    each L2-normalised over those coordinates and ``rho`` the canonical correlations.

    That score is a cosine of the model's embeddings, so every consumer of the embeddings (zero-shot
    heads, CLIP_benchmark, exports, FAISS) ranks by CSA: the first modality (images) embeds as
    ``rho * normalize(a^T x)``, the second (texts) as ``normalize(b^T y)``; the cosine is the CSA score
    divided by the norm of the image embedding, the same for every text, so an image's texts rank
    exactly by CSA (zero-shot classification, image -> text retrieval). A text's images rank by the
    score over that norm (``|rho * x|``, which lies in ``[rho_s, rho_1]``): close to, not exactly, CSA.

    Unlike :class:`CCA` (whose cosine of whitened variates weighted by ``rho ** corr_power`` on both sides
    normalises after the weighting), CSA normalises the canonical coordinates first, as the paper does.
    ``s`` (None: ``min(d_x, d_y, n - 1, 256)``) and ``reg`` (ridge relative to the mean variance; 0 is
    plain CCA and needs more pairs than dimensions) are the two knobs. ``prototypes=True`` fits the CCA on
    one pair per group (the mean image and mean caption of a concept) instead of every pair.

    The image side is two linear maps in a chain (canonical coordinates, then normalise-and-weight), so a
    fitted CSA saves, loads and exports like every other projection.
    """

    name: ClassVar[str] = "csa"

    def __init__(self, s: int | None = None, reg: float = 0.1, prototypes: bool = False):
        super().__init__()
        if s is not None and (not _is_int(s) or s < 1):
            raise ClosedFormConfigError(f"CSA s must be a positive integer or None, got {s!r}")
        if not (_is_real(reg) and reg >= 0):
            raise ClosedFormConfigError(f"CSA reg must be >= 0, got {reg!r}")
        _check_bool(prototypes, "CSA prototypes")
        self.s = None if s is None else int(s)
        self.reg = float(reg)
        self.prototypes = bool(prototypes)

    def _fit(self, xc: np.ndarray, yc: np.ndarray, groups: np.ndarray | None, mu_x: np.ndarray,
             mu_y: np.ndarray) -> tuple[torch.nn.Module, LinearMap]:
        fx, fy = (group_means(xc, groups)[0], group_means(yc, groups)[0]) if self.prototypes and groups is not None else (xc, yc)
        if fx.shape[0] < 2:
            raise ClosedFormInputError(f"CSA needs at least 2 {'groups' if self.prototypes else 'pairs'} to fit, got {fx.shape[0]}")
        c = min(xc.shape[1], yc.shape[1], fx.shape[0] - 1, self.s or 256)
        a, b, rho = canonical_directions(fx - fx.mean(0), fy - fy.mean(0), self.reg)
        self.canonical_correlations_ = rho[:c].copy()
        weigh = linear_map(np.zeros(c), np.diag(np.clip(rho[:c], 0.0, None)))  # normalise, then scale by rho
        return Chain([linear_map(mu_x, a[:, :c]), weigh]), linear_map(mu_y, b[:, :c])


# --------------------------------------------------------------------------------------- registry
CLOSED_FORM: dict[str, type[ClosedFormAligner]] = {
    "asif": ASIF,
    "relative": RelativeRepresentation,
    "lstsq": LeastSquares,
    "procrustes": Procrustes,
    "cca": CCA,
    "csa": CSA,
}


def _lookup(name: str) -> type[ClosedFormAligner]:
    try:
        return CLOSED_FORM[name]
    except (KeyError, TypeError):
        raise ClosedFormConfigError(
            f"unknown closed-form aligner {name!r}; choose one of: {', '.join(CLOSED_FORM)}"
        ) from None


def make_closed_form(name: str, **kw: Any) -> ClosedFormAligner:
    """Build an unfitted estimator by registry name, e.g. ``make_closed_form("asif", k=400, p=4)``."""
    cls = _lookup(name)
    try:
        return cls(**kw)
    except TypeError as e:
        raise ClosedFormConfigError(f"bad arguments for {name!r}: {e}") from None
