"""Zero-shot and retrieval metrics with CLIP_benchmark's meanings, chance levels, report format."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unialign.results import markdown_table, record, result_name, write_results
from unialign.search import build_index, topk
from unialign.zeroshot import get_templates, zero_shot_classifier
from unialign_train.evaluate.metrics import retrieval_chance, retrieval_scores, zero_shot_chance, zero_shot_scores

from conftest import chunk_size


def test_zero_shot_scores_by_hand():
    classes = torch.eye(3)
    imgs = F.normalize(torch.tensor([[1.0, 0.1, 0], [0.2, 1.0, 0.0], [1.0, 0.0, 0.5], [0, 0, 1.0]]), dim=-1)
    labels = [0, 1, 2, 2]  # image 2 is predicted 0 (wrong), the others right
    s = zero_shot_scores(imgs, classes, labels)
    assert s["acc1"] == pytest.approx(0.75)
    assert s["acc5"] == pytest.approx(1.0)
    assert s["mean_per_class_recall"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_zero_shot_classifier_averages_normalised_templates():
    table = {"a x": [2.0, 0.0], "b x": [0.0, 1.0], "a y": [0.0, 3.0], "b y": [0.0, 3.0]}
    seen = []

    def encode(prompts):  # two templates of different norms per class
        seen.extend(prompts)
        return np.asarray([table[p] for p in prompts])

    w = zero_shot_classifier(encode, ["x", "y"], ["a {}", "b {}"])
    assert seen == ["a x", "b x", "a y", "b y"]  # class-major, every template
    torch.testing.assert_close(w, torch.tensor([[2 ** -0.5, 2 ** -0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError):
        zero_shot_classifier(encode, [], ["a {}"])


def test_retrieval_with_several_captions():
    img = torch.eye(3)
    # captions: 0,1 -> image 0; 2 -> image 1; 3 -> image 2 (but looks like image 0)
    txt = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [1.0, 0, 0.2]])
    txt = F.normalize(txt, dim=-1)
    s = retrieval_scores(img, txt, [0, 0, 1, 2], ks=(1, 2))
    assert s["image_retrieval_recall@1"] == pytest.approx(0.75)  # caption 3 finds image 0 first
    assert s["image_retrieval_recall@2"] == pytest.approx(1.0)
    # image 2's best texts are 3 (cos .196) then ... ; image 0 hits caption 0
    assert s["text_retrieval_recall@1"] == pytest.approx(1.0)


def test_retrieval_chunks_and_ties_follow_clip_benchmark():
    """Chunking the similarity matrix changes nothing; exact ties (two identical captions of different
    images) are broken by torch.topk over ``texts @ images.T`` as CLIP_benchmark breaks them."""
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(120, 16, generator=g), dim=-1)
    t2i = np.repeat(np.arange(40), 3)
    txt[3] = txt[0]  # caption 3 (image 1) is caption 0 (image 0) again: a tie for every image query
    whole = retrieval_scores(img, txt, t2i, ks=(1, 5))
    assert retrieval_scores(img, txt, t2i, ks=(1, 5), budget=7) == whole  # same values, same hits
    sim = txt @ img.T  # CB's recall_at_k, written out
    pos = torch.zeros_like(sim, dtype=torch.bool)
    pos[torch.arange(120), torch.as_tensor(t2i)] = True
    for k in (1, 5):
        cb_i = pos.gather(1, torch.topk(sim, k, dim=1)[1]).any(1).float().mean().item()
        cb_t = pos.T.gather(1, torch.topk(sim.T, k, dim=1)[1]).any(1).float().mean().item()
        assert whole[f"image_retrieval_recall@{k}"] == cb_i and whole[f"text_retrieval_recall@{k}"] == cb_t


def test_chance_levels_match_simulation():
    torch.manual_seed(0)
    t2i = np.repeat(np.arange(50), 3)
    sims = []
    for _ in range(200):
        img, txt = F.normalize(torch.randn(50, 8), dim=-1), F.normalize(torch.randn(150, 8), dim=-1)
        sims.append(retrieval_scores(img, txt, t2i, ks=(5,)))
    ch = retrieval_chance(50, t2i, ks=(5,))
    for k in ("image_retrieval_recall@5", "text_retrieval_recall@5"):
        assert np.mean([s[k] for s in sims]) == pytest.approx(ch[k], abs=0.02)
    assert zero_shot_chance([0, 1], 400)["acc1"] == pytest.approx(1 / 400)


@pytest.mark.numerics
def test_topk_chunked_and_faiss_agree_with_full():
    """The one top-k: chunked torch and an exact FAISS index find the same neighbours as one full matmul
    (random scores: no ties), with scores equal to float32 rounding."""
    torch.manual_seed(0)
    q, k = torch.randn(37, 5), torch.randn(23, 5)
    ref_s, ref_i = torch.topk(q @ k.T, 4)
    s, i = topk(q, k, 4, chunk=chunk_size(5))
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=1e-6)
    index, info = build_index(k.numpy(), "flat")
    s2, i2 = topk(q, None, 4, index=index)
    assert info["kind"] == "flat" and torch.equal(i2, ref_i)
    torch.testing.assert_close(s2, ref_s, rtol=1e-5, atol=1e-5)


def test_report_is_clip_benchmark_shaped(tmp_path):
    r = record("emoji-test", "m", "runs/x", "zeroshot_classification", {"acc1": 0.2, "acc5": 0.4, "mean_per_class_recall": 0.2},
               {"acc1": 0.01, "acc5": 0.05, "mean_per_class_recall": 0.01})
    paths = write_results(tmp_path, [r])
    assert paths[0].name == "emoji-test_x_m_en_zeroshot_classification.json" == result_name(r)  # CB's file names
    data = json.loads(paths[0].read_text())
    assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(data)
    table = markdown_table([r])
    assert "| emoji-test | zeroshot_classification | acc1 | 20.00 | 1.00 | 20.0 |" in table


def test_templates_validation():
    assert get_templates("emoji")[0].count("{}") == 1
    with pytest.raises(ValueError):
        get_templates(["no placeholder"])
    with pytest.raises(ValueError):
        get_templates("nope")
