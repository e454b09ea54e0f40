"""Training-free and closed-form image-text aligners (REFERENCE.md section 5).

Each estimator fits on paired cached features (row i of ``img`` describes the same thing as row i of
``txt``) and maps both modalities into one shared space whose rows are L2-normalised, so that a plain
dot product is the cosine alignment score, exactly as with a trained projector head.

Why these exist next to trained heads: on the emoji benchmark (section 8) mean-centred ASIF beat every
trained head in under a second, and Procrustes / ridge least squares are the natural linear floors.

Conventions shared by every estimator (they keep results comparable across methods):
- inputs are L2-normalised per row, then centred by the fit-set mean of their modality (the same
  "normalise then centre" order as STRUCTURE), so an encoder's raw feature scale never matters;
- fitting runs in float64 for stable solves; transforms return float32;
- the fitted state is a flat ``dict[str, np.ndarray]`` (safetensors-ready) plus a JSON-able
  ``config()``, and ``Cls.from_state(config, state)`` rebuilds the estimator without refitting.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping, TypeVar

import numpy as np

from unialign.errors import ConfigError, DataError, UnialignError

__all__ = [
    "ASIF",
    "CCA",
    "CLOSED_FORM",
    "ClosedFormAligner",
    "ClosedFormConfigError",
    "ClosedFormInputError",
    "LeastSquares",
    "NotFittedError",
    "Procrustes",
    "RelativeRepresentation",
    "closed_form_from_state",
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
    """transform_* or state_dict called before fit (or from_state)."""


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
    returned, so ``r`` is 0 when no group has two members; then nothing is removed.
    """
    if rank <= 0 or groups is None:
        return np.zeros((xc.shape[1], 0))
    _, inv = np.unique(groups, return_inverse=True)
    sums = np.zeros((inv.max() + 1, xc.shape[1]))
    np.add.at(sums, inv, xc)
    resid = xc - (sums / np.bincount(inv)[:, None])[inv]
    w, v = _scatter_axes(resid)
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


