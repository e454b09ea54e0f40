"""Audio <-> text (CLAP-style) and emergent audio <-> image binding, on the project's offline audio sets.

Parts (``--parts``, default all):

- ``recipes``: every recipe of ``--recipes`` on identical cached features, for
  * music: gm-notes (128 General-MIDI instruments rendered with fluidsynth), zero-shot classification
    among the instrument names, (a) held-out pitches (the dataset's protocol: every instrument trained,
    tested at two pitches never trained on) and (b) held-out instruments too (``data.concepts=split``);
  * speech: spoken (digits 0-20 and letters a-z), trained on 96 espeak-ng voices (validated on 8 voices of
    its other synthesiser), tested on the real
    Asterisk recordings of one human speaker;
  each with the learned encoder (musicnn-mtt / eff-word-net) and the log-mel floor. The best recipe per
  row group is chosen on the validation split (a held-out pitch / the Klatt voices), never
  on test; test numbers of every recipe are shown.
- ``binding``: audio <-> image with no audio-image pair. Instrument sounds (gm-notes test pitches)
  against the instrument emoji (apple style, unseen by the image-text model), through text: each side
  is described by its similarities to the same instrument-name prompts in its own aligned model (audio:
  the music model of this benchmark, trained on audio-text only; image: the default emoji model
  ``runs/default/model``), and the two profiles are compared (cosine of z-scored profiles). Against
  chance and against a model trained on the real audio-image pairs (sounds at the training pitches <->
  the instrument emoji in the three training styles; lstsq from audio to image features).
- ``seeds``: the configs' recipes (each chosen on validation) over 3 training seeds, mean +- std.
- ``throughput``: each audio encoder over 64 clips into a fresh store (clips/s, decoding in the loader
  workers included) and the time of a whole ``unialign run`` from an empty feature cache is quoted
  from the runs (docs/audio.md).

    python3 benchmarks/audio.py                  # writes benchmarks/results/audio.{json,md}
    python3 benchmarks/audio.py --parts binding  # writes benchmarks/results/audio_binding.{json,md}
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, markdown, write  # noqa: E402
from recipes import MemoTextEncoder, _in_memory  # noqa: E402
from unialign.encoders import load_encoder  # noqa: E402
from unialign.model import AlignedModel  # noqa: E402
from unialign_train.align import fit, get_recipe, make_pairs  # noqa: E402
from unialign_train.align.pairs import Pairs  # noqa: E402
from unialign_train.config import load_config  # noqa: E402
from unialign_train.data import load_dataset, make_splits  # noqa: E402
from unialign_train.data.spoken import TRAIN_VOICES, VOICES, protocol as spoken_protocol  # noqa: E402
from unialign_train.evaluate import evaluate_split, validator  # noqa: E402
from unialign_train.features import Features, cache_features, extract  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["lstsq", "procrustes", "cca", "asif", "unialign", "linear", "mlp"]
TASKS = {  # name -> (config, audio encoders, extra overrides per protocol)
    "music": ("configs/audio-music.yaml", ["musicnn-mtt", "logmel"],
              {"held-out pitches": {}, "held-out instruments": {"data.concepts": "split"}}),
    "speech": ("configs/audio-speech.yaml", ["eff-word-net", "logmel"], {"real voice (Asterisk)": {}}),
}
# held-out synthetic voices (DATA.md's "W" kind of test): the f4 voices of every other accent (4 of the 96
# training voices) moved to test
_SPOKEN = spoken_protocol(VOICES)
_W_TEST = [v for v in TRAIN_VOICES if v.endswith("+f4")][::2]
TASKS["speech"][2]["held-out synthetic voices"] = {
    "data.train_styles": [v for v in _SPOKEN["train_styles"] if v not in _W_TEST], "data.test_styles": _W_TEST}
# instrument emoji <-> the General-MIDI programs that sound like them (the real audio-image pairs)
INSTRUMENTS = {"guitar": ("1f3b8", [24, 25, 26, 27, 28, 29, 30]), "violin": ("1f3bb", [40, 110]),
               "trumpet": ("1f3ba", [56, 59]), "saxophone": ("1f3b7", [64, 65, 66, 67]),
               "accordion": ("1fa97", [21, 23]), "banjo": ("1fa95", [105]), "drum": ("1f941", [116, 117, 118]),
               "musical keyboard": ("1f3b9", [0, 1, 2, 3, 4, 5]), "flute": ("1fa88", [72, 73]),
               "harp": ("1fa89", [46]), "bell": ("1f514", [14, 112])}
quiet = lambda *_: None  # noqa: E731


class Task:
    """One dataset with one audio encoder: features cached once, any recipe fitted and scored on them."""

    def __init__(self, config: str, audio_spec: str, overrides: dict[str, Any]):
        self.config, self.base = ROOT / config, {"encoders.audio": audio_spec, **overrides}
        self.cfg = load_config(self.config, self.base)
        self.ds = load_dataset(self.cfg.data.dataset)
        self.audio = load_encoder(audio_spec, device="cpu")
        self.text = MemoTextEncoder(load_encoder(self.cfg.encoders["text"], device="cpu"))
        self.layers = {m: self.cfg.layers_of(m) for m in ("audio", "text")}
        t0 = time.perf_counter()
        self.cached = _in_memory(cache_features(self.ds, {"audio": self.audio, "text": self.text.encoder}, self.layers,
                                                self.cfg.extract, quiet, show_progress=False))
        self.feature_seconds = time.perf_counter() - t0

    def fit(self, recipe: str, seed: int = 0) -> tuple[AlignedModel, Any]:
        ov = {**self.base, "recipe": recipe, "device": "cpu", "output": "/tmp/unialign-bench-audio"}
        if get_recipe(recipe).trained:
            ov["train.seed"] = seed
        cfg = load_config(self.config, ov)
        rec = get_recipe(recipe)
        splits = make_splits(self.ds, cfg.data)
        pairs = make_pairs(self.cached, splits.train, "audio", "text")
        validate = validator(self.cached, self.text, self.layers["text"], splits.val, "audio",
                             cfg.eval.templates) if rec.trained else None
        torch.manual_seed(seed)
        fitted = fit(rec, cfg.train, self.cached["audio"].features, self.cached["text"].features, pairs,
                     ("audio", "text"), validate, None, "cpu", quiet)
        model = AlignedModel({"audio": self.audio, "text": self.text}, fitted.projections, self.layers,
                             fitted.logit_scale, fitted.info)
        return model, splits

    def score(self, recipe: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        model, splits = self.fit(recipe)
        fit_s = time.perf_counter() - t0
        out: dict[str, Any] = {"recipe": recipe, "fit_seconds": fit_s}
        for part in ("val", "test"):
            recs = evaluate_split(model, self.cached, getattr(splits, part), f"{self.ds.name}-{part}",
                                  ("audio", "text"), self.cfg.eval.templates, [1, 5, 10], recipe, "")
            for r in recs:
                for k, v in r["metrics"].items():
                    out[f"{part}_{k}"] = v
                for k, v in (r.get("chance") or {}).items():
                    out[f"{part}_chance_{k}"] = v
                if r["task"] == "zeroshot_classification":
                    out[f"{part}_n_classes"] = r.get("n_classes", (r.get("extra") or {}).get("n_classes"))
                    out[f"{part}_n"] = r.get("n_samples", (r.get("extra") or {}).get("n_samples"))
        return out


def run_recipes(recipes: list[str], tasks: list[str], encoders_only: list[str] | None = None,
                audio_layers: list[str] | None = None, protocols_only: list[str] | None = None) -> list[dict[str, Any]]:
    torch.set_num_threads(1)  # small fits run faster on one thread here
    rows = []
    for task in tasks:
        config, encoders, protocols = TASKS[task]
        for enc in encoders_only or encoders:
            for proto, ov in protocols.items():
                if protocols_only and proto not in protocols_only:
                    continue
                t = Task(config, enc, {**ov, **({"layers.audio": audio_layers} if audio_layers else {})})
                group = []
                for recipe in recipes:
                    r = {"task": task, "encoder": t.audio.spec + (f" [{'+'.join(audio_layers)}]" if audio_layers else ""),
                         "protocol": proto, **t.score(recipe)}
                    print(f"{task} {t.audio.spec} {proto} {recipe}: val acc1 {r['val_acc1']:.3f} test acc1 "
                          f"{r['test_acc1']:.3f}", flush=True)
                    group.append(r)
                best = max(group, key=lambda r: (r["val_acc1"], r["val_acc5"]))
                for r in group:
                    r["best_on_val"] = r is best
                rows += group
    return rows


def recipes_table(rows: list[dict[str, Any]]) -> str:
    head = ["task", "protocol", "audio encoder", "recipe", "val acc1 %", "test acc1 %", "test acc5 %",
            "audio->text R@1 %", "text->audio R@1 %", "classes", "chance acc1 %"]
    body = []
    for r in rows:
        pct = lambda k: f"{100 * r[k]:.1f}" if k in r else "-"  # noqa: E731
        body.append([r["task"], r["protocol"], r["encoder"], r["recipe"] + (" **(best on val)**" if r["best_on_val"] else ""),
                     pct("val_acc1"), pct("test_acc1"), pct("test_acc5"), pct("test_text_retrieval_recall@1"),
                     pct("test_audio_retrieval_recall@1"), r.get("test_n_classes", "-"), pct("test_chance_acc1")])
    return markdown(head, body)


def run_seeds(seeds: int, tasks: list[str]) -> list[dict[str, Any]]:
    """The configs' recipes (chosen on validation) over ``seeds`` training seeds: mean +- std."""
    torch.set_num_threads(1)
    out = []
    for task in tasks:
        config, (enc, *_), protocols = TASKS[task]
        proto = next(iter(protocols))  # the dataset's own protocol
        t = Task(config, enc, protocols[proto])
        recipe = t.cfg.recipe
        runs = []
        for seed in range(seeds):
            model, splits = t.fit(recipe, seed)
            recs = evaluate_split(model, t.cached, splits.test, "test", ("audio", "text"), t.cfg.eval.templates,
                                  [1, 5, 10], recipe, "")
            runs.append({k: v for r in recs for k, v in r["metrics"].items()})
            print(task, recipe, seed, runs[-1]["acc1"], flush=True)
        keys = ["acc1", "acc5", "text_retrieval_recall@1", "audio_retrieval_recall@1"]
        out.append({"task": task, "encoder": enc, "protocol": proto, "recipe": recipe, "seeds": seeds,
                    **{k: {"mean": float(np.mean([r[k] for r in runs])), "std": float(np.std([r[k] for r in runs], ddof=1))}
                       for k in keys}})
    return out


