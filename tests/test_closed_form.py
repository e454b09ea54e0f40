"""Closed-form aligners: each recovers a planted structure; the fitted maps are projection modules that
round-trip through safetensors; embeddings do not depend on their batch; inputs are validated."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unialign_train.align.closed_form import (
    ASIF,
    CCA,
    CLOSED_FORM,
    ClosedFormAligner,
    LeastSquares,
    NotFittedError,
    Procrustes,
    RelativeRepresentation,
    make_closed_form,
    nuisance_directions,
)
from unialign.projections import build_projection, projection_config

from conftest import chunk_size


def _orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _r_at_1(zi: np.ndarray, zt: np.ndarray) -> float:
    return float(np.mean(np.argmax(zi @ zt.T, axis=1) == np.arange(len(zi))))


def _paired(n: int = 300, d_img: int = 24, d_txt: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pairs sharing an 8-d latent plus private noise (a generic 'related but different' pair of views)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 8))
    img = z @ rng.standard_normal((8, d_img)) + 0.3 * rng.standard_normal((n, d_img)) + 2.0
    txt = z @ rng.standard_normal((8, d_txt)) + 0.3 * rng.standard_normal((n, d_txt)) - 1.0
    return img, txt


def test_procrustes_recovers_rotation() -> None:
    rng = np.random.default_rng(1)
    img = rng.standard_normal((400, 20)) + 0.5
    txt = img @ _orthogonal(20, rng)
    m = Procrustes().fit(img[:300], txt[:300])
    zi, zt = m.transform_x(img[300:]), m.transform_y(txt[300:])
    assert zi.dtype == np.float32 and zi.shape == (100, 20)
    np.testing.assert_allclose(np.sum(zi * zt, axis=1), 1.0, atol=1e-5)
    assert _r_at_1(zi, zt) == 1.0


def test_procrustes_common_dim_and_cap() -> None:
    img, txt = _paired(n=50, d_img=30, d_txt=12)
    assert Procrustes().fit(img, txt).out_dim == 12
    assert Procrustes(dim=5).fit(img, txt).out_dim == 5
    assert Procrustes().fit(img[:6], txt[:6]).out_dim == 5  # n - 1


@pytest.mark.numerics
@pytest.mark.parametrize("center", [True, False])
def test_asif_full_k_p1_equals_relative(center: bool) -> None:
    """k >= N and p = 1 is relative representations: the same profile, computed in other chunks (so up
    to float32 rounding of 24-term dot products, not bit for bit)."""
    img, txt = _paired(n=120)
    a = ASIF(k=120, p=1, center=center, chunk_size=7).fit(img, txt)
    r = RelativeRepresentation(center=center, chunk_size=chunk_size(4096)).fit(img, txt)
    q_img, q_txt = _paired(n=30, seed=5)
    np.testing.assert_allclose(a.transform_x(q_img), r.transform_x(q_img), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.transform_y(q_txt), r.transform_y(q_txt), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ASIF(k=10_000, p=1, center=center).fit(img, txt).transform_y(q_txt), r.transform_y(q_txt),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.numerics
def test_asif_topk_and_power() -> None:
    img, txt = _paired(n=200)
    k, p = 13, 3.0
    m = ASIF(k=k, p=p, center=True, chunk_size=chunk_size(16)).fit(img, txt)
    q_img, _ = _paired(n=40, seed=9)
    out = m.transform_x(q_img).astype(np.float64)
    assert out.shape == (40, 200)
    assert np.all(np.count_nonzero(out, axis=1) == k)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)

    # Reference: centred cosines to the anchors, top-k, sign-preserving power, normalise.
    def unit(a: np.ndarray) -> np.ndarray:
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    anchors = unit(img)
    mu = anchors.mean(0)
    sims = unit(unit(q_img) - mu) @ unit(anchors - mu).T
    expected = np.zeros_like(sims)
    for i, row in enumerate(sims):
        top = np.argsort(row)[-k:]
        expected[i, top] = np.sign(row[top]) * np.abs(row[top]) ** p
    np.testing.assert_allclose(out, unit(expected), atol=1e-5)


def test_asif_retrieves_training_pairs() -> None:
    img, txt = _paired(n=200)
    m = ASIF(k=50, p=4).fit(img, txt)
    assert _r_at_1(m.transform_x(img), m.transform_y(txt)) > 0.9


def test_lstsq_recovers_linear_map() -> None:
    rng = np.random.default_rng(2)
    img = rng.standard_normal((500, 16)) + 0.3
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    a = _orthogonal(24, rng)[:16]  # rows orthonormal: preserves norms, so the L2 step keeps it linear
    txt = img @ a
    m = LeastSquares(alpha=1e-9).fit(img, txt)
    w = m.projections_[0].weight.numpy()  # the map of normalised, centred rows: the planted one
    np.testing.assert_allclose(w, a, atol=1e-5)
    default = LeastSquares().fit(img[:400], txt[:400])
    zi, zt = default.transform_x(img[400:]), default.transform_y(txt[400:])
    assert zi.shape == (100, 24)
    assert np.sum(zi * zt, axis=1).min() > 0.99 and _r_at_1(zi, zt) == 1.0


def test_lstsq_dual_matches_primal() -> None:
    img, txt = _paired(n=40, d_img=30, d_txt=10)  # d_img < n: primal
    wide = np.hstack([img, img[:, :15] * 0.5])  # 45 > 40: dual
    w_wide = LeastSquares(alpha=0.1).fit(wide, txt).projections_[0].weight.numpy()
    xc = wide / np.linalg.norm(wide, axis=1, keepdims=True)
    xc -= xc.mean(0)
    yc = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    yc -= yc.mean(0)
    lam = 0.1 * np.sum(xc * xc) / xc.shape[1]
    np.testing.assert_allclose(w_wide, np.linalg.solve(xc.T @ xc + lam * np.eye(45), xc.T @ yc), atol=1e-8)


def test_cca_finds_shared_latent() -> None:
    rng = np.random.default_rng(3)
    n, n_test = 2000, 200
    z = rng.standard_normal((n + n_test, 6))
    img = z @ rng.standard_normal((6, 40)) + rng.standard_normal((n + n_test, 40)) @ np.diag(np.linspace(0.2, 3, 40)) + 1
    txt = z @ rng.standard_normal((6, 30)) + 1.5 * rng.standard_normal((n + n_test, 30))
    m = CCA().fit(img[:n], txt[:n])
    rho = m.canonical_correlations_
    assert rho.shape == (30,) and np.all(np.diff(rho) <= 1e-12)
    assert rho[:6].min() > 0.5 and rho[10:].max() < 0.2  # six shared directions, the rest noise
    r1 = _r_at_1(m.transform_x(img[n:]), m.transform_y(txt[n:]))
    assert r1 > 0.25  # chance is 1/200
    assert CCA(n_components=6, corr_power=0).fit(img[:n], txt[:n]).out_dim == 6


@pytest.mark.parametrize("name", sorted(CLOSED_FORM))
def test_projection_modules_round_trip(name: str, tmp_path) -> None:
    """A fitted map is two projection modules; config + safetensors state rebuild them exactly."""
    from safetensors.torch import load_file, save_file

    img, txt = _paired(n=80)
    m = make_closed_form(name).fit(img, txt)
    assert m.name == name and isinstance(m, ClosedFormAligner)
    q = {0: _paired(n=20, seed=4)[0], 1: _paired(n=20, seed=4)[1]}
    for side, mod in enumerate(m.projections_):
        save_file(mod.state_dict(), str(tmp_path / "s.safetensors"))
        (tmp_path / "c.json").write_text(json.dumps(projection_config(mod)))
        back = build_projection(json.loads((tmp_path / "c.json").read_text()))
        back.load_state_dict(load_file(str(tmp_path / "s.safetensors")))
        x = torch.from_numpy(q[side])
        assert torch.equal(back(x), mod(x))  # the same module state: bit-identical
    zi = m.transform_x(torch.from_numpy(q[0]).float())  # torch input accepted
    assert zi.dtype == np.float32 and zi.shape[1] == m.out_dim
    np.testing.assert_allclose(np.linalg.norm(zi, axis=1), 1.0, atol=1e-5)


@pytest.mark.numerics
def test_asif_embedding_does_not_depend_on_its_batch() -> None:
    """Duplicated anchors (one caption shared by several images) tie at the k-th cosine; they are kept or
    dropped together, so an input embeds the same alone, in chunks or in one batch (up to the rounding of
    the batch's matmul), even when its cut falls inside a tie."""
    img, txt = _paired(n=60)
    txt = np.repeat(txt[:20], 3, axis=0)  # every caption three times, as the emoji styles
    m = ASIF(k=7, p=4, chunk_size=chunk_size(4096)).fit(img, txt)
    q = np.repeat(_paired(n=12, seed=3)[1], 2, axis=0)
    together = m.transform_y(q)
    alone = np.concatenate([m.transform_y(q[i : i + 1]) for i in range(len(q))])
    chunked = np.concatenate([m.transform_y(q[i : i + 5]) for i in range(0, len(q), 5)])
    nonzero = np.count_nonzero(together, axis=1)
    assert (nonzero % 3 == 0).all() and (nonzero >= 7).all()  # whole tie groups, at least k
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunked, together, rtol=1e-5, atol=1e-6)
    assert m.projections_[1].n_unique == 20 and m.projections_[1].n_anchors == 60  # stored once each


