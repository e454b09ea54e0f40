"""Audio encoders: a log-mel statistics baseline (``logmel``) and EfficientWord-Net (``eff-word-net``).

Both take fixed-length mono windows made by :class:`unialign.audio.AudioLoader` in the DataLoader
workers (decode, mono mixdown, resample, cut/pad); musicnn lives in :mod:`.musicnn`.

- ``logmel``: the floor every learned audio encoder must beat. The mean and standard deviation over time
  of a log-mel spectrogram (the Slaney filterbank of librosa's defaults, 25 ms Hann windows, 10 ms hop), no learning.
  Options: ``rate`` (16000), ``n_mels`` (64: 128-d features), ``seconds`` (1.5), ``pad`` (center).
  Layers: ``final`` (mean + std), ``mean``, ``std``.
- ``eff-word-net``: EfficientWord-Net 1.0.5's few-shot wake-word model (Apache-2.0), a ResNet-50 trained
  with an ArcFace loss on 1.5 s of 16 kHz speech, as the package ships it: an ONNX file run by ONNX
  Runtime directly (``pip install --no-deps efficientword-net``; its own dependencies such as pyaudio are
  not needed). Its input, the package's 64-band log filterbank (``eff_word_net.audio_utils.logfbank``,
  149 x 64), is computed in the loader workers. The graph's batch size is fixed at 1 (its per-clip
  min-max normalisation reshapes to batch 1), so a batch runs clip by clip. Layers: ``final`` (2048,
  the embedding the package compares), ``layer1``..``layer4`` (256 / 512 / 1024 / 2048: the last ReLU of
  each ResNet stage, mean-pooled over time and frequency; read by adding those tensors to the graph's
  outputs, which needs ``onnx``). Options: ``quantize=int8`` (the package's int8 copy, 22 MB; ``final``
  only: its stages' ReLUs are fused into quantized convolutions), ``pad`` (center).
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..audio import AudioLoader, mel_filterbank
from ..errors import ConfigError, DataError
from .base import FINAL, Encoder

LOGMEL_DEFAULTS: dict[str, Any] = {"rate": 16000, "n_mels": 64, "seconds": 1.5, "pad": "center"}
EWN_DEFAULTS: dict[str, Any] = {"quantize": "none", "pad": "center"}
EWN_RATE, EWN_SECONDS = 16000, 1.5
EWN_FILES = {"none": "slim_93%_accuracy_72.7390%.onnx", "int8": "slim_93%_accuracy_72.7390%_qint8.onnx"}


class LogMelStats(nn.Module):
    """Waveforms (B, samples) -> (mean, std) over time of log(mel power + 1e-6), each (B, n_mels)."""

    def __init__(self, rate: int, n_mels: int):
        super().__init__()
        self.n_fft, self.hop, self.win = 2 ** int(np.ceil(np.log2(0.025 * rate))), int(0.010 * rate), int(0.025 * rate)
        mel = mel_filterbank(rate, self.n_fft, n_mels)
        self.register_buffer("mel", torch.from_numpy(mel).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(self.win), persistent=False)

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec = torch.stft(wave.float(), self.n_fft, self.hop, self.win, window=self.window, center=True,
                          pad_mode="constant", return_complex=True).abs().pow(2)
        logmel = torch.log(self.mel @ spec + 1e-6)  # (B, n_mels, frames)
        return logmel.mean(2), logmel.std(2)


class LogMelLayers(nn.Module):
    def __init__(self, stats: LogMelStats, layers: Sequence[str]):
        super().__init__()
        self.stats, self.layers = stats, list(layers)

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mean, std = self.stats(wave)
        out = {FINAL: torch.cat([mean, std], 1), "mean": mean, "std": std}
        return tuple(out[k] for k in self.layers)


class AudioEncoder(Encoder):
    """An encoder of waveforms: the loader every audio encoder has (decode, resample, mix to mono, fit to
    a fixed window, and an optional frontend, all in the DataLoader workers) and the forward pass of a
    waveform graph (``graph_module`` maps ``wave`` to the layers)."""

    modality = "audio"

    def set_loader(self, rate: int, samples: int, pad: str, frontend: Any = None) -> None:
        """Build the loader and check it once on silence, so a bad ``pad`` (or a frontend that cannot
        import) is an error when the encoder is made, not in a worker."""
        self._loader = AudioLoader(rate, samples, pad, frontend)
        self._loader(np.zeros(1, np.float32))

    def loader(self) -> AudioLoader:
        return self._loader

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor, layers: Sequence[str] = (FINAL,)) -> dict[str, torch.Tensor]:
        self.check_layers(layers)
        return self.run_graph({"wave": batch}, layers)


class LogMelEncoder(AudioEncoder):
    """Log-mel statistics (see the module doc): the no-learning baseline."""

    def __init__(self, name: str = "", device: str | torch.device | None = None, **options: Any):
        from . import check_options, format_spec

        super().__init__()
        if name:
            raise ConfigError(f"logmel takes options only (logmel?n_mels=64), not a name: got logmel{name!r}")
        opts = check_options("logmel", options, LOGMEL_DEFAULTS)
        self.rate, n_mels, self.seconds = int(opts["rate"]), int(opts["n_mels"]), float(opts["seconds"])
        if self.rate < 4000 or not 8 <= n_mels <= 256 or not 0.1 <= self.seconds <= 60:
            raise ConfigError(f"logmel: rate >= 4000, 8 <= n_mels <= 256, 0.1 <= seconds <= 60; got {opts}")
        self.stats = LogMelStats(self.rate, n_mels)
        self.set_loader(self.rate, int(round(self.seconds * self.rate)), str(opts["pad"]))
        self.spec = format_spec("logmel", opts, LOGMEL_DEFAULTS)
        self.dim = 2 * n_mels
        self.layer_dims = {FINAL: self.dim, "mean": n_mels, "std": n_mels}
        self.version = "logmel-1"
        self.freeze(device)

    def graph_module(self, layers: Sequence[str]) -> nn.Module:
        return LogMelLayers(self.stats, layers)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "rate": self.rate, "seconds": self.seconds, "layers": self.layer_dims}


def ewn_features(wave: np.ndarray) -> np.ndarray:
    """EfficientWord-Net's input: the package's own log filterbank of a 1.5 s, 16 kHz window (149 x 64)."""
    from eff_word_net.audio_utils import logfbank

    return logfbank(wave, samplerate=EWN_RATE, winlen=0.025, winstep=0.01, nfilt=64, nfft=512, preemph=0.0)


def ewn_model_path(quantize: str) -> Path:
    spec = importlib.util.find_spec("eff_word_net")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("eff-word-net reads the ONNX model shipped in its package: "
                          "pip install --no-deps efficientword-net")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "resnet_50_arc" / EWN_FILES[quantize]


class EffWordNetEncoder(AudioEncoder):
    """EfficientWord-Net's ResNet-50 ArcFace speech embedder on ONNX Runtime (see the module doc)."""

    backend = "onnx"

    def __init__(self, name: str = "", device: str | torch.device | None = None, **options: Any):
        from . import check_options, format_spec

        super().__init__()
        if name:
            raise ConfigError(f"eff-word-net takes options only (eff-word-net?quantize=int8); got eff-word-net{name!r}")
        opts = check_options("eff-word-net", options, EWN_DEFAULTS)
        if opts["quantize"] not in EWN_FILES:
            raise ConfigError(f"eff-word-net: quantize={opts['quantize']!r}; accepted: {', '.join(EWN_FILES)}")
        self.quantize = str(opts["quantize"])
        self.path = ewn_model_path(self.quantize)
        if not self.path.is_file():
            raise ConfigError(f"eff-word-net: {self.path} is missing; reinstall efficientword-net")
        self.set_loader(EWN_RATE, int(EWN_RATE * EWN_SECONDS), str(opts["pad"]), ewn_features)  # the package's filterbank
        self.spec = format_spec("eff-word-net", opts, EWN_DEFAULTS)
        self.dim = 2048
        self.layer_dims = {FINAL: 2048}
        if self.quantize == "none":  # the int8 graph fuses the stages' ReLUs into quantized convolutions
            self.layer_dims.update({"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048})
        self.version = "efficientword-net-1.0.5-" + hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]
        self._sessions: dict[tuple[str, ...], Any] = {}
        self.freeze("cpu" if device in (None, "auto") else device)

    def session(self, layers: Sequence[str]) -> Any:
        """An ONNX Runtime session whose outputs are ``layers`` (stages added as outputs with onnx),
        made once per layer set, on this process's torch thread count."""
        key = tuple(layers)
        if key not in self._sessions:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = torch.get_num_threads()
            model: Any = str(self.path)
            stages = [l for l in layers if l != FINAL]
            if stages:
                try:
                    import onnx
                except ImportError:
                    raise ConfigError("eff-word-net layers other than final need onnx: pip install 'unialign[onnx]'") from None
                proto = onnx.load(str(self.path))
                for l in stages:
                    proto.graph.output.append(onnx.helper.make_tensor_value_info(stage_output(proto, l), onnx.TensorProto.FLOAT, None))
                model = proto.SerializeToString()
            sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            self._sessions[key] = (sess, [sess.get_outputs()[0].name] + [stage_output_name(sess, l) for l in stages])
        return self._sessions[key]

    def backend_info(self) -> str:
        import onnxruntime as ort

        return f"onnx: onnxruntime {ort.__version__} (cpu, {torch.get_num_threads()} threads, batch 1)"

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor, layers: Sequence[str] = (FINAL,)) -> dict[str, torch.Tensor]:
        """One graph run per clip (the model's batch size is 1); stage maps mean-pooled over (time, freq)."""
        self.check_layers(layers)
        if batch.ndim != 3 or tuple(batch.shape[1:]) != (149, 64):
            raise DataError(f"{self.spec}: takes filterbank batches of shape (N, 149, 64); got {tuple(batch.shape)} "
                            "(use its loader())")
        sess, outputs = self.session(layers)
        stages = [l for l in layers if l != FINAL]
        rows: dict[str, list[np.ndarray]] = {l: [] for l in [FINAL, *stages]}
        x = batch.detach().float().cpu().numpy()
        for clip in x:
            res = sess.run(outputs, {"input": clip[None, None]})
            rows[FINAL].append(res[0][0])
            for l, r in zip(stages, res[1:]):
                rows[l].append(r[0].mean(axis=(1, 2)))
        return {l: torch.from_numpy(np.stack(rows[l])).to(self.device) for l in layers}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "rate": EWN_RATE, "seconds": EWN_SECONDS, "quantize": self.quantize,
                "layers": self.layer_dims}


def stage_output(proto: Any, layer: str) -> str:
    """The last ReLU output of ResNet stage ``layerN`` in the exported graph (the stage's output)."""
    prefix = f"/feature_network/{layer}/"
    names = [n.output[0] for n in proto.graph.node if n.op_type == "Relu" and n.output[0].startswith(prefix)]
    if not names:
        raise DataError(f"eff-word-net: no {layer} in its ONNX graph (another model version?)")
    return names[-1]


def stage_output_name(sess: Any, layer: str) -> str:
    prefix = f"/feature_network/{layer}/"
    return next(o.name for o in sess.get_outputs() if o.name.startswith(prefix))


__all__ = ["AudioEncoder", "EffWordNetEncoder", "LogMelEncoder", "ewn_features"]
