"""Reading audio files into what audio encoders take: mono float32 waveforms at the encoder's rate.

One loader for every audio encoder, used by feature extraction's DataLoader workers and by the model's
``encode``, so a clip is decoded the same way everywhere:

- decoded with soundfile (libsndfile: WAV, FLAC, OGG, ...), every channel mixed down to mono (the mean);
- resampled to the encoder's rate with soxr (its "HQ" filter; deterministic, so reruns are bit-identical);
- cut or padded to a fixed number of samples (:func:`fit_length`), so a batch stacks into one tensor and
  an encoder trained on fixed windows (1.5 s for EfficientWord-Net, 3 s for musicnn) sees one.

Every unreadable input raises :class:`~unialign.errors.AudioLoadError` naming the file and why: missing,
a folder, 0 bytes, not audio, no samples, NaN/Inf samples. soundfile and soxr are imported when a file is
read (``pip install unialign[audio]``), so importing the core needs neither.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import AudioLoadError, ConfigError
from .media import open_source

PADS = ("center", "start", "repeat")  # where silence goes (or the clip repeated) when a clip is short


def load_audio(source: str | os.PathLike | bytes, rate: int, name: str | None = None) -> np.ndarray:
    """A mono float32 waveform at ``rate`` Hz of an audio file (a path, or the bytes of an upload)."""
    try:
        import soundfile as sf
    except ImportError:
        raise ConfigError("reading audio needs soundfile: pip install 'unialign[audio]'") from None
    where, fh = open_source(source, name, AudioLoadError, "an audio file")
    try:
        wave, sr = sf.read(fh, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises LibsndfileError / RuntimeError / TypeError for bad files
        raise AudioLoadError(where, f"not a readable audio file ({type(e).__name__}: {e})") from None
    if wave.shape[0] == 0:
        raise AudioLoadError(where, "holds no audio samples")
    if not np.isfinite(wave).all():
        raise AudioLoadError(where, "holds NaN or Inf samples")
    return resample(wave.mean(axis=1), int(sr), int(rate))


def resample(wave: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """``wave`` (mono) from ``rate_in`` to ``rate_out`` Hz with soxr's HQ filter (a copy when equal)."""
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if rate_in == rate_out:
        return wave.copy()
    import soxr

    return np.asarray(soxr.resample(wave, rate_in, rate_out, quality="HQ"), dtype=np.float32)


def fit_length(wave: np.ndarray, samples: int, pad: str = "center") -> np.ndarray:
    """Exactly ``samples`` samples: a long clip keeps its start (``pad=start``) or its middle (``center``,
    ``repeat``); a short one is zero-padded on both sides (``center``: a spoken word stays in the middle
    of the window, as EfficientWord-Net was trained), after its end (``start``), or tiled (``repeat``:
    musicnn's training padding, so a short note fills its 3 s window)."""
    if pad not in PADS:
        raise ConfigError(f"pad={pad!r}; accepted: {', '.join(PADS)}")
    n = len(wave)
    if n >= samples:
        off = 0 if pad == "start" else (n - samples) // 2
        return wave[off : off + samples].copy()
    if pad == "repeat":
        return np.tile(wave, -(-samples // n))[:samples].copy()
    before = (samples - n) // 2 if pad == "center" else 0
    out = np.zeros(samples, dtype=np.float32)
    out[before : before + n] = wave
    return out


def mel_filterbank(rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Slaney-style mel filterbank (n_mels, 1 + n_fft // 2), float32: librosa's ``filters.mel`` defaults
    (Slaney's mel scale, linear below 1 kHz, triangles normalised to unit area), written out here because
    importing librosa costs seconds (scipy.signal) in every worker; tests/test_audio.py checks it
    against librosa where installed."""
    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, dtype=np.float64)
        return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), f / (200.0 / 3))

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), (200.0 / 3) * m)

    fmax = rate / 2 if fmax is None else fmax
    fft_freqs = np.linspace(0, rate / 2, 1 + n_fft // 2)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fdiff, ramps = np.diff(mel_f), mel_f[:, None] - fft_freqs[None, :]
    lower, upper = -ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper)) * (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return weights.astype(np.float32)


@dataclass(frozen=True)
class AudioLoader:
    """Picklable ``path | bytes | waveform -> tensor`` run in DataLoader workers: :func:`load_audio` at
    ``rate``, :func:`fit_length` to ``samples``, then ``frontend`` (waveform -> features computed in the
    worker, e.g. EfficientWord-Net's filterbank) when the encoder has one. A 1-D array or tensor is taken
    as a waveform already at ``rate``."""

    rate: int
    samples: int
    pad: str = "center"
    frontend: Callable[[np.ndarray], np.ndarray] | None = None

    def __call__(self, item: Any) -> torch.Tensor:
        if isinstance(item, (str, bytes, bytearray, os.PathLike)):
            wave = load_audio(item, self.rate)
        elif isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 1:
            wave = np.asarray(item.detach().cpu() if isinstance(item, torch.Tensor) else item, dtype=np.float32)
            if not len(wave) or not np.isfinite(wave).all():
                raise AudioLoadError("waveform", "empty or holds NaN/Inf samples")
        else:
            raise AudioLoadError(type(item).__name__, "an audio input is a file path, bytes or a 1-D waveform")
        wave = fit_length(wave, self.samples, self.pad)
        feats = self.frontend(wave) if self.frontend is not None else wave
        return torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))


def write_wav(path: str | os.PathLike, wave: np.ndarray, rate: int) -> Path:
    """A mono 16-bit PCM WAV (what the dataset builders and tests write)."""
    import soundfile as sf

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(p), np.asarray(wave, dtype=np.float32), int(rate), format="WAV", subtype="PCM_16")
    return p


__all__ = ["AudioLoader", "PADS", "fit_length", "load_audio", "mel_filterbank", "resample", "write_wav"]
