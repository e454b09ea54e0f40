"""Video: frames from animated files and folders, the ``video:`` encoder (temporal pooling and the
temporal shift inside a frozen network), the moving-clip renderer, and video feature stores (skips,
kill and resume). Clips are built here; the encoder is the real packaged EfficientNet-Lite0 at 32 px."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from faults import run_child, tree
from tiny import register_tiny
from unialign.encoders import load_encoder
from unialign.encoders.video import chosen_blocks, pool_frames, temporal_shift
from unialign.errors import ConfigError, DataError
from unialign.frames import VideoLoadError, load_frames, sample_indices, save_clip
from unialign.projections import Tower, TemporalHead, build_projection, projection_config
from unialign_train.align import fit, get_recipe
from unialign_train.align.pairs import Pairs
from unialign_train.features import Features
from unialign_train.data.animated import base_code, make_record
from unialign_train.data.moving import MOTIONS, render_motions, reverse_pairs
from unialign_train.data.records import Dataset
from unialign_train.features import extract

register_tiny()
EFFNET = "effnet-lite0?image_size=32"
QUIET = dict(num_workers=0, show_progress=False)


def frames_of(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    """``n`` different RGB frames: a square moving across a noisy background."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        x = int(t * (size - 8) / max(1, n - 1))
        a[10:18, x : x + 8] = (255, 40, 40)
        out.append(Image.fromarray(a))
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # small convolutions on tiny clips: one thread is fastest


@pytest.fixture(scope="module")
def effnet_video():
    """The same frozen network without and with the shift (both eager PyTorch)."""
    torch.manual_seed(0)
    plain = load_encoder(f"video:{EFFNET}&frames=5&backend=torch", device="cpu")
    shifted = load_encoder(f"video:{EFFNET}&frames=5&shift=0.125", device="cpu")
    return plain, shifted


