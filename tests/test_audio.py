"""Audio: waveform loading, the three audio encoders (shapes, determinism, musicnn's tag check), the
audio dataset protocols and the kill/resume rule for an audio feature store.

Every clip is synthesised here (sine waves and noise written to WAV) except the musicnn tag check,
which renders three General-MIDI instruments with fluidsynth (skipped where fluidsynth is missing).
No download: the encoders read the weights their pip packages ship.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from faults import run_child, tree
from unialign.audio import fit_length, load_audio, write_wav
from unialign.encoders import load_encoder
from unialign.errors import AudioLoadError, ConfigError, DataError
from unialign_train.data.protocol import DataConfig, make_splits
from unialign_train.data.records import Dataset
from unialign_train.features import extract

sf = pytest.importorskip("soundfile")
HAVE_MUSICNN = importlib.util.find_spec("musicnn") is not None
HAVE_EWN = importlib.util.find_spec("eff_word_net") is not None
QUIET = dict(num_workers=0, show_progress=False)


def sine(freq: float, seconds: float, rate: int, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def make_audio_dataset(folder: Path, n: int = 8) -> Dataset:
    """n sine clips (a concept per frequency, two "styles": 16 kHz and 8 kHz files) with captions."""
    recs = []
    for i in range(n):
        rate = 16000 if i % 2 == 0 else 8000
        write_wav(folder / f"c{i}.wav", sine(200 + 50 * (i // 2), 0.5 + 0.1 * i, rate), rate)
        recs.append({"id": f"c{i}", "concept": f"f{i // 2}", "label": f"tone {i // 2}", "style": str(rate),
                     "audio": f"c{i}.wav", "text": [f"a tone number {i // 2}"]})
    return Dataset("tones", recs, folder)


# == loading ==========================================================================================
def test_load_audio_mixes_down_and_resamples(tmp_path):
    stereo = np.stack([sine(440, 1.0, 8000), -sine(440, 1.0, 8000) * 0.5], 1)
    sf.write(str(tmp_path / "st.wav"), stereo, 8000)
    wave = load_audio(tmp_path / "st.wav", 16000)
    assert wave.dtype == np.float32 and wave.ndim == 1 and len(wave) == 16000  # 1 s at the new rate
    peak = np.abs(wave[2000:-2000]).max()
    assert 0.07 < peak < 0.08  # the mean of +0.3 and -0.15 sines: amplitude (0.3 - 0.15) / 2 = 0.075
    assert np.array_equal(load_audio(tmp_path / "st.wav", 16000), wave)  # deterministic, bit for bit


def test_fit_length_pads_crops_and_repeats():
    w = np.arange(1, 5, dtype=np.float32)
    assert fit_length(w, 8, "center").tolist() == [0, 0, 1, 2, 3, 4, 0, 0]
    assert fit_length(w, 6, "start").tolist() == [1, 2, 3, 4, 0, 0]
    assert fit_length(w, 6, "repeat").tolist() == [1, 2, 3, 4, 1, 2]
    assert fit_length(w, 2, "center").tolist() == [2, 3] and fit_length(w, 2, "start").tolist() == [1, 2]
    with pytest.raises(ConfigError, match="pad='middle'"):
        fit_length(w, 2, "middle")


@pytest.mark.numerics
@pytest.mark.parametrize("rate,n_fft,n_mels", [(16000, 512, 96), (16000, 512, 64), (22050, 2048, 128)])
def test_mel_filterbank_matches_librosa(rate, n_fft, n_mels):
    import librosa  # the reference (dev extra)
    from unialign.audio import mel_filterbank

    ours, ref = mel_filterbank(rate, n_fft, n_mels), librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=n_mels)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=10 * np.finfo(np.float32).eps * float(ref.max()))


def test_unreadable_audio_is_named_with_the_reason(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("not audio at all")
    write_wav(tmp_path / "ok.wav", sine(440, 0.2, 16000), 16000)
    (tmp_path / "cut.wav").write_bytes((tmp_path / "ok.wav").read_bytes()[:30])  # header cut short
    sf.write(str(tmp_path / "nosamples.wav"), np.zeros((0, 1), np.float32), 16000)
    cases = {"missing.wav": "does not exist", "empty.wav": "empty", "text.wav": "not a readable audio file",
             "cut.wav": "not a readable audio file|no audio samples", "nosamples.wav": "no audio samples", ".": "directory"}
    for name, why in cases.items():
        with pytest.raises(AudioLoadError, match=why) as e:
            load_audio(tmp_path / name, 16000)
        assert str(tmp_path / name) in str(e.value)  # the message names the file


def test_bad_clips_are_skipped_and_listed_in_the_store(tmp_path):
    ds = make_audio_dataset(tmp_path / "a", n=4)
    (tmp_path / "a" / "c1.wav").write_text("broken")
    store = extract(ds, load_encoder("logmel", device="cpu"), tmp_path / "s", batch_size=2, **QUIET)
    assert len(store) == 3 and len(store.skipped) == 1 and "c1.wav" in str(store.skipped[0])
    with pytest.raises(DataError, match="c1.wav"):
        extract(ds, load_encoder("logmel", device="cpu"), tmp_path / "s2", batch_size=2, strict=True, **QUIET)


# == encoders: shapes and determinism =================================================================
ENCODERS = ["logmel", "logmel?n_mels=40&seconds=1.0",
            pytest.param("musicnn-mtt", marks=pytest.mark.skipif(not HAVE_MUSICNN, reason="pip install --no-deps musicnn")),
            pytest.param("eff-word-net", marks=pytest.mark.skipif(not HAVE_EWN, reason="pip install --no-deps efficientword-net"))]


def test_audio_specs_are_canonical_and_rebuild():
    enc = load_encoder("logmel?n_mels=40&pad=center", device="cpu")
    assert enc.spec == "logmel?n_mels=40" and load_encoder(enc.spec).layer_dims == enc.layer_dims
    with pytest.raises(ConfigError, match="unknown option"):
        load_encoder("logmel?sample_rate=8000")


@pytest.mark.parametrize("spec", ENCODERS)
def test_audio_encoder_shapes_layers_and_determinism(spec, tmp_path):
    files = []
    for i, (f, rate) in enumerate([(220, 8000), (1500, 22050)]):  # a short and a long clip, two rates
        files.append(str(write_wav(tmp_path / f"s{i}.wav", sine(f, 0.7 + 2.0 * i, rate), rate)))
    enc = load_encoder(spec, device="cpu")
    assert enc.modality == "audio" and enc.layers[0] == "final"
    layers = enc.layers
    a = enc.encode(files, batch_size=2, layers=layers)
    assert a.shape == (2, enc.width(layers)) and np.isfinite(a).all()
    b = enc.encode(files, batch_size=2, layers=layers)
    assert np.array_equal(a, b)  # the same clips rerun: the same features, bit for bit
    final = a[:, : enc.dim]  # layers are concatenated in order, "final" first
    assert not np.allclose(final[0], final[1])  # different sounds, different embeddings


def test_logmel_std_tells_a_tone_from_noise(tmp_path):
    """The baseline's two halves mean something: a steady tone has a flat log-mel over time (small std)."""
    write_wav(tmp_path / "tone.wav", sine(440, 1.5, 16000), 16000)
    rng = np.random.default_rng(0)
    write_wav(tmp_path / "bursts.wav", (rng.normal(0, 0.2, 24000) * (np.arange(24000) // 2400 % 2)).astype(np.float32), 16000)
    enc = load_encoder("logmel", device="cpu")
    std = enc.encode([str(tmp_path / "tone.wav"), str(tmp_path / "bursts.wav")], layers=["std"])
    assert std[0].mean() * 3 < std[1].mean()


@pytest.mark.skipif(not HAVE_EWN, reason="pip install --no-deps efficientword-net")
def test_eff_word_net_refuses_raw_waveforms():
    enc = load_encoder("eff-word-net", device="cpu")
    with pytest.raises(DataError, match=r"\(N, 149, 64\)"):
        enc.features(torch.zeros(2, 24000))
    with pytest.raises(ConfigError, match="quantize"):
        load_encoder("eff-word-net?quantize=int4")
    int8 = load_encoder("eff-word-net?quantize=int8")  # the package's int8 copy: no per-stage outputs to read
    assert int8.layers == ["final"] and int8.version != enc.version
    with pytest.raises(ConfigError, match="unknown layer"):
        int8.features(torch.zeros(1, 149, 64), ["layer4"])


@pytest.mark.skipif(not HAVE_MUSICNN or shutil.which("fluidsynth") is None
                    or not Path("/usr/share/sounds/sf2/FluidR3_GM.sf2").exists(), reason="musicnn + fluidsynth")
def test_musicnn_port_tags_rendered_instruments_by_name():
    """No TensorFlow reference runs here, so the port is checked by what it hears: a melody played by a
    guitar, a violin and a sitar gets that instrument's MagnaTagATune tag among its top 3 (chance 3/50)."""
    from unialign.encoders.musicnn import MTT_LABELS
    from unialign_train.data.gm_notes import SOUNDFONT, midi_file, render

    melody = [60, 62, 64, 65, 67, 65, 64, 62, 60, 64, 67, 72]
    programs = {24: "guitar", 40: "violin", 104: "sitar"}
    wave = render(midi_file([(p, m) for p in programs for m in melody], slot=0.25, hold=0.22), SOUNDFONT)
    n = 16000 * 3
    enc = load_encoder("musicnn-mtt", device="cpu")
    load = enc.loader()
    batch = torch.stack([load(wave[i * n : (i + 1) * n]) for i in range(len(programs))])
    for tags, name in zip(enc.tags(batch, top=3), programs.values()):
        assert name in [t for t, _ in tags], (name, tags)
    assert len(MTT_LABELS) == 50


def test_tf_checkpoint_reader_refuses_what_is_not_one(tmp_path):
    from unialign.encoders.tfcheckpoint import read_checkpoint

    (tmp_path / "x.index").write_bytes(b"\0" * 64)
    (tmp_path / "x.data-00000-of-00001").write_bytes(b"")
    with pytest.raises(DataError, match="not a TensorFlow checkpoint"):
        read_checkpoint(tmp_path / "x")
    with pytest.raises(DataError, match="cannot read"):
        read_checkpoint(tmp_path / "nothing")


# == protocol ========================================================================================
def _cfg(**kw) -> DataConfig:
    base = dict(dataset="x", train_styles=None, test_styles=None, split=(0.7, 0.1, 0.2), split_seed=0,
                max_train_concepts=None, subset=None)
    return DataConfig(**{**base, **kw})


def test_shared_concepts_hold_out_styles_only(tmp_path):
    recs = [{"id": f"{c}/{s}", "concept": c, "label": c, "style": s, "audio": "x.wav"}
            for c in "abcdefghij" for s in ("p1", "p2", "p3", "p4")]
    ds = Dataset("notes", recs, tmp_path, meta={"protocol": {"concepts": "shared", "train_styles": ["p1", "p2"],
                                                              "val_styles": ["p3"], "test_styles": ["p4"]}})
    sp = make_splits(ds, _cfg())
    styles = {part: {ds.records[i]["style"] for i in getattr(sp, part)} for part in ("train", "val", "test")}
    assert styles == {"train": {"p1", "p2"}, "val": {"p3"}, "test": {"p4"}}
    assert {ds.records[i]["concept"] for i in sp.test} == set("abcdefghij") == {ds.records[i]["concept"] for i in sp.train}
    held = make_splits(ds, _cfg(concepts="split"))  # the same set, concepts held out too
    assert not {ds.records[i]["concept"] for i in held.test} & {ds.records[i]["concept"] for i in held.train}
    with pytest.raises(ConfigError, match="must not overlap"):
        make_splits(ds, _cfg(test_styles=["p2"]))


def test_spoken_protocol_validates_on_the_other_synthesiser():
    """spoken trains on the default espeak voices, validates on the Klatt ones, tests on the human."""
    from unialign_train.data.spoken import HUMAN, TRAIN_VOICES, VAL_VOICES, VOICES, prosody, protocol

    p = protocol(VOICES)
    assert p["val_styles"] == list(VAL_VOICES) and p["train_styles"] == list(TRAIN_VOICES)
    assert all("klatt" in v for v in p["val_styles"]) and not any("klatt" in v for v in p["train_styles"])
    assert p["test_styles"] == [HUMAN]
    draws = {prosody(v, it) for v in VOICES[:8] for it in ("7", "b", "20")}
    assert len(draws) > 12 and all(130 <= s <= 210 and 25 <= q <= 75 for s, q in draws)
    assert prosody("en-us+m1", "7") == prosody("en-us+m1", "7")  # seeded by the clip's name, not by order


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="run scripts/setup_audio.sh (espeak-ng)")
def test_spoken_clips_carry_their_prosody_and_rebuild_identically(tmp_path):
    """Each clip is spoken at its own rate and pitch; a forced rebuild writes the same bytes."""
    from unialign_train.data.spoken import ASTERISK, build_spoken

    if not ASTERISK.is_dir():
        pytest.skip("run scripts/setup_audio.sh (asterisk-core-sounds-en-wav)")
    ds = build_spoken(voices=["en-us+m1"], items=["7", "b"], root=tmp_path / "a", workers=1)
    again = build_spoken(voices=["en-us+m1"], items=["7", "b"], root=tmp_path / "b", workers=1, force=True)
    synth = [r for r in ds.records if r["source"] == "espeak"]
    assert len(synth) == 2 and all({"speed", "pitch"} <= set(r) for r in synth)
    for r in synth:
        assert (tmp_path / "a" / r["audio"]).read_bytes() == (tmp_path / "b" / r["audio"]).read_bytes()
    slow = load_audio(tmp_path / "a" / synth[0]["audio"], 16000)
    assert len(slow) > 1600  # a real utterance, not an empty file
    assert [r["style"] for r in again.records if r["source"] != "espeak"] == ["human", "human"]


# == kill / resume ===================================================================================
AUDIO_EXTRACT_CHILD = """
from unialign.encoders import load_encoder
from unialign_train.data.records import Dataset
from unialign_train.features import extract
extract(Dataset.load({ds!r}), load_encoder("logmel", device="cpu"), {out!r}, layers=["mean"], shard_size=2,
        batch_size=2, num_workers=0, show_progress=False)
"""


def test_audio_extraction_killed_resumes_byte_identical(tmp_path, one_thread):
    ds = make_audio_dataset(tmp_path / "a", n=8)
    ds.save(tmp_path / "ds")
    ref = extract(ds, load_encoder("logmel", device="cpu"), tmp_path / "ref", layers=["mean"], shard_size=2,
                  batch_size=2, **QUIET)
    out = tmp_path / "killed"
    rng = np.random.default_rng(3)
    codes = [run_child(AUDIO_EXTRACT_CHILD.format(ds=str(tmp_path / "ds"), out=str(out)), kill_at=int(rng.integers(1, 12)))
             for _ in range(3)]
    assert codes == [-9] * 3 and not (out / "manifest.json").exists()
    resumed = extract(ds, load_encoder("logmel", device="cpu"), out, layers=["mean"], shard_size=2, batch_size=2, **QUIET)
    assert tree(out) == tree(tmp_path / "ref") and resumed.manifest == ref.manifest


# == end to end (slow: the real datasets, built by scripts/setup_audio.sh) ============================
def _needs_audio_setup() -> None:
    for tool in ("espeak-ng", "fluidsynth"):
        if shutil.which(tool) is None:
            pytest.skip("run scripts/setup_audio.sh (Debian audio packages)")
    if not (HAVE_MUSICNN and HAVE_EWN):
        pytest.skip("run scripts/setup_audio.sh (efficientword-net, musicnn)")


@pytest.mark.slow
@pytest.mark.timeout(1500)  # from an empty cache: builds the set (4935 speech clips) and extracts it on one thread
@pytest.mark.parametrize("config,factor", [("audio-music.yaml", 20), ("audio-speech.yaml", 10)])
def test_audio_text_runs_end_to_end_well_above_chance(config, factor, tmp_path):
    """`unialign run configs/audio-*.yaml`: zero-shot classification of held-out pitches (music, 128
    instrument names) or of real human recordings (speech, 47 items, trained on synthetic voices only)
    far above chance, retrieval both ways reported, the model saved and reloadable."""
    from unialign.model import AlignedModel
    from unialign_train.config import load_config
    from unialign_train.pipeline import run

    _needs_audio_setup()
    torch.set_num_threads(1)
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / config, {"output": str(tmp_path / "run"), "device": "cpu"})
    out = run(cfg, log=lambda s: None)
    recs = {r["task"]: r for r in out["records"]}
    zs = recs["zeroshot_classification"]
    assert zs["modality"] == "audio" and zs["metrics"]["acc1"] >= factor * zs["chance"]["acc1"]
    assert {"audio_retrieval_recall@1", "text_retrieval_recall@1"} <= set(recs["zeroshot_retrieval"]["metrics"])
    model = AlignedModel.from_pretrained(tmp_path / "run" / "model")
    assert model.modalities == ["audio", "text"]