def _scatter_axes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns, same order) of the scatter ``x^T x``."""
    w, v = np.linalg.eigh(x.T @ x)
    order = np.argsort(w)[::-1]
    return w[order], v[:, order]


# ------------------------------------------------------------------------------------- base class
class ClosedFormAligner(ABC):
    """Base class: paired features in, two maps into one L2-normalised shared space out.

    Subclasses implement ``_fit(xc, yc)`` on normalised-and-centred float64 features and
    ``_project_image`` / ``_project_text`` on such features; the base class owns input validation,
    centring, normalisation, dtype and the state round trip. ``_state_keys`` lists what
    ``state_dict`` holds beyond the two modality means ``mu_img`` and ``mu_txt``.
    """

    name: ClassVar[str] = ""
    _state_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._state: dict[str, np.ndarray] | None = None

    # -- public API -------------------------------------------------------------------------------
    def fit(self: T, img: Any, txt: Any, groups: Any = None) -> T:
        """Fit on paired features ``img`` (n, d_img) and ``txt`` (n, d_txt); returns ``self``.

        ``groups`` (optional, n integers or strings) says which pairs share a description, e.g. the same
        concept drawn in several styles; estimators that model within-group variation use it, the
        others ignore it.
        """
        x = _l2n(_as_matrix(img, "img"))
        y = _l2n(_as_matrix(txt, "txt"))
        _check_pairs(x, y)
        g = _check_groups(groups, x.shape[0])
        mu_x, mu_y = self._means(x, y)
        fitted = self._fit(x - mu_x, y - mu_y, g)
        self._state = {"mu_img": mu_x, "mu_txt": mu_y, **fitted}
        return self

    def transform_image(self, x: Any) -> np.ndarray:
        """Map image features (m, d_img) into the shared space: (m, out_dim) float32, unit rows."""
        st = self._fitted()
        xc = self._centre(x, st["mu_img"], "image features")
        return _l2n(self._project_image(xc)).astype(np.float32)

    def transform_text(self, y: Any) -> np.ndarray:
        """Map text features (m, d_txt) into the shared space: (m, out_dim) float32, unit rows."""
        st = self._fitted()
        yc = self._centre(y, st["mu_txt"], "text features")
        return _l2n(self._project_text(yc)).astype(np.float32)

    def similarity(self, img: Any, txt: Any) -> np.ndarray:
        """Cosine alignment scores (m_img, m_txt) between image rows and text rows."""
        return self.transform_image(img) @ self.transform_text(txt).T

    @property
    def out_dim(self) -> int:
        """Dimension of the shared space."""
        return int(self._project_text(np.zeros((1, self._fitted()["mu_txt"].shape[0]))).shape[1])

    def state_dict(self) -> dict[str, np.ndarray]:
        """Fitted arrays (copies), keyed by name; save with safetensors next to ``config()`` JSON."""
        return {k: v.copy() for k, v in self._fitted().items()}

    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments: ``type(self)(**self.config())`` rebuilds an unfitted twin."""
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k != "self"}

    @classmethod
    def from_state(cls: type[T], config: Mapping[str, Any], state: Mapping[str, Any]) -> T:
        """Rebuild a fitted estimator from ``config()`` and ``state_dict()`` without refitting."""
        try:
            est = cls(**dict(config))
        except TypeError as e:
            raise ClosedFormConfigError(f"bad config for {cls.__name__}: {e}") from None
        need = ("mu_img", "mu_txt", *est._required_state())
        missing = [k for k in need if k not in state]
        if missing:
            raise ClosedFormInputError(f"{cls.__name__} state lacks {missing}; it has {sorted(state)}")
        est._state = {k: np.array(_tensor_to_numpy(state[k])) for k in need}
        return est

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args}){'' if self._state else ' [unfitted]'}"

    # -- hooks ------------------------------------------------------------------------------------
    def _required_state(self) -> tuple[str, ...]:
        """Keys ``from_state`` needs beyond the two means (may depend on the hyper-parameters)."""
        return self._state_keys

    def _means(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x.mean(axis=0), y.mean(axis=0)

    @abstractmethod
    def _fit(self, xc: np.ndarray, yc: np.ndarray, groups: np.ndarray | None) -> dict[str, np.ndarray]:
        """Fit on normalised, centred float64 pairs (``groups``: see ``fit``); return the state arrays."""

    @abstractmethod
    def _project_image(self, xc: np.ndarray) -> np.ndarray:
        """Map normalised, centred image rows into the shared space (before final normalisation)."""

    @abstractmethod
    def _project_text(self, yc: np.ndarray) -> np.ndarray:
        """Map normalised, centred text rows into the shared space (before final normalisation)."""

    # -- internals --------------------------------------------------------------------------------
    def _fitted(self) -> dict[str, np.ndarray]:
        if self._state is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted: call fit() or from_state() first")
        return self._state

    @staticmethod
    def _centre(x: Any, mu: np.ndarray, what: str) -> np.ndarray:
        arr = _as_matrix(x, what)
        if arr.shape[1] != mu.shape[0]:
            raise ClosedFormInputError(
                f"{what} have dim {arr.shape[1]} (shape {arr.shape}) but the model was fitted on dim {mu.shape[0]}"
            )
        return _l2n(arr) - mu


def _tensor_to_numpy(v: Any) -> Any:
    return v.detach().cpu().numpy() if type(v).__module__.startswith("torch") else v


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
    profile. ``k >= N`` (or ``k=None``) disables sparsification. The anchor matrices are stored (N x d
    float32 per modality); transforms run ``chunk_size`` query rows at a time so memory is
    O(chunk_size * N), but the returned profile matrix itself is dense (m, N).

    ``nuisance_rank=r > 0`` (unialign's extension, off in the published default) first projects image
    features off the top-r directions along which images *of one group* differ (``nuisance_directions``:
    the same concept in different styles), for anchors and queries alike, so neighbours are found by
    content rather than by drawing style. It needs ``groups`` in ``fit``; without groups, or with no
    group of two or more pairs, it removes nothing (``removed_rank`` says how many were removed).
    """

    name: ClassVar[str] = "asif"
    _state_keys: ClassVar[tuple[str, ...]] = ("anchors_img", "anchors_txt")

    def __init__(self, k: int | None = 800, p: float = 8.0, center: bool = True, chunk_size: int = 4096,
                 nuisance_rank: int = 0):
        super().__init__()
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

    @property
    def n_anchors(self) -> int:
        return int(self._fitted()["anchors_img"].shape[0])

    @property
    def removed_rank(self) -> int:
        """How many nuisance directions the fit found and removes (<= ``nuisance_rank``)."""
        st = self._fitted()
        return int(st["nuisance_img"].shape[1]) if "nuisance_img" in st else 0

    def _required_state(self) -> tuple[str, ...]:
        return self._state_keys + (("nuisance_img",) if self.nuisance_rank else ())

    def _means(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return super()._means(x, y) if self.center else (np.zeros(x.shape[1]), np.zeros(y.shape[1]))

    def _fit(self, xc: np.ndarray, yc: np.ndarray, groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
        nuisance = {}
        if self.nuisance_rank:
            nuisance["nuisance_img"] = nuisance_directions(xc, groups, self.nuisance_rank)
            xc = self._remove(xc, nuisance["nuisance_img"])
        # float32 anchors: halves the dominant memory cost; cosines need no more precision.
        return {"anchors_img": _l2n(xc).astype(np.float32), "anchors_txt": _l2n(yc).astype(np.float32), **nuisance}

    @staticmethod
    def _remove(xc: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Project rows off the orthonormal columns of ``u`` (a no-op for zero columns)."""
        return xc - (xc @ u) @ u.T if u.shape[1] else xc

    def _project_image(self, xc: np.ndarray) -> np.ndarray:
        st = self._fitted()
        if "nuisance_img" in st:
            xc = self._remove(xc, st["nuisance_img"])
        return self._profile(xc, st["anchors_img"])

    def _project_text(self, yc: np.ndarray) -> np.ndarray:
        return self._profile(yc, self._fitted()["anchors_txt"])

    def _profile(self, qc: np.ndarray, anchors: np.ndarray) -> np.ndarray:
        """Sparse-power similarity profile of centred queries against unit anchors, (m, N) float32."""
        q = _l2n(qc).astype(np.float32)
        n = anchors.shape[0]
        k = n if self.k is None else min(self.k, n)
        out = np.empty((q.shape[0], n), dtype=np.float32)
        for start in range(0, q.shape[0], self.chunk_size):
            s = q[start : start + self.chunk_size] @ anchors.T
            if k < n:
                top = np.argpartition(s, n - k, axis=1)[:, n - k :]
                kept = np.zeros_like(s)
                np.put_along_axis(kept, top, self._power(np.take_along_axis(s, top, axis=1)), axis=1)
                s = kept
            else:
                s = self._power(s)
            out[start : start + s.shape[0]] = s
        return out

    def _power(self, s: np.ndarray) -> np.ndarray:
        """Sign-preserving power ``sign(s) * |s|**p`` (identity, bit for bit, when p == 1)."""
        return s if self.p == 1.0 else np.sign(s) * np.abs(s) ** np.float32(self.p)


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
    _state_keys: ClassVar[tuple[str, ...]] = ("W",)

    def __init__(self, alpha: float = 1e-2):
        super().__init__()
        if not (_is_real(alpha) and alpha >= 0):
            raise ClosedFormConfigError(f"LeastSquares alpha must be >= 0, got {alpha!r}")
        self.alpha = float(alpha)

    def _fit(self, xc: np.ndarray, yc: np.ndarray, groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
        n, d = xc.shape
        lam = max(self.alpha * float(np.einsum("ij,ij->", xc, xc)) / d, _EPS)
        if d <= n:
            w = np.linalg.solve(xc.T @ xc + lam * np.eye(d), xc.T @ yc)
        else:
            w = xc.T @ np.linalg.solve(xc @ xc.T + lam * np.eye(n), yc)
        return {"W": w}

    def _project_image(self, xc: np.ndarray) -> np.ndarray:
        return xc @ self._fitted()["W"]

    def _project_text(self, yc: np.ndarray) -> np.ndarray:
        return yc


# ------------------------------------------------------------------------------------- Procrustes
class Procrustes(ClosedFormAligner):
    """Orthogonal Procrustes after PCA of each side to a common dimension.

    Both sides are reduced by PCA to ``r = min(d_img, d_txt, n - 1, dim)`` (the encoders' widths differ,
    and an orthogonal map needs equal dimensions), then ``W = U V^T`` from the SVD of ``X_r^T Y_r`` is
    the rotation that best superimposes the image cloud on the text cloud. Being orthogonal it cannot
    shrink or distort either geometry, unlike least squares. image -> ``X_r W``, text -> ``Y_r``.
    """

    name: ClassVar[str] = "procrustes"
    _state_keys: ClassVar[tuple[str, ...]] = ("pca_img", "pca_txt", "W")

    def __init__(self, dim: int | None = None):
        super().__init__()
        if dim is not None and (not _is_int(dim) or dim < 1):
            raise ClosedFormConfigError(f"Procrustes dim must be a positive integer or None, got {dim!r}")
        self.dim = None if dim is None else int(dim)

    def _fit(self, xc: np.ndarray, yc: np.ndarray, groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
        n = xc.shape[0]
        r = min(xc.shape[1], yc.shape[1], n - 1, self.dim or n)
        px, py = _top_components(xc, r), _top_components(yc, r)
        u, _, vt = np.linalg.svd((xc @ px).T @ (yc @ py))
        return {"pca_img": px, "pca_txt": py, "W": u @ vt}

    def _project_image(self, xc: np.ndarray) -> np.ndarray:
        st = self._fitted()
        return xc @ st["pca_img"] @ st["W"]

    def _project_text(self, yc: np.ndarray) -> np.ndarray:
        return yc @ self._fitted()["pca_txt"]


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
    _state_keys: ClassVar[tuple[str, ...]] = ("proj_img", "proj_txt", "corr")

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

    def _fit(self, xc: np.ndarray, yc: np.ndarray, groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
        n = xc.shape[0]
        c = min(xc.shape[1], yc.shape[1], n - 1, self.n_components or 256)
        cxx = _reg_eye(xc.T @ xc / (n - 1), self.reg)
        cyy = _reg_eye(yc.T @ yc / (n - 1), self.reg)
        wx, wy = _inv_sqrt_psd(cxx), _inv_sqrt_psd(cyy)
        u, rho, vt = np.linalg.svd(wx @ (xc.T @ yc / (n - 1)) @ wy, full_matrices=False)
        return {"proj_img": wx @ u[:, :c], "proj_txt": wy @ vt[:c].T, "corr": rho[:c]}

    @property
    def canonical_correlations(self) -> np.ndarray:
        return self._fitted()["corr"].copy()

    def _weights(self) -> np.ndarray:
        return np.clip(self._fitted()["corr"], 0.0, None) ** self.corr_power

    def _project_image(self, xc: np.ndarray) -> np.ndarray:
        return (xc @ self._fitted()["proj_img"]) * self._weights()

    def _project_text(self, yc: np.ndarray) -> np.ndarray:
        return (yc @ self._fitted()["proj_txt"]) * self._weights()


# --------------------------------------------------------------------------------------- registry
CLOSED_FORM: dict[str, type[ClosedFormAligner]] = {
    "asif": ASIF,
    "relative": RelativeRepresentation,
    "lstsq": LeastSquares,
    "procrustes": Procrustes,
    "cca": CCA,
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


def closed_form_from_state(name: str, config: Mapping[str, Any], state: Mapping[str, Any]) -> ClosedFormAligner:
    """Load a saved estimator given its registry ``name`` (store it beside ``config()``)."""
    return _lookup(name).from_state(config, state)