def seeds_table(rows: list[dict[str, Any]]) -> str:
    f = lambda v: f"{100 * v['mean']:.1f} +- {100 * v['std']:.1f}"  # noqa: E731
    return markdown(["task", "protocol", "audio encoder", "recipe", "seeds", "test acc1 %", "test acc5 %",
                     "audio->text R@1 %", "text->audio R@1 %"],
                    [[r["task"], r["protocol"], r["encoder"], r["recipe"], r["seeds"], f(r["acc1"]), f(r["acc5"]),
                      f(r["text_retrieval_recall@1"]), f(r["audio_retrieval_recall@1"])] for r in rows])


# == binding ==========================================================================================
def _profiles(model: AlignedModel, emb: torch.Tensor, names: list[str], templates: str) -> torch.Tensor:
    """Each item's similarities to the instrument-name prompts in its model's space, z-scored: the
    relative (text-hub) representation the two modalities share."""
    sims = F.normalize(emb, dim=-1) @ model.class_embeddings(names, templates).T
    return F.normalize((sims - sims.mean(1, keepdim=True)) / (sims.std(1, keepdim=True) + 1e-8), dim=-1)


def _topk_scores(sim: torch.Tensor, labels_q: np.ndarray, labels_g: np.ndarray) -> dict[str, float]:
    """Top-1 / top-3 hit rate of each query's nearest gallery items (a hit: same class)."""
    order = sim.argsort(dim=1, descending=True).numpy()
    hit1 = (labels_g[order[:, 0]] == labels_q)
    hit3 = (labels_g[order[:, :3]] == labels_q[:, None]).any(1)
    return {"top1": float(hit1.mean()), "top3": float(hit3.mean())}


