"""Spoken digits and letters: synthetic voices (espeak-ng) to train on, real human recordings to test on.

Why: a speech-text set must be tested on real speech, and no synthetic voice may be in its test set. The
47 items (the numbers 0-20 and the letters a-z) are spoken by many espeak-ng voices (8 English accents x
12 voice variants, Debian ``espeak-ng``, GPL-3, used as a tool: its output is data), and the same 47 items
were recorded by a human speaker for Asterisk's prompts (Debian ``asterisk-core-sounds-en-wav``,
CC-BY-SA-3.0, files ``digits/<n>.wav`` and ``letters/<x>.wav``, 8 kHz): the test set.

A synthetic voice speaks every word at one rate and pitch, and a map fitted on such clips learns that
voice's monotony as part of the word. Each clip therefore gets its own speaking rate (130-210 words per
minute) and base pitch (25-75 of espeak's 0-99), drawn from a generator seeded by the clip's name (so a
rebuild writes the same clips), as TTS-trained speech models randomise prosody. Measured on the real
recordings (docs/audio.md): the linear head, 0.54 +- 0.03 with 4 variants at fixed prosody, reaches
0.64 +- 0.05 with 12 variants and this jitter (without the jitter 0.57, one seed).

Records: one per (item, voice): ``id`` ``"<voice>/<item>"``, ``concept`` the item (``"7"``, ``"b"``),
``label`` its words (``"seven"``, ``"the letter b"``), ``style`` the voice (``"en-us+m3"``, or
``"human"`` for the recordings), ``audio`` the WAV (espeak's 22.05 kHz, Asterisk's 8 kHz: the loader
resamples), ``text`` the label and "someone saying <label>", plus ``source`` (espeak | asterisk) and,
for espeak clips, ``speed`` and ``pitch``.

The protocol (``meta["protocol"]``): every item in every split (``concepts: shared``); training on the 96
voices of espeak's default formant synthesiser; validation on 8 voices of its Klatt synthesiser (one per
accent), a voice *source* training never heard, as the image protocol validates on a held-out drawing
style: voices of the training synthesiser score 98-100 % for nearly every recipe and cannot choose
between them; test on the human recordings. A run that sets ``data.test_styles`` to held-out espeak
voices measures held-out synthetic voices instead.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
from multiprocessing import Pool
from pathlib import Path
from typing import Sequence

from unialign import paths
from unialign.errors import ConfigError, DataError
from unialign.io import atomic_path

from .records import Dataset

ASTERISK = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
ITEMS = [str(i) for i in range(21)] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
KLATT = ("klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6")
TRAIN_VOICES = tuple(f"{a}+{v}" for a in ACCENTS for v in VARIANTS)  # espeak's default formant synthesiser
VAL_VOICES = tuple(f"{a}+{KLATT[i % len(KLATT)]}" for i, a in enumerate(ACCENTS))  # its Klatt synthesiser
VOICES = TRAIN_VOICES + VAL_VOICES
SPEEDS, PITCHES = (130, 210), (25, 75)  # espeak-ng -s (words per minute) and -p (0-99) ranges of the jitter
HUMAN = "human"
FORMAT = 2


def label(item: str) -> str:
    """What an item is called in text: "seven", "the letter b"."""
    return NUMBERS[int(item)] if item.isdigit() else f"the letter {item}"


def asterisk_file(item: str) -> Path:
    return ASTERISK / ("digits" if item.isdigit() else "letters") / f"{item}.wav"


def prosody(voice: str, item: str) -> tuple[int, int]:
    """The (rate, pitch) of one clip: seeded by its name, so the same in every build and every order."""
    rng = random.Random(f"{voice}/{item}")
    return rng.randint(*SPEEDS), rng.randint(*PITCHES)


def protocol(voices: Sequence[str]) -> dict[str, object]:
    """Train on the default synthesiser's voices, validate on the Klatt voices (:data:`VAL_VOICES`; a set
    built without them validates on every 8th voice), test on the human recordings."""
    val = [v for v in voices if v in VAL_VOICES] or [v for i, v in enumerate(voices) if i % 8 == 7]
    return {"concepts": "shared", "train_styles": [v for v in voices if v not in val], "val_styles": val,
            "test_styles": [HUMAN]}


def _speak(job: tuple[str, str, str]) -> str | None:
    """espeak-ng writes one item in one voice, at the clip's rate and pitch, to a WAV (``-w``: ``--stdout``
    writes a broken header)."""
    voice, item, dest = job
    text = item if item.isdigit() else f'<say-as interpret-as="characters">{item}</say-as>'
    speed, pitch = prosody(voice, item)
    with atomic_path(dest) as tmp:
        done = subprocess.run(["espeak-ng", "-m", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(tmp), text],
                              capture_output=True, text=True)
        if done.returncode != 0 or not tmp.stat().st_size:
            return f"espeak-ng -v {voice} {item!r}: {done.stderr.strip() or 'no output'}"
    return None


def build_spoken(voices: Sequence[str] = VOICES, items: Sequence[str] = ITEMS, root: str | os.PathLike | None = None,
                 force: bool = False, workers: int | None = None) -> Dataset:
    """Build (or load, when built with the same voices and items) the spoken-items set."""
    voices, items = list(voices), list(items)
    bad = [i for i in items if i not in ITEMS]
    if bad or not items or not voices:
        raise ConfigError(f"spoken: items are among {ITEMS}; got {bad or 'none'} (and at least one voice)")
    if shutil.which("espeak-ng") is None or not ASTERISK.is_dir():
        raise ConfigError("spoken needs espeak-ng and the Asterisk recordings: apt-get install espeak-ng "
                          "asterisk-core-sounds-en-wav (scripts/setup_audio.sh)")
    out = Path(root) if root is not None else paths.datasets_dir() / "spoken"
    if not force and (out / "dataset.json").exists():
        ds = Dataset.load(out)
        if ds.meta.get("format") == FORMAT and ds.meta.get("voices") == voices and ds.meta.get("items") == items:
            return ds
    wav = f"wav{FORMAT}"  # a folder per format: clips of an older build (other prosody) are never reused
    jobs = [(v, it, str(out / wav / v / f"{it}.wav")) for v in voices for it in items
            if force or not (out / wav / v / f"{it}.wav").exists()]  # resumes an interrupted build
    with Pool(workers or max(1, min(4, (os.cpu_count() or 2)))) as pool:
        errors = [e for e in pool.imap(_speak, jobs, chunksize=8) if e]
    if errors:
        raise DataError(f"spoken: {len(errors)} clip(s) failed, e.g. {errors[0]}")
    records = []
    for v in voices:
        for it in items:
            speed, pitch = prosody(v, it)
            records.append({"id": f"{v}/{it}", "concept": it, "label": label(it), "style": v,
                            "audio": f"{wav}/{v}/{it}.wav", "text": [label(it), f"someone saying {label(it)}"],
                            "source": "espeak", "speed": speed, "pitch": pitch})
    for it in items:
        f = asterisk_file(it)
        if not f.exists():
            raise DataError(f"spoken: the Asterisk recording {f} is missing (reinstall asterisk-core-sounds-en-wav)")
        records.append({"id": f"{HUMAN}/{it}", "concept": it, "label": label(it), "style": HUMAN, "audio": str(f),
                        "text": [label(it), f"someone saying {label(it)}"], "source": "asterisk"})
    meta = {"format": FORMAT, "voices": voices, "items": items, "protocol": protocol(voices),
            "source": "espeak-ng voices (synthetic) + asterisk-core-sounds-en-wav (one human speaker, CC-BY-SA-3.0)"}
    ds = Dataset("spoken", records, out, meta=meta)
    ds.save(out)
    return ds


__all__ = ["HUMAN", "ITEMS", "TRAIN_VOICES", "VAL_VOICES", "VOICES", "build_spoken", "label", "prosody", "protocol"]
