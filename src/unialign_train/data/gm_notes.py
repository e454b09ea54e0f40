"""General-MIDI instrument notes rendered offline with fluidsynth: the project's music-text set.

Why: every one of the 128 General-MIDI instruments can be played at any pitch by fluidsynth with the
FluidR3 soundfont (Debian ``fluidsynth`` + ``fluid-soundfont-gm``; the soundfont is MIT-licensed), so a
music set with real instrument names as text, and pitches to hold out, is built in seconds with no
download. One long MIDI file holding every note is rendered once and sliced (one fluidsynth start per
note would cost 0.7 s each): note ``i`` starts at ``i * SLOT`` seconds and is held ``NOTE`` seconds, the
rest of its slot being its release.

Records: one per (instrument, pitch): ``id`` ``"<program>/<pitch>"``, ``concept`` the program number
(``"000"``), ``label`` the GM name in lower case (``"acoustic grand piano"``), ``style`` the pitch
(``"C4"``), ``audio`` the note's WAV (16 kHz mono), ``text`` the name and "<name>, <family>", plus
``program``, ``pitch``, ``family``. Notes the soundfont has no sample for render silent and are left
out (listed in ``meta["silent_notes_left_out"]``).

The protocol (``meta["protocol"]``) holds pitches out: every instrument is in every split, training
on five pitches, validation on a sixth, test on two more (``concepts: shared``); a run that sets
``data.concepts: split`` holds instruments out too (zero-shot on instruments never trained on).
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from unialign import paths
from unialign.audio import write_wav
from unialign.errors import ConfigError, DataError
from unialign.io import atomic_path

from .records import Dataset

RATE = 16000
SLOT, NOTE = 1.5, 1.0  # seconds per note slot, seconds the key is held
SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")
PITCHES = (48, 52, 55, 60, 64, 67, 72, 76)  # C3 E3 G3 C4 E4 G4 C5 E5
PROTOCOL = {"concepts": "shared", "train_styles": ["C3", "G3", "C4", "E4", "C5"], "val_styles": ["E3"],
            "test_styles": ["G4", "E5"]}
FORMAT = 1
FAMILIES = ["piano", "chromatic percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass", "reed",
            "pipe", "synth lead", "synth pad", "synth effects", "ethnic", "percussive", "sound effects"]
GM_NAMES = [
    "Acoustic Grand Piano", "Bright Acoustic Piano", "Electric Grand Piano", "Honky-tonk Piano", "Electric Piano 1",
    "Electric Piano 2", "Harpsichord", "Clavinet", "Celesta", "Glockenspiel", "Music Box", "Vibraphone", "Marimba",
    "Xylophone", "Tubular Bells", "Dulcimer", "Drawbar Organ", "Percussive Organ", "Rock Organ", "Church Organ",
    "Reed Organ", "Accordion", "Harmonica", "Tango Accordion", "Acoustic Guitar (nylon)", "Acoustic Guitar (steel)",
    "Electric Guitar (jazz)", "Electric Guitar (clean)", "Electric Guitar (muted)", "Overdriven Guitar",
    "Distortion Guitar", "Guitar Harmonics", "Acoustic Bass", "Electric Bass (finger)", "Electric Bass (pick)",
    "Fretless Bass", "Slap Bass 1", "Slap Bass 2", "Synth Bass 1", "Synth Bass 2", "Violin", "Viola", "Cello",
    "Contrabass", "Tremolo Strings", "Pizzicato Strings", "Orchestral Harp", "Timpani", "String Ensemble 1",
    "String Ensemble 2", "Synth Strings 1", "Synth Strings 2", "Choir Aahs", "Voice Oohs", "Synth Voice",
    "Orchestra Hit", "Trumpet", "Trombone", "Tuba", "Muted Trumpet", "French Horn", "Brass Section", "Synth Brass 1",
    "Synth Brass 2", "Soprano Sax", "Alto Sax", "Tenor Sax", "Baritone Sax", "Oboe", "English Horn", "Bassoon",
    "Clarinet", "Piccolo", "Flute", "Recorder", "Pan Flute", "Blown Bottle", "Shakuhachi", "Whistle", "Ocarina",
    "Lead 1 (square)", "Lead 2 (sawtooth)", "Lead 3 (calliope)", "Lead 4 (chiff)", "Lead 5 (charang)",
    "Lead 6 (voice)", "Lead 7 (fifths)", "Lead 8 (bass + lead)", "Pad 1 (new age)", "Pad 2 (warm)",
    "Pad 3 (polysynth)", "Pad 4 (choir)", "Pad 5 (bowed)", "Pad 6 (metallic)", "Pad 7 (halo)", "Pad 8 (sweep)",
    "FX 1 (rain)", "FX 2 (soundtrack)", "FX 3 (crystal)", "FX 4 (atmosphere)", "FX 5 (brightness)", "FX 6 (goblins)",
    "FX 7 (echoes)", "FX 8 (sci-fi)", "Sitar", "Banjo", "Shamisen", "Koto", "Kalimba", "Bagpipe", "Fiddle", "Shanai",
    "Tinkle Bell", "Agogo", "Steel Drums", "Woodblock", "Taiko Drum", "Melodic Tom", "Synth Drum", "Reverse Cymbal",
    "Guitar Fret Noise", "Breath Noise", "Seashore", "Bird Tweet", "Telephone Ring", "Helicopter", "Applause",
    "Gunshot"]
NOTE_NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]


def note_name(pitch: int) -> str:
    """MIDI pitch -> scientific pitch name (60 -> "C4")."""
    return f"{NOTE_NAMES[pitch % 12]}{pitch // 12 - 1}"


def midi_file(notes: Sequence[tuple[int, int]], slot: float = SLOT, hold: float = NOTE, velocity: int = 100) -> bytes:
    """A type-0 Standard MIDI File playing ``(program, pitch)`` notes one after another on channel 0:
    program change at the start of each slot, key held ``hold`` seconds (480 ticks = 0.5 s at 120 bpm)."""
    tpq, tick_s = 480, 960  # ticks per quarter note; ticks per second at the default 120 bpm
    events, now = bytearray(), 0

    def delta(t: int) -> bytes:
        out = [t & 0x7F]
        t >>= 7
        while t:
            out.append(0x80 | (t & 0x7F))
            t >>= 7
        return bytes(reversed(out))

    for i, (program, pitch) in enumerate(notes):
        start, stop = round(i * slot * tick_s), round((i * slot + hold) * tick_s)
        events += delta(start - now) + bytes([0xC0, program])
        events += delta(0) + bytes([0x90, pitch, velocity])
        events += delta(stop - start) + bytes([0x80, pitch, 0])
        now = stop
    end = round(len(notes) * slot * tick_s)
    events += delta(end - now) + b"\xff\x2f\x00"
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, tpq) + b"MTrk" + struct.pack(">I", len(events)) + bytes(events)


def render(midi: bytes, soundfont: Path, rate: int = RATE) -> np.ndarray:
    """fluidsynth renders ``midi`` offline (no audio device) to a mono float waveform at ``rate``."""
    import soundfile as sf

    exe = shutil.which("fluidsynth")
    if exe is None or not soundfont.exists():
        raise ConfigError("gm-notes needs fluidsynth and the FluidR3 soundfont: apt-get install fluidsynth "
                          "fluid-soundfont-gm (scripts/setup_audio.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        mid, wav = Path(tmp) / "notes.mid", Path(tmp) / "notes.wav"
        mid.write_bytes(midi)
        cmd = [exe, "-ni", "-q", "-g", "0.5", "-r", str(rate), "-F", str(wav), "-T", "wav", str(soundfont), str(mid)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wav.exists():
            raise DataError(f"fluidsynth failed ({done.returncode}): {done.stderr.strip()[-400:]}")
        wave, sr = sf.read(str(wav), dtype="float32", always_2d=True)
    if sr != rate:
        raise DataError(f"fluidsynth wrote {sr} Hz audio, {rate} Hz was asked for")
    return wave.mean(axis=1)


def build_gm_notes(pitches: Sequence[int] = PITCHES, programs: Sequence[int] = tuple(range(128)),
                   root: str | os.PathLike | None = None, force: bool = False) -> Dataset:
    """Build (or load, when built with the same programs and pitches) the rendered-notes dataset."""
    pitches, programs = [int(p) for p in pitches], [int(p) for p in programs]
    if not pitches or any(not 0 <= p < 128 for p in pitches + programs) or not programs:
        raise ConfigError("gm-notes: programs and pitches are MIDI numbers 0..127 (at least one of each)")
    out = Path(root) if root is not None else paths.datasets_dir() / "gm-notes"
    if not force and (out / "dataset.json").exists():
        ds = Dataset.load(out)
        if ds.meta.get("format") == FORMAT and ds.meta.get("pitches") == pitches and ds.meta.get("programs") == programs:
            return ds
    notes = [(prog, p) for prog in programs for p in pitches]
    wave = render(midi_file(notes), SOUNDFONT)
    n = int(SLOT * RATE)
    if len(wave) < len(notes) * n:
        raise DataError(f"gm-notes: fluidsynth rendered {len(wave) / RATE:.1f}s, {len(notes) * SLOT:.1f}s were expected")
    records, silent = [], []
    for i, (prog, p) in enumerate(notes):
        clip = wave[i * n : (i + 1) * n]
        if not np.abs(clip).max() > 1e-4:  # the soundfont has no sample there: a label with no sound, left out
            silent.append(f"{GM_NAMES[prog]} at {note_name(p)}")
            continue
        rel = Path("wav") / f"{prog:03d}" / f"{p:03d}.wav"
        with atomic_path(out / rel) as tmp:
            write_wav(tmp, clip / max(1.0, float(np.abs(clip).max())), RATE)
        name, family = GM_NAMES[prog].lower(), FAMILIES[prog // 8]
        records.append({"id": f"{prog:03d}/{p:03d}", "concept": f"{prog:03d}", "label": name, "style": note_name(p),
                        "audio": str(rel), "text": [name, f"{name}, {family}"], "program": prog, "pitch": p,
                        "family": family})
    styles = {note_name(p) for p in pitches}
    protocol = {k: (v if not isinstance(v, list) else [s for s in v if s in styles]) for k, v in PROTOCOL.items()}
    meta = {"format": FORMAT, "pitches": pitches, "programs": programs, "rate": RATE, "soundfont": str(SOUNDFONT),
            "source": "fluidsynth + fluid-soundfont-gm (FluidR3_GM, MIT)", "silent_notes_left_out": silent}
    if all(protocol[k] for k in ("train_styles", "val_styles", "test_styles")):
        meta["protocol"] = protocol
    ds = Dataset("gm-notes", records, out, meta=meta)
    ds.save(out)
    return ds


__all__ = ["GM_NAMES", "PITCHES", "PROTOCOL", "build_gm_notes", "midi_file", "note_name", "render"]
