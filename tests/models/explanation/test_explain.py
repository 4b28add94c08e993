"""One image explained: the verdict is the scorer's, the decomposition adds up, the heatmaps are exact."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.explanation.explain import MAX_TOP, Explainer
from models.scoring.scorer import Scorer


@pytest.fixture(scope="module")
def explainer(tiny_model: tuple) -> Explainer:
    encoder, digest, feature_set = tiny_model
    return Explainer(Scorer(encoder, digest, feature_set, device="cpu"))


def _pixels(cifar_slice: Path, n: int = 6) -> list[np.ndarray]:
    files = sorted((cifar_slice / "test").glob("*/*.jpg"))[:: 100 // n][:n]
    return [np.asarray(Image.open(f).convert("RGB"), dtype=np.uint8) for f in files]


def test_explanation_agrees_with_the_scorer(explainer: Explainer, cifar_slice: Path) -> None:
    scorer = explainer.scorer
    for pixels in _pixels(cifar_slice):
        verdict = scorer.score([pixels], features=True)[0]
        explanation = explainer.explain(pixels, top=4)
        assert explanation.score == verdict
        dec = explanation.decomposition
        assert dec.q_score == pytest.approx(verdict.q_score, abs=1e-9)
        assert sorted((c.index, c.value) for c in dec.active) == [
            (f.index, pytest.approx(f.value)) for f in verdict.discriminative_active
        ]
        assert dec.l1_norm == pytest.approx(verdict.l1_norm, rel=1e-6)
        assert len(explanation.heatmaps) == 4 and explanation.method == "channel_map"
        for hm in explanation.heatmaps:
            assert float(hm.map.mean()) == pytest.approx(hm.feature.value, rel=1e-4, abs=1e-6)
        # the top features are the active ones first
        active = [c.index for c in dec.active]
        assert [hm.feature.index for hm in explanation.heatmaps][: len(active)] == active[:4]


def test_explanation_json_with_pictures_and_arrays(explainer: Explainer, cifar_slice: Path) -> None:
    pixels = _pixels(cifar_slice, 1)[0]
    row = explainer.explain(pixels, top=2).row(arrays=True)
    assert set(row) == {"score", "decomposition", "why", "heatmaps"}
    maps = row["heatmaps"]
    assert (maps["method"], maps["image_size"], maps["png_size"]) == ("channel_map", 32, 32)
    image = Image.open(io.BytesIO(base64.b64decode(maps["image_png"])))
    assert image.size == (32, 32) and np.array_equal(np.asarray(image), pixels)
    for entry in maps["features"]:
        assert entry["map_shape"] == [4, 4] and np.mean(entry["map"]) == pytest.approx(entry["value"], rel=1e-4)
        assert Image.open(io.BytesIO(base64.b64decode(entry["png"]))).size == (32, 32)
    plain = explainer.explain(pixels, top=2).row(pictures=False, size=96)
    assert plain["heatmaps"]["image_png"] is None and all(
        e["png"] is None and e["map"] is None for e in plain["heatmaps"]["features"]
    )
    assert Image.open(
        io.BytesIO(base64.b64decode(explainer.explain(pixels, 1).row(size=96)["heatmaps"]["features"][0]["png"]))
    ).size == (96, 96)


def test_top_is_bounded(explainer: Explainer, cifar_slice: Path) -> None:
    pixels = _pixels(cifar_slice, 1)[0]
    for bad in (0, MAX_TOP + 1):
        with pytest.raises(ValueError, match=f"top must be between 1 and {MAX_TOP}"):
            explainer.explain(pixels, top=bad)


def test_onnx_encoders_are_explained_by_occlusion(tiny_model: tuple, cifar_slice: Path, tmp_path: Path) -> None:
    # ONNX Runtime has no autograd: gradient x input used to fail on every ONNX encoder
    import torch

    from models.encoders.loading import load_encoder

    encoder, _, feature_set = tiny_model
    path = tmp_path / "tiny.onnx"
    x = torch.rand(2, 3, 32, 32)
    shapes = ({0: torch.export.Dim("batch", min=1)},)
    torch.onnx.export(encoder, (x,), dynamo=True, dynamic_shapes=shapes, verbose=False).save(
        str(path), external_data=False
    )
    spec = encoder.spec
    onnx = load_encoder(path, mean=spec.mean, std=spec.std)
    ref = feature_set.encoder.model_copy(update={"fingerprint": onnx.fingerprint})
    onnx_explainer = Explainer(Scorer(onnx.encoder, onnx.fingerprint, feature_set.model_copy(update={"encoder": ref})))
    pixels = _pixels(cifar_slice, 1)[0]
    explanation = onnx_explainer.explain(pixels, top=3)
    assert explanation.method == "occlusion" and len(explanation.heatmaps) == 3
    torch_explanation = Explainer(Scorer(encoder, tiny_model[1], feature_set, device="cpu")).explain(pixels, top=3)
    assert [hm.feature.index for hm in explanation.heatmaps] == [hm.feature.index for hm in torch_explanation.heatmaps]
    for hm in explanation.heatmaps:
        assert hm.map.shape == (8, 8) and bool(np.isfinite(np.asarray(hm.map)).all())
    row = explanation.row(arrays=True)
    assert row["heatmaps"]["method"] == "occlusion"
    assert all(Image.open(io.BytesIO(base64.b64decode(e["png"]))).size == (32, 32) for e in row["heatmaps"]["features"])
