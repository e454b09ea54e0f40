"""The prompt cache (unialign_train.features.texts): what encoding the same texts again returns."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from unialign.encoders import load_encoder
from unialign_train.features.texts import encode_texts, texts_path

PROMPTS = ["an emoji of a red heart.", "an emoji of a cat face.", "a drawing of a red heart."]


def test_cached_texts_are_the_encoders_output_without_the_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    """The first call stores ``encode``'s output; the same call again returns it, bit for bit (one code
    path), from a lazily built encoder that never loads its model. Another layer set, batch size or text
    is another entry."""
    monkeypatch.setenv("UNIALIGN_HOME", str(tmp_path))
    enc = load_encoder("st:minilm?backend=torch")
    first = encode_texts(enc, PROMPTS, ["final", "layer2"])
    # exact: encode_texts runs this very call (a rerun), then returns what it saved (a load)
    assert np.array_equal(first.numpy(), enc.encode(PROMPTS, batch_size=256, layers=["final", "layer2"]))
    fresh = load_encoder("st:minilm?backend=torch")
    assert not fresh.loaded
    assert np.array_equal(encode_texts(fresh, PROMPTS, ["final", "layer2"]).numpy(), first.numpy()) and not fresh.loaded
    paths = {texts_path(enc, PROMPTS, ["final", "layer2"], 256), texts_path(enc, PROMPTS, ["final"], 256),
             texts_path(enc, PROMPTS, ["final", "layer2"], 8), texts_path(enc, PROMPTS[:2], ["final", "layer2"], 256),
             texts_path(load_encoder("st:minilm?backend=onnx"), PROMPTS, ["final", "layer2"], 256)}
    assert len(paths) == 5


@pytest.mark.parametrize("damage", ["truncate", "other shape"])
def test_a_damaged_entry_is_recomputed_and_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    damage: str) -> None:
    monkeypatch.setenv("UNIALIGN_HOME", str(tmp_path))
    enc = load_encoder("st:minilm?backend=torch")
    want = encode_texts(enc, PROMPTS, ["final"]).numpy()
    path = texts_path(enc, PROMPTS, ["final"], 256)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        np.save(path, want[:2])
    with pytest.warns(UserWarning, match=f"cached text features {path}"):
        again = encode_texts(enc, PROMPTS, ["final"]).numpy()
    assert np.array_equal(again, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the entry was replaced: no warning now
        assert np.array_equal(encode_texts(enc, PROMPTS, ["final"]).numpy(), want)