def run_binding(recipe: str, image_model_dir: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    music = Task("configs/audio-music.yaml", "musicnn-mtt", {})
    audio_model, splits = music.fit(recipe)
    names = list(INSTRUMENTS)
    program_class = {p: i for i, (_, (_, progs)) in enumerate(INSTRUMENTS.items()) for p in progs}
    ds = music.ds

    def clips(part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.array([int(i) for i in part if ds.records[int(i)]["program"] in program_class])
        return idx, np.array([program_class[ds.records[int(i)]["program"]] for i in idx])

    test_idx, test_y = clips(splits.test)
    train_idx, train_y = clips(splits.train)
    a_test = torch.from_numpy(music.cached["audio"].record_features(test_idx)[0])
    a_train = torch.from_numpy(music.cached["audio"].record_features(train_idx)[0])

    image_model = AlignedModel.from_pretrained(ROOT / image_model_dir, device="cpu")
    emoji = load_dataset("emoji")
    enc_img = image_model.encoders["image"]
    want = {code: i for i, (code, _) in enumerate(INSTRUMENTS.values())}
    img_rows = [(i, want[r["concept"]], r["style"]) for i, r in enumerate(emoji.records) if r["concept"] in want]
    test_imgs = [(i, y) for i, y, s in img_rows if s == "apple"]
    train_imgs = [(i, y) for i, y, s in img_rows if s != "apple"]
    raw = lambda rows: torch.as_tensor(enc_img.encode([emoji.items(i, "image")[0] for i, _ in rows],  # noqa: E731
                                                     layers=image_model.layers["image"], convert_to_numpy=False)).float()
    x_test_img, x_train_img = raw(test_imgs), raw(train_imgs)
    y_test_img = np.array([y for _, y in test_imgs])
    y_train_img = np.array([y for _, y in train_imgs])

    # emergent: audio-text model and image-text model meet only through the instrument names
    pa = _profiles(audio_model, audio_model.project("audio", a_test), names, "sound")
    pi = _profiles(image_model, image_model.project("image", x_test_img), names, "emoji")
    sim = pa @ pi.T
    emergent = {"audio->image": _topk_scores(sim, test_y, y_test_img),
                "image->audio": _topk_scores(sim.T, y_test_img, test_y)}

    # paired: the few real audio-image pairs (every training clip of a class with each training-style emoji)
    pair_x = list(range(len(train_idx)))
    pair_y = [[j for j, y in enumerate(y_train_img) if y == train_y[i]] for i in pair_x]
    pairs = Pairs.from_lists(pair_x, pair_y, [int(train_y[i]) for i in pair_x])
    fitted = fit(get_recipe("lstsq"), {}, Features([a_train.numpy()], ["final"]), Features([x_train_img.numpy()], ["final"]),
                 pairs, ("audio", "image"), None, None, "cpu", quiet)
    za = F.normalize(fitted.projections["audio"](a_test), dim=-1)
    zi = F.normalize(fitted.projections["image"](x_test_img), dim=-1)
    sim_p = (za @ zi.T).detach()
    paired = {"audio->image": _topk_scores(sim_p, test_y, y_test_img),
              "image->audio": _topk_scores(sim_p.T, y_test_img, test_y)}

    k = len(names)
    counts = np.bincount(test_y, minlength=k) / len(test_y)
    chance = {"audio->image": {"top1": 1 / k, "top3": 3 / k},
              "image->audio": {"top1": float(counts[y_test_img].mean()),
                               "top3": float(np.mean([1 - (1 - counts[y]) ** 3 for y in y_test_img]))}}
    return {"classes": names, "n_test_clips": int(len(test_idx)), "n_test_images": len(test_imgs),
            "n_pairs": len(pair_x), "n_train_images": len(train_imgs), "audio_recipe": recipe,
            "image_model": image_model_dir, "emergent": emergent, "paired": paired, "chance": chance}


def binding_table(results: list[dict[str, Any]]) -> str:
    """One column of emergent scores per audio-text recipe, then the paired baseline and chance."""
    rows = []
    for d in ("audio->image", "image->audio"):
        for k in ("top1", "top3"):
            rows.append([d, k, *[f"{100 * r['emergent'][d][k]:.1f}" for r in results],
                         f"{100 * results[0]['paired'][d][k]:.1f}", f"{100 * results[0]['chance'][d][k]:.1f}"])
    heads = [f"emergent, audio-text by {r['audio_recipe']} %" for r in results]
    return markdown(["direction", "metric", *heads, "paired (real audio-image pairs, lstsq) %", "chance %"], rows)


# == throughput =======================================================================================
def run_throughput(n: int = 64) -> list[dict[str, Any]]:
    ds = load_dataset("spoken")
    sub = ds.subset(np.arange(n), name=f"spoken-{n}")
    rows = []
    for spec in ("logmel", "musicnn-mtt", "eff-word-net"):
        enc = load_encoder(spec, device="cpu")
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            extract(sub, enc, Path(tmp) / "s", batch_size=32, show_progress=False)
            dt = time.perf_counter() - t0
        rows.append({"encoder": enc.spec, "clips": n, "seconds": dt, "clips_per_s": n / dt,
                     "threads": torch.get_num_threads()})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="recipes,seeds,binding,throughput")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--tasks", default="music,speech")
    ap.add_argument("--encoders", default=None, help="audio encoders of --parts recipes (default: each task's)")
    ap.add_argument("--audio-layers", default=None, help="audio layers to align, e.g. temporal (default: final)")
    ap.add_argument("--protocols", default=None, help="protocols of --parts recipes (default: each task's)")
    ap.add_argument("--seeds", type=int, default=3, help="training seeds of --parts seeds")
    ap.add_argument("--binding-recipes", default="lstsq,mlp", help="audio-text recipes of the emergent rows")
    ap.add_argument("--image-model", default="runs/default/model")
    args = ap.parse_args()
    parts = args.parts.split(",")
    cmd = command("audio.py", [shlex.quote(a) for a in sys.argv[1:]])  # protocol names hold spaces
    if "recipes" in parts:
        split = lambda v: v.split(",") if v else None  # noqa: E731
        rows = run_recipes(args.recipes.split(","), args.tasks.split(","), split(args.encoders), split(args.audio_layers),
                           split(args.protocols))
        tasks = args.tasks.split(",")
        name = "audio" if sorted(tasks) == sorted(TASKS) else "audio_" + "_".join(tasks)
        name += "_layers_" + "_".join(split(args.audio_layers)) if args.audio_layers else ""
        name += "_" + "_".join(p.split(" (")[0].replace(" ", "-") for p in split(args.protocols)) if args.protocols else ""
        write(name, {"rows": rows}, recipes_table(rows), cmd)
    if "binding" in parts:
        res = [run_binding(r, args.image_model) for r in args.binding_recipes.split(",")]
        write("audio_binding", {"runs": res}, binding_table(res), cmd)
    if "seeds" in parts:
        tasks = args.tasks.split(",")
        rows = run_seeds(args.seeds, tasks)
        write("audio_seeds" + ("" if sorted(tasks) == sorted(TASKS) else "_" + "_".join(tasks)), {"rows": rows},
              seeds_table(rows), cmd)
    if "throughput" in parts:
        rows = run_throughput()
        write("audio_throughput", {"rows": rows}, markdown(["encoder", "clips", "s", "clips/s", "torch threads"],
              [[r["encoder"], r["clips"], f"{r['seconds']:.1f}", f"{r['clips_per_s']:.1f}", r["threads"]] for r in rows]), cmd)


if __name__ == "__main__":
    main()
