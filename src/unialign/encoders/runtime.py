"""Inference backends of the frozen encoders: PyTorch eager, or the same network exported once to ONNX
and run by ONNX Runtime (or OpenVINO).

Why: on CPUs, PyTorch eager is not the limit of the hardware. The same EfficientNet-Lite0 exported
with ``torch.onnx.export`` and run by ONNX Runtime computes the same features (to float32 rounding)
several times faster (fused convolution + batch norm + activation, no per-op dispatch), MiniLM about
1.6x as fast, and OpenVINO runs the same exported file another ~1.2x faster; the encoder pass is
most of the main job (benchmarks/results/extract_throughput.md).

How the parts fit:
- An encoder describes its tensor computation as a :class:`Graph`: a torch module mapping the model
  inputs (a pixel batch, or token ids and masks) to a tuple of pooled layer outputs, which is exactly
  what its torch backend runs, plus example inputs and the axes that vary (batch, sequence).
- :class:`Runtime` holds one encoder's compiled graphs, one per set of layers asked for (a store
  asks for its layers; only those are exported and computed). A graph is exported once per machine
  into ``$UNIALIGN_HOME/onnx/<encoder>-<digest>/``, keyed by the weights fingerprint, the input
  shapes, the layers, the quantisation and the exporter's version; it is written atomically (a
  content-named folder renamed into place, then ``meta.json``), and verified on load (key and
  sha256 of every file; a mismatch is re-exported). Right after an export its outputs are compared
  with PyTorch's on the example inputs, and an export that disagrees is refused, so a backend is only
  ever used where its outputs agree.
- ``backend=auto`` (the default) on CPU is the fastest runtime installed: OpenVINO, else ONNX
  Runtime, else PyTorch; on GPUs it is PyTorch (bf16 autocast); ``torch``, ``onnx`` and
  ``openvino`` force one. The environment variable
  ``UNIALIGN_BACKEND`` says what ``auto`` means on a machine (e.g. ``UNIALIGN_BACKEND=torch``).
- ``quantize=int8``: ONNX Runtime's dynamic quantisation of the MatMul/Gemm weights (activations are
  quantised per batch at run time, so no calibration data is needed). Never the default: it changes
  the features (see docs/speed.md for its speed and accuracy cost).

Nothing here is imported until an encoder runs on a backend other than torch: ``onnxruntime``,
``onnx`` and ``onnxscript`` are optional (``pip install unialign[onnx]``), ``openvino`` too
(``unialign[openvino]``); ``unialign[all]`` has both.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .. import paths
from ..errors import ConfigError, DataError
from ..io import read_json, sha256_file, write_json

BACKENDS = ("auto", "torch", "onnx", "openvino")
QUANTIZATIONS = ("none", "int8")
BACKEND_OPTIONS: dict[str, Any] = {"backend": "auto", "quantize": "none"}  # spec options every encoder takes
NEEDS = {"onnx": ("onnxruntime", "onnx", "onnxscript"), "openvino": ("openvino", "onnx", "onnxscript")}
OPSET = 18
AGREEMENT_COSINE = 0.9999  # an fp32 export whose outputs fall below this against torch is refused
AGREEMENT_ATOL = 1e-4  # ... or whose largest difference exceeds this times max(1, largest |output|)
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to a side file (protobuf's 2 GB limit)
STALE_TMP_SECONDS = 3600  # an export folder this old was left by a killed process


@dataclass
class Graph:
    """An encoder's tensor computation, ready to export: ``module(*inputs.values())`` returns one
    tensor per name in ``outputs``; ``dynamic`` names the axes that vary (``{"input_ids": {0: "batch",
    1: "sequence"}}``), every other axis is fixed by the example; ``max_sizes`` bounds dynamic axes
    (a text model's maximum length)."""

    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]]
    max_sizes: dict[str, int] = field(default_factory=dict)

    def signature(self) -> dict[str, list[int | str]]:
        """Shape of each input with dynamic axes by name: part of the cache key (an EfficientNet built
        for 128 px is another graph than one built for 224 px)."""
        return {n: [self.dynamic.get(n, {}).get(a, int(s)) for a, s in enumerate(t.shape)] for n, t in self.inputs.items()}