@pytest.mark.parametrize("k,copies", [(7, 3), (1, 3), (59, 3), (5, 1), (40, 4)])
def test_asif_cut_on_distinct_anchors_is_the_cut_over_all_positions(k: int, copies: int) -> None:
    """The k-th largest cosine, found among the distinct anchors with their counts, is the k-th largest
    of the N-wide row, ties across distinct anchors too."""
    from unialign.projections import AnchorMap

    g = torch.Generator().manual_seed(k)
    n_unique = 60 // copies
    m = AnchorMap(8, n_unique * copies, n_unique, k=k, p=4.0)
    m.inverse.copy_(torch.randperm(n_unique * copies, generator=g) % n_unique)
    s = torch.randn(30, n_unique, generator=g)
    s[:, 1] = s[:, 0]  # two distinct anchors with equal cosines
    want = torch.topk(s[:, m.inverse], k, dim=1).values[:, -1:]
    counts = torch.bincount(m.inverse, minlength=n_unique)
    torch.testing.assert_close(m._cut(s, counts), want)  # float32 tolerance: two computations of one value


def test_maps_keep_their_float64_state_through_a_module_wide_cast() -> None:
    """A host that casts every module to its backbone's dtype (sentence-transformers 6.3 loading an
    export) must not round the maps' float64 state: values stay bit-exact, float32 buffers follow."""
    from unialign.projections import AnchorMap, LinearMap

    lin, anc = LinearMap(4, 3), AnchorMap(4, 6, 3, k=2, nuisance_rank=1)
    for b in (lin.mean, lin.weight, anc.mean, anc.nuisance):
        b.copy_(torch.full_like(b, 1 / 3))  # not a float32 number
    before = {id(m): {n: b.clone() for n, b in m.named_buffers()} for m in (lin, anc)}
    x = torch.randn(5, 4)
    want = lin(x)
    for m in (lin, anc):
        m.float()
        for n, b in m.named_buffers():
            assert b.dtype == before[id(m)][n].dtype and torch.equal(b, before[id(m)][n]), n
    anc.half()
    assert anc.anchors.dtype == torch.float16 and anc.nuisance.dtype == torch.float64  # others follow the cast
    assert torch.equal(lin(x), want)


