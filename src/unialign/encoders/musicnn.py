"""musicnn (Pons & Serra, 2019) music-tagging encoders in PyTorch, reading the TF1 checkpoints that ship
in the ``musicnn`` PyPI package: ``musicnn-mtt`` (MagnaTagATune, 50 tags) and ``musicnn-msd`` (Million
Song Dataset, 50 tags).

Why a port: the ``musicnn`` package needs TensorFlow 1.x and numpy < 1.17, which do not install here, but
its weights (``musicnn/MTT_musicnn/.index`` + ``.data-*``, 9.5 MB) are plain float tensors that
:func:`~unialign.encoders.tfcheckpoint.read_checkpoint` reads. The network below follows
``musicnn/models.py`` (``build_musicnn``) layer for layer:

- input: log-mel patches, librosa's mel spectrogram (16 kHz, n_fft 512, hop 256, 96 Slaney mels, power
  2) rounded to float16 as musicnn does, then ``log10(1 + 10000 x)``; 3 s = 187 frames;
- front-end: batch norm of the input, then "timbral" convolutions (7 x 38 and 7 x 67 mel bins, 204 filters
  each) and "temporal" ones (128 / 64 / 32 frames x 1 bin, 51 filters each, TF "same" padding), each
  ReLU -> batch norm -> max over frequency: 561 channels per frame;
- mid-end: three 1-D convolutions over time (7 frames, 64 filters, ReLU -> batch norm), the 2nd and 3rd
  residual; the front-end and the three outputs are concatenated (753 channels);
- back-end: max and mean over time (753 + 753), batch norm, dense 200 (ReLU, batch norm:
  "penultimate"), dense 50 -> tag logits. TF's batch-norm epsilon (0.001) is used.

There is no TensorFlow reference output here, so the port is checked by what it predicts: the test and
docs/audio.md show its top MagnaTagATune tags for rendered General-MIDI instruments (piano -> "piano",
violin -> "violin"/"strings", ...).

Layers (each pooled over the window): ``final`` = max-pool + mean-pool over time (1506, the features the
musicnn authors use for transfer learning), ``timbral`` (408) and ``temporal`` (153) front-end channels,
``cnn1``..``cnn3`` (64 each), ``mean_pool`` / ``max_pool`` (753 each), ``penultimate`` (200) and
``taggram`` (50 tag probabilities). Options: ``seconds`` (window length, default 3: the length it was
trained on), ``pad`` (``repeat``, musicnn's own padding of short clips; ``center``, ``start``).
"""
from __future__ import annotations

import hashlib
import os
import importlib.util
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..audio import mel_filterbank
from ..errors import ConfigError
from .audio import AudioEncoder
from .base import FINAL
from .tfcheckpoint import read_checkpoint

RATE, N_FFT, HOP, N_MELS = 16000, 512, 256, 96
BN_EPS = 1e-3  # tf.compat.v1.layers.batch_normalization's default epsilon
VARIANTS = {"musicnn-mtt": "MTT_musicnn", "musicnn-msd": "MSD_musicnn"}
MTT_LABELS = ["guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast", "piano",
              "ambient", "beat", "violin", "vocal", "synth", "female", "indian", "opera", "male", "singing", "vocals",
              "no vocals", "harpsichord", "loud", "quiet", "flute", "woman", "male vocal", "no vocal", "pop", "soft",
              "sitar", "solo", "man", "classic", "choir", "voice", "new age", "dance", "male voice", "female vocal",
              "beats", "harp", "cello", "no voice", "weird", "country", "metal", "female voice", "choral"]
MSD_LABELS = ["rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s",
              "alternative rock", "jazz", "beautiful", "metal", "chillout", "male vocalists", "classic rock", "soul",
              "indie rock", "Mellow", "electronica", "80s", "folk", "90s", "chill", "instrumental", "punk", "oldies",
              "blues", "hard rock", "ambient", "acoustic", "experimental", "female vocalist", "guitar", "Hip-Hop",
              "70s", "party", "country", "easy listening", "sexy", "catchy", "funk", "electro", "heavy metal",
              "Progressive rock", "60s", "rnb", "indie pop", "sad", "House", "happy"]
DEFAULTS: dict[str, Any] = {"seconds": 3.0, "pad": "repeat"}