def without_backend(options: dict[str, Any]) -> dict[str, Any]:
    """Options minus the backend ones: what names an encoder's exported graphs, which do not depend
    on the backend that runs them (``backend=onnx`` and ``auto`` share one export)."""
    return {k: v for k, v in options.items() if k not in BACKEND_OPTIONS}


def missing_packages(backend: str) -> list[str]:
    """Packages a backend needs that are not installed (looked up without importing them)."""
    return [p for p in NEEDS.get(backend, ()) if importlib.util.find_spec(p) is None]


def resolve_backend(requested: str, device: torch.device, quantize: str = "none") -> str:
    """The backend that runs: ``auto`` on CPU is OpenVINO, else ONNX Runtime, when installed (both run
    the same exported graph, several times faster than eager, same features), else PyTorch; on CUDA/MPS
    it is PyTorch (bf16 autocast on CUDA). An explicit choice whose packages are missing is an error,
    never a silent fallback."""
    if requested not in BACKENDS:
        raise ConfigError(f"backend={requested!r}; accepted: {', '.join(BACKENDS)}")
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"quantize={quantize!r}; accepted: {', '.join(QUANTIZATIONS)}")
    if requested == "auto" and os.environ.get("UNIALIGN_BACKEND"):
        requested = os.environ["UNIALIGN_BACKEND"]  # what "auto" means on this machine, for every encoder
        if requested not in BACKENDS:
            raise ConfigError(f"UNIALIGN_BACKEND={requested!r}; accepted: {', '.join(BACKENDS)}")
    if requested == "auto":
        if quantize != "none":
            requested = "onnx"  # the int8 graph is ONNX Runtime's quantisation, measured on ONNX Runtime
        elif device.type != "cpu":
            return "torch"
        else:
            return next((b for b in ("openvino", "onnx") if not missing_packages(b)), "torch")
    if quantize != "none" and requested == "torch":
        raise ConfigError(f"quantize={quantize} runs on the onnx or openvino backend, not torch")
    missing = missing_packages(requested)
    if missing:
        extra = "onnx" if requested == "onnx" else "openvino"
        raise ConfigError(f"backend={requested} needs: pip install {' '.join(missing)} (or unialign[{extra}])")
    return requested