def test_input_validation() -> None:
    img, txt = _paired(n=20)
    with pytest.raises(ValueError, match=r"\(20, 24\).*\(19, 16\)"):
        LeastSquares().fit(img, txt[:19])
    bad = img.copy()
    bad[[3, 7], 0] = np.nan
    bad[7, 1] = np.inf
    with pytest.raises(ValueError, match="2 row"):
        Procrustes().fit(bad, txt)
    with pytest.raises(ValueError, match="at least 2"):
        CCA().fit(img[:1], txt[:1])
    with pytest.raises(ValueError, match="2-D"):
        ASIF().fit(img[0], txt[0])
    m = ASIF().fit(img, txt)
    with pytest.raises(ValueError, match="dim 16.*dim 24"):
        m.transform_x(txt)
    with pytest.raises(ValueError, match="1 row"):
        m.transform_y(np.where(np.arange(20)[:, None] == 5, np.nan, txt))
    with pytest.raises(NotFittedError):
        Procrustes().transform_y(txt)
    with pytest.raises(ValueError, match="asif, relative, lstsq, procrustes, cca"):
        make_closed_form("nope")
    with pytest.raises(ValueError):
        make_closed_form("asif", k=0)


def _styled(groups: np.ndarray, styles: np.ndarray, seed: int = 0, style_scale: float = 16.0, n_concepts: int = 400):
    """Concepts drawn in styles: image = content + a style offset in 4 axes orthogonal to all content (the
    caption cannot see it); text = content through another map. Returns img, txt, style basis."""
    rng = np.random.default_rng(seed)
    content = rng.standard_normal((n_concepts, 8))
    a, b = rng.standard_normal((8, 32)), rng.standard_normal((8, 20))
    basis = np.linalg.qr(np.concatenate([a.T, rng.standard_normal((32, 4))], 1))[0][:, 8:12]
    offsets = style_scale * rng.standard_normal((int(styles.max()) + 1, 4))
    img = content[groups] @ a + offsets[styles] @ basis.T + 0.1 * rng.standard_normal((len(groups), 32))
    txt = content[groups] @ b + 0.1 * rng.standard_normal((len(groups), 20))
    return img, txt, basis