def checkpoint_prefix(folder: str) -> str:
    """``<site-packages>/musicnn/<folder>/`` (the checkpoint's files are named ``.index`` / ``.data-*``)."""
    spec = importlib.util.find_spec("musicnn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("musicnn encoders read the weights shipped in the musicnn package: "
                          "pip install --no-deps musicnn (its TensorFlow dependency is not needed)")
    return str(Path(list(spec.submodule_search_locations)[0]) / folder) + os.sep


def mel_filters() -> torch.Tensor:
    """The Slaney mel filterbank (96 x 257) librosa computed musicnn's features with."""
    return torch.from_numpy(mel_filterbank(RATE, N_FFT, N_MELS))


class LogMel(nn.Module):
    """Waveforms (B, samples) -> musicnn's log-mel input (B, frames, 96)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.register_buffer("mel", mel_filters(), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wave.float(), N_FFT, HOP, window=self.window, center=True, pad_mode="constant",
                          return_complex=True).abs().pow(2)
        mel = (self.mel @ spec).half().float()  # musicnn stores its spectrograms as float16
        return torch.log10(10000 * mel + 1).transpose(1, 2)


def _bn(n: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(n, eps=BN_EPS)


class MusicnnNet(nn.Module):
    """``build_musicnn`` of musicnn/models.py (timbral + temporal front-end, dense mid-end, pooled back-end)."""

    def __init__(self, n_tags: int = 50, midend: int = 64, backend: int = 200):
        super().__init__()
        self.melspec = LogMel()
        self.bn_in = nn.BatchNorm2d(1, eps=BN_EPS)
        self.timbral = nn.ModuleList(nn.Conv2d(1, 204, (7, int(f * N_MELS))) for f in (0.4, 0.7))
        self.timbral_bn = nn.ModuleList(_bn(204) for _ in range(2))
        self.temporal = nn.ModuleList(nn.Conv2d(1, 51, (k, 1)) for k in (128, 64, 32))
        self.temporal_bn = nn.ModuleList(_bn(51) for _ in range(3))
        self.mid = nn.ModuleList(nn.Conv1d(561 if i == 0 else midend, midend, 7, padding=3) for i in range(3))
        self.mid_bn = nn.ModuleList(_bn(midend) for _ in range(3))
        self.pool_bn = _bn(2 * (561 + 3 * midend))
        self.dense = nn.Linear(2 * (561 + 3 * midend), backend)
        self.dense_bn = _bn(backend)
        self.logits = nn.Linear(backend, n_tags)

    def forward(self, wave: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.bn_in(self.melspec(wave).unsqueeze(1))  # (B, 1, T, 96)
        timbral = [bn(F.relu(conv(F.pad(x, (0, 0, 3, 3)))).amax(3)) for conv, bn in zip(self.timbral, self.timbral_bn)]
        temporal = []
        for conv, bn in zip(self.temporal, self.temporal_bn):
            k = conv.kernel_size[0]  # TF "same": (k - 1) // 2 frames before, the rest after
            temporal.append(bn(F.relu(conv(F.pad(x, (0, 0, (k - 1) // 2, k // 2)))).amax(3)))
        front = torch.cat(timbral + temporal, 1)  # (B, 561, T)
        mids, h = [], front
        for i, (conv, bn) in enumerate(zip(self.mid, self.mid_bn)):
            out = bn(F.relu(conv(h)))
            h = out if i == 0 else out + h
            mids.append(h)
        feats = torch.cat([front, *mids], 1)  # (B, 753, T)
        max_pool, mean_pool = feats.amax(2), feats.mean(2)
        pooled = torch.stack([max_pool, mean_pool], 2).flatten(1)  # TF flattens (753, 2): max and mean interleaved
        penultimate = self.dense_bn(F.relu(self.dense(self.pool_bn(pooled))))
        return {FINAL: pooled, "timbral": torch.cat(timbral, 1).mean(2), "temporal": torch.cat(temporal, 1).mean(2),
                "cnn1": mids[0].mean(2), "cnn2": mids[1].mean(2), "cnn3": mids[2].mean(2), "mean_pool": mean_pool,
                "max_pool": max_pool, "penultimate": penultimate, "taggram": torch.sigmoid(self.logits(penultimate))}

    def load_tf(self, weights: dict[str, np.ndarray]) -> None:
        """Copy the TF variables in (TF names layers in creation order: conv2d, conv2d_1, ...; HWIO kernels)."""
        t = lambda name: torch.from_numpy(np.array(weights[name], dtype=np.float32))  # noqa: E731
        convs = [*self.timbral, *self.temporal, *self.mid]
        for i, conv in enumerate(convs):
            name = "conv2d" + (f"_{i}" if i else "")
            k = t(f"{name}/kernel")  # (kh, kw, in, out)
            conv.weight.copy_(k.permute(3, 2, 0, 1) if conv.weight.ndim == 4 else k[:, :, 0, :].permute(2, 1, 0))
            conv.bias.copy_(t(f"{name}/bias"))
        bns = [self.bn_in, *self.timbral_bn, *self.temporal_bn, *self.mid_bn, self.pool_bn, self.dense_bn]
        for i, bn in enumerate(bns):
            name = "batch_normalization" + (f"_{i}" if i else "")
            bn.weight.copy_(t(f"{name}/gamma"))
            bn.bias.copy_(t(f"{name}/beta"))
            bn.running_mean.copy_(t(f"{name}/moving_mean"))
            bn.running_var.copy_(t(f"{name}/moving_variance"))
        for lin, name in ((self.dense, "dense"), (self.logits, "dense_1")):
            lin.weight.copy_(t(f"{name}/kernel").T)
            lin.bias.copy_(t(f"{name}/bias"))


class Layers(nn.Module):
    """wave -> the requested layers, as a tuple: the graph the encoder runs."""

    def __init__(self, net: MusicnnNet, layers: Sequence[str]):
        super().__init__()
        self.net, self.layers = net, list(layers)

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.net(wave)
        return tuple(out[k] for k in self.layers)


class MusicnnEncoder(AudioEncoder):
    """A musicnn tagger as a frozen audio encoder (see the module doc)."""

    def __init__(self, name: str, device: str | torch.device | None = None, **options: Any):
        from . import check_options, format_spec

        super().__init__()
        if name not in VARIANTS:
            raise ConfigError(f"unknown musicnn model {name!r}; accepted: {', '.join(VARIANTS)}")
        opts = check_options(name, options, DEFAULTS)
        self.seconds = float(opts["seconds"])
        if not 1.0 <= self.seconds <= 30.0:
            raise ConfigError(f"{name}: seconds={self.seconds}; between 1 and 30 (its temporal filters span 128 frames = 2 s)")
        prefix = checkpoint_prefix(VARIANTS[name])
        weights = read_checkpoint(prefix)
        self.net = MusicnnNet()
        with torch.no_grad():
            self.net.load_tf(weights)
        self.labels = MTT_LABELS if name == "musicnn-mtt" else MSD_LABELS
        self.set_loader(RATE, int(round(self.seconds * RATE)), str(opts["pad"]))
        self.spec = format_spec(name, opts, DEFAULTS)
        self.dim = 1506
        self.layer_dims = {FINAL: 1506, "timbral": 408, "temporal": 153, "cnn1": 64, "cnn2": 64, "cnn3": 64,
                           "mean_pool": 753, "max_pool": 753, "penultimate": 200, "taggram": 50}
        h = hashlib.sha256()
        for k in sorted(weights):
            h.update(k.encode() + np.ascontiguousarray(weights[k]).tobytes())
        self.version = f"{VARIANTS[name]}-{h.hexdigest()[:12]}"
        self.freeze(device)

    def graph_module(self, layers: Sequence[str]) -> nn.Module:
        return Layers(self.net, layers)

    @torch.inference_mode()
    def tags(self, batch: torch.Tensor, top: int = 3) -> list[list[tuple[str, float]]]:
        """The ``top`` tags (name, probability) of each clip of a loaded batch: how the port is checked."""
        probs = self.features(batch, ["taggram"]).cpu()
        vals, idx = probs.topk(top, dim=1)
        return [[(self.labels[int(i)], float(v)) for v, i in zip(vr, ir)] for vr, ir in zip(vals, idx)]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "rate": RATE, "seconds": self.seconds, "layers": self.layer_dims}


__all__ = ["MTT_LABELS", "MSD_LABELS", "MusicnnEncoder", "MusicnnNet"]