class Runtime:
    """One encoder's exported graphs and their sessions, created on first use and kept per layer set.

    ``name`` (the encoder's spec, without backend options) names the cache folder; ``key`` (the
    weights fingerprint and whatever else shapes the graph) goes into the cache key. Pickles without
    its sessions (Ray actors rebuild them from the cache on their first batch)."""

    def __init__(self, backend: str, quantize: str, name: str, key: dict[str, Any], cuda: bool = False):
        if backend not in ("onnx", "openvino"):
            raise ValueError(f"Runtime runs onnx or openvino graphs, not {backend!r}")
        self.backend, self.quantize, self.name, self.key = backend, quantize, name, key
        self.cuda = cuda  # an encoder on a GPU asked for onnx explicitly: CUDA provider where installed
        self._sessions: dict[tuple[str, ...], _Session] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_sessions", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._sessions, self._lock = {}, threading.Lock()

    def describe(self) -> str:
        """One line: which runtime, version, device and threads (for the log)."""
        q = ", int8 dynamic" if self.quantize == "int8" else ""
        if self.backend == "openvino":
            import openvino

            return f"openvino {openvino.__version__} (CPU, {torch.get_num_threads()} threads{q})"
        import onnxruntime as ort

        return f"onnxruntime {ort.__version__} ({_providers(self.cuda)[0]}, {torch.get_num_threads()} threads{q})"

    def run(self, build: Callable[[Sequence[str]], Graph], inputs: dict[str, torch.Tensor],
            layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """The graph of ``layers`` on ``inputs`` (float32 CPU tensors out)."""
        session = self.session(build, layers)
        return session(inputs)

    def session(self, build: Callable[[Sequence[str]], Graph], layers: Sequence[str]) -> "_Session":
        """The compiled graph of ``layers``: from memory, else from the cache, else exported now."""
        want = tuple(layers)
        with self._lock:
            if want not in self._sessions:
                path = self.graph_file(build, want)
                self._sessions[want] = _Session(self.backend, path, list(want), self.cuda)
            return self._sessions[want]

    def graph_file(self, build: Callable[[Sequence[str]], Graph], layers: Sequence[str]) -> Path:
        """Path of the verified ONNX file of ``layers`` (exported, and quantised if asked, when missing)."""
        graph = build(list(layers))
        key = self._key(graph, "none")
        fp32 = _cached(self.name, key)
        if fp32 is None:
            fp32 = _export(self.name, key, graph)
        if self.quantize == "none":
            return fp32
        qkey = self._key(graph, self.quantize)
        q = _cached(self.name, qkey)
        return q if q is not None else _quantize(self.name, qkey, fp32)

    def _key(self, graph: Graph, quantize: str) -> dict[str, Any]:
        return {**self.key, "layers": list(graph.outputs), "inputs": graph.signature(), "max_sizes": graph.max_sizes,
                "quantize": quantize, "exporter": f"torch {torch.__version__.split('+')[0]}", "opset": OPSET}


class _Session:
    """One ONNX file run by ONNX Runtime or OpenVINO with as many threads as torch uses (so a Ray
    actor or a ``torch.set_num_threads`` caller gets the thread count it asked for)."""

    def __init__(self, backend: str, path: Path, outputs: list[str], cuda: bool = False):
        self.backend, self.path, self.outputs = backend, path, outputs
        threads = torch.get_num_threads()
        if backend == "openvino":
            # f32 precision: on CPUs with bf16 units OpenVINO would otherwise lower the precision itself
            self._compiled = _openvino_compile(path, {"INFERENCE_NUM_THREADS": threads,
                                                      "INFERENCE_PRECISION_HINT": "f32"})
            self._names = [p.get_any_name() for p in self._compiled.inputs]
        else:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3  # errors only: its graph-fusion notices are not the user's business
            # Idle threads sleep instead of spinning: the decoding workers (and anything else on the
            # machine) get the cores back between batches. Measured on 2 cores: extraction 1.16x faster
            # for images, 1.26x for captions (alternating runs, medians; docs/speed.md).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._ort = ort.InferenceSession(str(path), opts, providers=_providers(cuda))
            self._names = [i.name for i in self._ort.get_inputs()]

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [n for n in self._names if n not in inputs]
        if missing:
            raise DataError(f"{self.path}: the graph takes inputs {self._names}, got {sorted(inputs)}")
        feeds = {n: np.ascontiguousarray(inputs[n].detach().cpu().numpy()) for n in self._names}
        if self.backend == "openvino":
            res = self._compiled(feeds)
            arrays = [res[i] for i in range(len(self.outputs))]
        else:
            arrays = self._ort.run(None, feeds)
        return {k: torch.from_numpy(np.asarray(a, dtype=np.float32)) for k, a in zip(self.outputs, arrays)}


_OPENVINO_LOCK = threading.Lock()
_OPENVINO_CORE: list[Any] = []  # the process's one openvino.Core, once made


def _openvino_compile(path: Path, config: dict[str, Any]) -> Any:
    """``path`` compiled for the CPU by the process's one ``openvino.Core``, kept until the process exits.

    Why one, and never dropped: each Core loads its own CPU plugin, and the plugin swaps the calling
    thread's alternate signal stack for a buffer of its own (for the large signal frames of AMX) that
    its destructor unmaps, putting back the stack it replaced. Two plugins destroyed in the order they
    were created leave the thread pointing at the first one's unmapped buffer, and the next signal
    with a handler (SIGINT, or SIGCHLD once torch's DataLoader has run) kills the process with a
    SIGSEGV the kernel raises when it cannot write the signal frame. One plugin that lives as long as
    the process keeps a valid stack (``tests/test_backends.py`` runs the sequence in a fresh process).
    """
    with _OPENVINO_LOCK:
        if not _OPENVINO_CORE:
            import openvino

            _OPENVINO_CORE.append(openvino.Core())
        return _OPENVINO_CORE[0].compile_model(str(path), "CPU", config)


def _providers(cuda: bool = False) -> list[str]:
    """ONNX Runtime's providers: CPU; CUDA first for an encoder on a GPU when the GPU build is installed."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if cuda else ("CPUExecutionProvider",)
    return [p for p in wanted if p in have] or have


# -- the cache ------------------------------------------------------------------------------------
def cache_root() -> Path:
    return paths.home() / "onnx"


def cache_folder(name: str, key: dict[str, Any]) -> Path:
    """``$UNIALIGN_HOME/onnx/<name>-<digest of key>``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / f"{paths.slug(name)}-{digest}"


def _cached(name: str, key: dict[str, Any]) -> Path | None:
    """The cached graph of ``key`` if its meta.json matches the key and every file its checksum;
    otherwise None, with the entry's meta.json removed (its files go when the new export lands)."""
    folder = cache_folder(name, key)
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = read_json(meta_path)
        ok = meta["key"] == json.loads(json.dumps(key)) and _matches(folder / meta["content"], meta["files"])
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        _note(f"{folder}: cached graph fails its checks (changed or incomplete); exporting it again")
        meta_path.unlink(missing_ok=True)
        return None
    return folder / meta["content"] / meta["model"]


@contextlib.contextmanager
def _new_entry(name: str, key: dict[str, Any]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A fresh temporary folder to write a graph into, and a dict for meta.json's extra fields; on
    success the folder is renamed to the sha256 of its content and meta.json written last (both
    atomic), so a reader sees a complete, checksummed entry or none."""
    folder = cache_folder(name, key)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale(folder)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    extra: dict[str, Any] = {}
    try:
        yield tmp, extra
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        content = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
        final = folder / content
        if final.exists() and _matches(final, files):  # another process wrote the same content first
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(final, ignore_errors=True)  # a copy changed on disk since it was written
            _make_readable(tmp)
            os.replace(tmp, final)
        write_json(folder / "meta.json", {"key": key, "content": content, "model": "model.onnx", "files": files,
                                          "created": time.strftime("%Y-%m-%d %H:%M:%S"), **extra})
        for old in folder.iterdir():  # earlier contents of this key (a failed check, another exporter build)
            if old.is_dir() and old.name != content and not old.name.startswith(".tmp-"):
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _matches(folder: Path, files: dict[str, str]) -> bool:
    """Every file of ``files`` is in ``folder`` with its sha256."""
    return all((folder / f).is_file() and sha256_file(folder / f) == sha for f, sha in files.items())


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private folder; a cache entry is readable like the feature stores beside it."""
    os.chmod(folder, 0o755)
    for f in folder.iterdir():
        os.chmod(f, 0o644)


def _remove_stale(folder: Path) -> None:
    now = time.time()
    for d in folder.glob(".tmp-*"):
        if now - d.stat().st_mtime > STALE_TMP_SECONDS:
            shutil.rmtree(d, ignore_errors=True)


def _export(name: str, key: dict[str, Any], graph: Graph) -> Path:
    """torch.onnx.export (dynamo) of ``graph`` into the cache, checked against torch before it is kept."""
    t0 = time.perf_counter()
    _note(f"exporting {name} (layers {', '.join(graph.outputs)}) to ONNX: once per machine, into {cache_root()}")
    with _new_entry(name, key) as (tmp, meta):
        path = tmp / "model.onnx"
        big = sum(p.numel() * p.element_size() for p in graph.module.parameters()) > EXTERNAL_DATA_BYTES
        graph.module.eval()
        with torch.inference_mode(False), torch.no_grad(), _quiet_exporter():
            torch.onnx.export(graph.module, tuple(graph.inputs.values()), str(path), input_names=list(graph.inputs),
                              output_names=list(graph.outputs), dynamic_shapes=_dynamic_shapes(graph),
                              opset_version=OPSET, dynamo=True, external_data=big, optimize=True, verbose=False)
        meta["check"] = check_agreement(graph, path)
        meta["export_seconds"] = round(time.perf_counter() - t0, 2)
    _note(f"exported {name} in {time.perf_counter() - t0:.1f}s")
    cached = _cached(name, key)
    assert cached is not None, "a graph just written must pass its own checks"
    return cached


def _quantize(name: str, key: dict[str, Any], fp32: Path) -> Path:
    """ONNX Runtime dynamic int8 quantisation of the MatMul/Gemm weights of the fp32 graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    _note(f"quantising {name} to int8 (dynamic, MatMul/Gemm weights): once per machine")
    with _new_entry(name, key) as (tmp, meta):
        # ONNX Runtime's preparation: ONNX shape inference and graph optimisation. Its symbolic shape
        # inference is skipped: it stops with "Incomplete symbolic shape inference" on the dynamo
        # exporter's dynamic-shape graphs (and leaves a temporary file in the working directory).
        pre = tmp / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(str(pre), str(tmp / "model.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"])
        pre.unlink()
        meta["source"] = str(fp32)
    cached = _cached(name, key)
    assert cached is not None, "a graph just written must pass its own checks"
    return cached


def _dynamic_shapes(graph: Graph) -> tuple[dict[int, Any], ...]:
    dims: dict[str, Any] = {}
    shapes = []
    for n in graph.inputs:
        axes = {}
        for axis, dim in graph.dynamic.get(n, {}).items():
            if dim not in dims:
                bound = {"max": graph.max_sizes[dim]} if dim in graph.max_sizes else {}
                dims[dim] = torch.export.Dim(dim, min=1, **bound)
            axes[axis] = dims[dim]
        shapes.append(axes)
    return tuple(shapes)


def check_agreement(graph: Graph, path: Path) -> dict[str, float]:
    """Run the exported file on the example inputs and compare with the torch module: the smallest
    per-row cosine and the largest absolute difference over all outputs. Refuses an export that
    disagrees (cosine below ``AGREEMENT_COSINE`` or a difference above ``AGREEMENT_ATOL`` times the
    output's scale): a backend is used only where its features are the torch features."""
    with torch.inference_mode():
        ref = graph.module(*graph.inputs.values())
    got = _Session("onnx", path, list(graph.outputs))(dict(graph.inputs))
    worst_cos, worst_diff = 1.0, 0.0
    for name, r in zip(graph.outputs, ref):
        r = r.detach().float().cpu()
        g = got[name]
        cos = float(torch.nn.functional.cosine_similarity(g, r, dim=1, eps=1e-12).min())
        diff = float((g - r).abs().max())
        scale = max(1.0, float(r.abs().max()))
        if not (cos >= AGREEMENT_COSINE and diff <= AGREEMENT_ATOL * scale):
            raise ConfigError(f"{path}: the ONNX export's {name!r} output disagrees with PyTorch (cosine {cos:.6f}, "
                              f"max abs diff {diff:.2e}); run this encoder with backend=torch")
        worst_cos, worst_diff = min(worst_cos, cos), max(worst_diff, diff)
    return {"min_cosine": worst_cos, "max_abs_diff": worst_diff}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter logs a warning per missing torchvision op and prints its stages; an export
    the user did not ask for by name should show one line, not a page."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices of the exporter's own internals
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _note(message: str) -> None:
    """A line on stderr for the rare slow steps (an export, a re-export): seconds of silence otherwise."""
    sys.stderr.write(f"unialign: {message}\n")
    sys.stderr.flush()


__all__ = ["AGREEMENT_ATOL", "AGREEMENT_COSINE", "BACKEND_OPTIONS", "BACKENDS", "without_backend", "Graph", "QUANTIZATIONS", "Runtime", "cache_folder",
           "cache_root", "check_agreement", "missing_packages", "resolve_backend"]