# == frames ============================================================================================
def test_sampling_is_even_and_symmetric_in_time():
    assert sample_indices(15, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert sample_indices(3, 5) == [0, 1, 1, 1, 2]  # short clips repeat frames
    for n in range(1, 80):
        for t in (1, 2, 3, 5, 8, 16):
            idx = sample_indices(n, t)
            assert idx == sorted(idx) and 0 <= idx[0] <= idx[-1] < n
            if t % 2 == 0 or n % 2 == 1:  # else the middle sample falls between two frames: no symmetric choice
                assert [n - 1 - i for i in idx[::-1]] == idx  # a reversed clip samples the same frames, reversed


def test_animated_webp_gif_and_folder_give_the_same_frames(tmp_path):
    clip = frames_of(9)
    save_clip(clip, tmp_path / "c.webp")
    clip[0].save(tmp_path / "c.gif", save_all=True, append_images=clip[1:], duration=50, loop=0)
    (tmp_path / "dir").mkdir()
    for i, f in enumerate(clip):  # natural order: frame10 after frame9 (here: 8 after 7 in a 2-digit-free name)
        f.save(tmp_path / "dir" / f"frame{i}.png")
    want = [np.asarray(clip[i]) for i in sample_indices(9, 5)]
    webp = [np.asarray(f) for f in load_frames(tmp_path / "c.webp", 5)]
    folder = [np.asarray(f) for f in load_frames(tmp_path / "dir", 5)]
    gif = load_frames(tmp_path / "c.gif", 5)
    assert all(np.array_equal(a, b) for a, b in zip(webp, want))  # lossless: bit-identical frames
    assert all(np.array_equal(a, b) for a, b in zip(folder, want))
    assert len(gif) == 5 and all(f.mode == "RGB" and f.size == (32, 32) for f in gif)  # palette: not exact


def test_transparent_frames_are_composited_on_white(tmp_path):
    rgba = [Image.new("RGBA", (16, 16), (200, 0, 0, 0)), Image.new("RGBA", (16, 16), (0, 0, 200, 255))]
    save_clip(rgba, tmp_path / "a.webp")
    f0, f1 = load_frames(tmp_path / "a.webp", 2)
    assert f0.getpixel((3, 3)) == (255, 255, 255) and f1.getpixel((3, 3)) == (0, 0, 200)


@pytest.mark.parametrize("kind, needle", [("missing", "does not exist"), ("empty", "empty"), ("text", "not a readable"),
                                          ("truncated", "not a readable"), ("no_frames", "no frames"),
                                          ("bad_frame", "frame frame1.png")])
def test_unreadable_clips_name_the_clip_and_the_reason(tmp_path, kind, needle):
    p = tmp_path / "clip.webp"
    save_clip(frames_of(12, size=48), p)
    if kind == "missing":
        p.unlink()
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "text":
        p.write_text("not a video")
    elif kind == "truncated":
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif kind in ("no_frames", "bad_frame"):
        p = tmp_path / "frames"
        p.mkdir()
        if kind == "bad_frame":
            frames_of(1)[0].save(p / "frame0.png")
            (p / "frame1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(VideoLoadError) as e:
        load_frames(p, 4)
    assert str(p) in str(e.value) and needle in str(e.value)


# == the temporal shift and pooling ======================================================================
def test_shift_leaves_identical_frames_alone_and_moves_channels_between_neighbours():
    x = torch.randn(1, 1, 16, 3, 3).expand(2, 4, 16, 3, 3).reshape(8, 16, 3, 3)  # 2 clips of one repeated frame
    assert torch.equal(temporal_shift(x, 4, 0.25), x)
    y = torch.arange(3 * 8, dtype=torch.float32).reshape(1, 3, 8, 1, 1).repeat(1, 1, 1, 2, 2).reshape(3, 8, 2, 2)
    s = temporal_shift(y, 3, 0.25).reshape(3, 8, 2, 2)[..., 0, 0]  # frame t: channel c holds 8t + c
    assert s[1, :2].tolist() == [0, 1]  # first quarter from the previous frame
    assert s[1, 2:4].tolist() == [18, 19]  # second quarter from the next frame
    assert s[1, 4:].tolist() == [12, 13, 14, 15]  # the rest: the frame's own
    assert s[0, :2].tolist() == [16, 17]  # circular: frame 0's previous frame is the last one
    tokens = y.flatten(2).transpose(1, 2)  # (BT, N, C) layout of a transformer
    assert torch.equal(temporal_shift(tokens, 3, 0.25), temporal_shift(y, 3, 0.25).flatten(2).transpose(1, 2))


def test_pooling_shapes_and_order():
    x = torch.randn(2, 5, 3)
    assert pool_frames(x, "mean").shape == (2, 3) and pool_frames(x, "concat").shape == (2, 15)
    tr, back = pool_frames(x, "trend"), pool_frames(x.flip(1), "trend")
    assert tr.shape == (2, 6)
    torch.testing.assert_close(back[:, 3:], -tr[:, 3:])  # a reversed clip flips the slope
    torch.testing.assert_close(back[:, :3], tr[:, :3])  # ... and keeps the mean
    assert chosen_blocks(6, "even") == [0, 2, 4] and chosen_blocks(6, "1-3") == [1, 3]
    with pytest.raises(ConfigError, match="shift_blocks"):
        chosen_blocks(6, "9")


# == the trained temporal head ===========================================================================
def per_layer_reversed(x: torch.Tensor, frames: int, dims: list[int]) -> torch.Tensor:
    """The ``pool=concat`` rows of the same clips played backwards (each layer's frames reversed)."""
    return torch.cat([p.reshape(len(x), frames, -1).flip(1).reshape(len(x), -1) for p in torch.split(x, dims, 1)], 1)


def test_temporal_head_sees_every_layer_of_a_frame_together_and_in_order(tmp_path):
    torch.manual_seed(0)
    dims = [4 * 6, 4 * 2]  # two stored layers, 4 frames of widths 6 and 2
    head = TemporalHead(32, 5, frames=4, layer_dims=dims, width=16, heads=2).eval()
    x = torch.randn(3, 32)
    tokens = head.frame_tokens(x)
    assert tokens.shape == (3, 4, 8)
    torch.testing.assert_close(tokens[:, 2], torch.cat([x[:, 12:18], x[:, 28:30]], 1), rtol=0, atol=0)
    assert not torch.allclose(head(x), head(per_layer_reversed(x, 4, dims)), atol=1e-3)  # order reaches it
    tower = Tower("temporal", 32, 5, {"frames": 4, "layer_dims": dims, "width": 16, "heads": 2}).eval()
    again = build_projection(projection_config(tower))
    again.load_state_dict(tower.state_dict())
    assert torch.equal(tower(x), again.eval()(x))  # saved config + weights rebuild it exactly
    with pytest.raises(ValueError, match="frames"):
        TemporalHead(32, 5, frames=1)
    with pytest.raises(ValueError, match="not 3 frames side by side"):
        TemporalHead(32, 5, frames=3, layer_dims=dims)


def test_temporal_head_learns_direction_on_held_out_objects():
    """Clips of objects drifting one way or the other along a feature direction, captions naming object and
    direction: a clip and its reverse have the same frame mean, so only a head that reads order can tell
    their captions apart. Trained on 48 objects, scored on 16 others (chance 0.5)."""
    rng = np.random.default_rng(0)
    frames, d, n_obj = 6, 12, 64
    objects, drift = rng.normal(size=(n_obj, d)), rng.normal(size=d)
    words = rng.normal(size=(n_obj, 8))
    t = np.linspace(-1, 1, frames)[:, None]
    clips, texts = [], []
    for o in range(n_obj):
        for sign in (1, -1):  # the same path, played forwards and backwards
            clips.append((objects[o] + sign * t * drift + 0.1 * rng.normal(size=(frames, d))).reshape(-1))
            texts.append(np.concatenate([words[o], [2.0 * sign]]) + 0.05 * rng.normal(size=9))
    x, y = np.asarray(clips, np.float32), np.asarray(texts, np.float32)
    train_rows = np.arange(96)
    pairs = Pairs.from_lists(train_rows.tolist(), [[i] for i in train_rows], (train_rows // 2).tolist())
    small = {"dim": 16, "batch_size": 32, "epochs": 40, "lr": 3e-3, "head_options": {"video": {"width": 32, "heads": 2}}}
    fitted = fit(get_recipe("temporal"), small, Features([x], ["final"], steps=frames), Features([y]), pairs,
                 ("video", "text"), device="cpu", log=lambda s: None)
    video, text = fitted.projections["video"], fitted.projections["text"]
    assert video.config()["options"]["frames"] == frames
    with torch.no_grad():
        zv = torch.nn.functional.normalize(video(torch.from_numpy(x[96:])), dim=-1)
        zt = torch.nn.functional.normalize(text(torch.from_numpy(y[96:])), dim=-1)
    sim = (zv @ zt.T).numpy()
    own, reverse = np.diag(sim), sim[np.arange(32), np.arange(32) ^ 1]  # rows 2k, 2k+1: a clip and its reverse
    assert (own > reverse).mean() > 0.9, (own > reverse).mean()


# == the encoder =========================================================================================
def test_video_encoder_shapes_spec_and_determinism(effnet_video, tmp_path):
    plain, shifted = effnet_video
    save_clip(frames_of(9), tmp_path / "c.webp")
    clip = plain.loader()(str(tmp_path / "c.webp"))
    assert clip.shape == (5, 3, 32, 32)
    batch = torch.stack([clip, clip.flip(0)])
    for enc in (plain, shifted):
        out = enc(batch, ["final", "block3"])
        assert out["final"].shape == (2, 1280) and out["block3"].shape == (2, enc.image.layer_dims["block3"])
        assert torch.equal(enc(batch, ["final"])["final"], out["final"])  # rerun: bit-identical
    assert shifted._hooked == [0, 2, 4, 6, 8, 10, 12, 14]
    again = load_encoder(shifted.spec, device="cpu")  # the canonical spec rebuilds the same encoder
    assert again.spec == shifted.spec and again._hooked == shifted._hooked
    assert torch.equal(again(batch)["final"], shifted(batch)["final"])
    concat = load_encoder(f"video:{EFFNET}&frames=5&pool=concat&backend=torch", device="cpu")
    assert concat.dim == 5 * 1280 and concat(batch)["final"].shape == (2, 6400)


@pytest.mark.numerics
def test_shift_matters_only_when_frame_order_does(effnet_video, tmp_path):
    plain, shifted = effnet_video
    clip = torch.stack([plain.image.loader()(f) for f in frames_of(5)])
    still = clip[2:3].expand(5, -1, -1, -1)
    batch = torch.stack([clip, clip.flip(0), still])
    p, s = plain(batch)["final"], shifted(batch)["final"]
    tol = dict(rtol=1e-4, atol=1e-4)  # float32 convolutions summed in another order
    torch.testing.assert_close(s[2], p[2], **tol)  # identical frames: the shift changes nothing
    torch.testing.assert_close(p[1], p[0], **tol)  # frame averaging cannot tell a clip from its reverse
    assert (s[1] - s[0]).norm() > 0.05 * s[0].norm()  # with the shift, the reversed clip is another clip
    assert (s[0] - p[0]).norm() > 0.05 * p[0].norm()  # and a moving clip's features did change


def test_bad_video_options_are_one_clear_error():
    with pytest.raises(ConfigError, match="pool="):
        load_encoder(f"video:{EFFNET}&pool=max", device="cpu")
    with pytest.raises(ConfigError, match="backend=torch"):
        load_encoder(f"video:{EFFNET}&shift=0.125&backend=onnx", device="cpu")
    with pytest.raises(ConfigError, match="image encoder"):
        load_encoder("video:tiny-text", device="cpu")
    with pytest.raises(ConfigError, match="no list of blocks"):
        load_encoder("video:tiny-image?shift=0.1&frames=3", device="cpu")
    with pytest.raises(ConfigError, match="image_sizee"):
        load_encoder(f"video:{EFFNET}&image_sizee=3", device="cpu")


# == data ================================================================================================
def test_moving_clips_are_time_reverses_of_each_other():
    sprite = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    sprite.paste((30, 120, 200, 255), (4, 4, 16, 12))
    clips = render_motions(sprite, 7, 48, 16, np.random.default_rng(0))
    assert list(clips) == list(MOTIONS)
    for a, b in (("left", "right"), ("up", "down"), ("growing", "shrinking")):
        assert [np.asarray(f).tobytes() for f in clips[a]] == [np.asarray(f).tobytes() for f in clips[b][::-1]]
    xs = [np.nonzero(np.asarray(f).min(axis=(0, 2)) < 250)[0].mean() for f in clips["left"]]
    assert xs[0] > xs[-1] + 10  # "left" moves towards x = 0
    ys = [np.nonzero(np.asarray(f).min(axis=(1, 2)) < 250)[0].mean() for f in clips["up"]]
    assert ys[0] > ys[-1] + 10  # "up" moves towards y = 0
    area = [(np.asarray(f).min(axis=2) < 250).sum() for f in clips["growing"]]
    assert area[-1] > 4 * area[0]
    recs = [{"concept": c, "motion": m} for c in ("a", "b") for m in MOTIONS]
    assert sorted(recs[i]["motion"] + recs[j]["motion"] for i, j in reverse_pairs(recs)) == sorted(
        ["downup", "growingshrinking", "leftright"] * 2)


def test_animated_emoji_records_from_code_points():
    assert base_code("1f385-1f3fb") == ("1f385", "light")
    assert base_code("1f469-1f3fb-200d-1f91d-200d-1f468-1f3ff") == ("1f469-200d-1f91d-200d-1f468", "mixed")
    text = {"1f3cb": ("1f3cb-fe0f", "person lifting weights", ["person lifting weights", "weights"])}
    r = make_record("1f3cb-1f3fd", text)
    assert (r["concept"], r["style"], r["video"]) == ("1f3cb-fe0f", "medium", "clips/1f3cb-1f3fd.webp")
    assert make_record("1f40c", {})["label"] == "snail"  # not in the emoji set: the Unicode name


# == stores ==============================================================================================
def video_dataset(folder, n: int = 6, bad: int | None = None) -> Dataset:
    folder.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        p = folder / f"clip{i}.webp"
        save_clip(frames_of(4 + i % 3, size=16, seed=i), p)
        if i == bad:
            p.write_bytes(p.read_bytes()[:40])
        recs.append({"id": str(i), "video": p.name, "text": [f"clip {i}"], "concept": f"c{i % 3}",
                     "label": f"thing {i % 3}", "style": ""})
    return Dataset("tiny-video", recs, folder)


def test_video_store_skips_a_corrupt_clip_and_names_it(tmp_path):
    ds = video_dataset(tmp_path / "clips", bad=2)
    enc = load_encoder("video:tiny-image?frames=3")
    store = extract(ds, enc, tmp_path / "store", layers=["hidden"], **QUIET)
    assert len(store) == 5 and store.modality == "video" and store.layers == ["final", "hidden"]
    (skip,) = store.skipped
    assert skip["id"] == "2" and skip["path"].endswith("clip2.webp") and "not a readable video" in skip["reason"]
    with pytest.raises(DataError, match="clip2.webp"):
        extract(ds, enc, tmp_path / "strict", strict=True, **QUIET)


VIDEO_CHILD = """
from unialign.encoders import load_encoder
from unialign_train.data.records import Dataset
from unialign_train.features import extract
extract(Dataset.load({ds!r}), load_encoder("video:tiny-image?frames=3"), {out!r}, layers=["hidden"], shard_size=2,
        batch_size=2, num_workers=0, show_progress=False)
"""


def test_video_extraction_killed_resumes_byte_identical(tmp_path):
    ds = video_dataset(tmp_path / "clips", n=8)
    ds.save(tmp_path / "ds")
    ref = extract(ds, load_encoder("video:tiny-image?frames=3"), tmp_path / "ref", layers=["hidden"], shard_size=2,
                  batch_size=2, **QUIET)
    out = tmp_path / "killed"
    rng = np.random.default_rng(3)
    codes = [run_child(VIDEO_CHILD.format(ds=str(tmp_path / "ds"), out=str(out)), kill_at=int(rng.integers(1, 8)))
             for _ in range(3)]
    assert codes == [-9] * 3 and not (out / "manifest.json").exists()
    resumed = extract(ds, load_encoder("video:tiny-image?frames=3"), out, layers=["hidden"], shard_size=2,
                      batch_size=2, **QUIET)
    assert tree(out) == tree(tmp_path / "ref") and resumed.manifest == ref.manifest


# == end to end ==========================================================================================
@pytest.mark.slow
@pytest.mark.timeout(1200)  # two extractions of 180 clips (~2 min alone; far more on a loaded machine)
def test_moving_clips_end_to_end_order_aware_beats_frame_mean(tmp_path, monkeypatch):
    """A small moving-emoji set rendered here from the built emoji set; the pipeline trains video-text
    maps on 18 objects and scores 9 held-out ones: shift + trend tells a motion from its reverse,
    frame averaging cannot (it is at chance on reverse pairs, by construction)."""
    from unialign import paths
    from unialign_train.config import load_config
    from unialign_train.data.moving import build_moving
    from unialign_train.evaluate.motion import motion_scores
    from unialign_train.pipeline import evaluate_model, train_model

    if not (paths.datasets_dir() / "emoji" / "dataset.json").exists():
        pytest.skip("the emoji set is not built (`unialign data emoji`; needs npm once)")
    ds = build_moving(n_objects=30, canvas=64, object_size=28, frames=9, root=tmp_path / "moving")
    monkeypatch.setenv("UNIALIGN_HOME", str(tmp_path / "home"))  # stores here, not in the user's feature cache
    scores = {}
    for name, spec in {"mean": "video:effnet-lite0?image_size=64&frames=5&backend=torch",
                       "order": "video:effnet-lite0?image_size=64&frames=5&pool=trend&shift=0.125"}.items():
        cfg = load_config(None, {"name": name, "output": str(tmp_path / name), "recipe": "linear", "device": "cpu",
                                 "align": ["video", "text"], "data.dataset": str(tmp_path / "moving"),
                                 "data.split": [0.6, 0.1, 0.3], "encoders.video": spec, "layers.video": ["block10"],
                                 "eval.templates": "plain", "eval.zero_shot_sets": {}})
        model, cached, splits = train_model(cfg, log=lambda s: None)
        records = evaluate_model(model, cfg, cached, splits, "", log=lambda s: None)
        assert {r["task"] for r in records} == {"zeroshot_classification", "zeroshot_retrieval"}
        scores[name] = motion_scores(model, cached, splits.test)
    assert len(ds) == 180
    assert abs(scores["mean"]["reverse_pair"] - 0.5) < 0.1  # blind to order: a coin flip, up to float ties
    assert scores["order"]["reverse_pair"] > 0.8 and scores["order"]["motion"] > 2 * scores["order"]["motion_chance"]
