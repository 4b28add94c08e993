"""/score?predict=true: the served head's class and confidence per image, equal to the head's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from service_helpers import LiveServer, build_registry, make_settings

from models.data.images import decode_image
from models.data.transforms import eval_transform
from models.scoring.probe import HeadInfo, LinearHead


def test_predict_returns_the_heads_class_and_confidence(tmp_path: Path, tiny_model: tuple, cifar_slice: Path) -> None:
    registry = build_registry(tmp_path / "registry", tiny_model)
    encoder, _, fs = tiny_model
    classes = sorted(p.name for p in (cifar_slice / "test").iterdir())
    head = LinearHead(torch.randn(len(classes), encoder.feature_dim, generator=torch.Generator().manual_seed(0)),
                      torch.zeros(len(classes)), classes)  # fmt: skip
    with_head = registry.load_feature_set("tiny").with_head(
        head, HeadInfo(kind="linear", classes=classes, source="test")
    )
    registry.add_feature_set(with_head, version="tiny-head")
    registry.set_active("tiny", "tiny-head")
    paths = sorted((cifar_slice / "test").rglob("*.jpg"))[:5]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    with LiveServer(make_settings(registry.root)) as live, live.client() as client:
        lean = client.post("/score", files=files).json()["results"]
        full = client.post("/score", files=files, params={"predict": "true"}).json()["results"]
        bad = client.post("/score", files=files, params={"predict": "maybe"})
    assert all(r["predicted_class"] is None and r["confidence"] is None for r in lean)
    x = torch.stack([eval_transform(encoder.spec)(decode_image(p.read_bytes())) for p in paths])
    with torch.inference_mode():
        p = torch.softmax(head.logits(encoder.eval()(x).float()), dim=1)
    assert [r["predicted_class"] for r in full] == [classes[i] for i in p.argmax(dim=1).tolist()]
    np.testing.assert_allclose([r["confidence"] for r in full], p.max(dim=1).values.numpy(), rtol=1e-5)
    assert [r["q_score"] for r in full] == [r["q_score"] for r in lean]
    assert bad.status_code == 422 and "predict" in bad.text