def test_nuisance_directions_recover_the_style_subspace() -> None:
    groups, styles = np.repeat(np.arange(200), 6), np.tile(np.arange(6), 200)
    img, _, basis = _styled(groups, styles, style_scale=3.0)
    u = nuisance_directions(img - img.mean(0), groups, 4)
    assert u.shape == (32, 4)
    cosines = np.linalg.svd(u.T @ basis, compute_uv=False)  # principal angles between the two subspaces
    assert cosines.min() > 0.99
    assert nuisance_directions(img, np.arange(len(img)), 4).shape == (32, 0)  # singleton groups: nothing
    assert nuisance_directions(img, None, 4).shape == (32, 0)
    # a rank chosen for wide features never empties a narrow space: at most half of its 32 dimensions go
    assert nuisance_directions(img - img.mean(0), groups, 64).shape == (32, 16)


def test_asif_nuisance_rank_matches_unseen_concepts_in_an_unseen_style() -> None:
    # anchors: concepts 0-99 in each of styles 0-7 (they reveal the style axes), concepts 100-299 once each
    # in a random style; queries: concepts 300-399 in style 8, which no anchor shows
    gains = []
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        groups = np.concatenate([np.repeat(np.arange(100), 8), np.arange(100, 300), np.arange(300, 400)])
        styles = np.concatenate([np.tile(np.arange(8), 100), rng.integers(0, 8, 200), np.full(100, 8)])
        img, txt, _ = _styled(groups, styles, seed=seed)
        fit, query = groups < 300, groups >= 300
        plain = ASIF(k=30, p=4).fit(img[fit], txt[fit], groups=groups[fit])
        clean = ASIF(k=30, p=4, nuisance_rank=4).fit(img[fit], txt[fit], groups=groups[fit])
        assert plain.removed_rank == 0 and clean.removed_rank == 4
        r_plain = _r_at_1(plain.transform_x(img[query]), plain.transform_y(txt[query]))
        r_clean = _r_at_1(clean.transform_x(img[query]), clean.transform_y(txt[query]))
        assert r_clean > r_plain, (seed, r_plain, r_clean)
        gains.append(r_clean - r_plain)
        # without groups nothing is removed and the result is plain ASIF, bit for bit
        same = ASIF(k=30, p=4, nuisance_rank=4).fit(img[fit], txt[fit])
        assert same.removed_rank == 0
        assert np.array_equal(same.transform_x(img[query]), plain.transform_x(img[query]))
    assert np.mean(gains) > 0.1, gains


def test_asif_nuisance_state_round_trip_and_validation() -> None:
    groups = np.repeat(np.arange(40), 3)
    img, txt, _ = _styled(groups, np.tile(np.arange(3), 40), n_concepts=40)
    m = ASIF(k=20, p=4, nuisance_rank=3).fit(img, txt, groups=groups)
    assert m.removed_rank == 3
    mod = m.projections_[0]
    back = build_projection(json.loads(json.dumps(projection_config(mod))))
    back.load_state_dict(mod.state_dict())
    assert back.nuisance_rank == 3 and torch.equal(back(torch.from_numpy(img[:5])), mod(torch.from_numpy(img[:5])))
    with pytest.raises(RuntimeError, match="nuisance"):  # a state without the removed directions does not load
        build_projection(projection_config(mod)).load_state_dict({k: v for k, v in mod.state_dict().items() if k != "nuisance"})
    with pytest.raises(ValueError, match="groups must be one label per pair"):
        ASIF().fit(img, txt, groups=groups[:-1])
    for bad in (-1, 2.5, "abc", True):  # config values arrive from --set as any type: one clear message each
        with pytest.raises(ValueError, match="nuisance_rank must be an integer"):
            ASIF(nuisance_rank=bad)
    with pytest.raises(ValueError, match="p must be a positive number"):
        make_closed_form("asif", p="x")
