"""/score answers typicality, atypical, risk and reasons; metrics and /admin show them and the bank."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from service_helpers import LiveServer, sum_samples

from models.data.images import decode_image
from models.data.transforms import eval_transform
from models.registry.versions import Registry
from models.scoring.qscore import q_score_parts
from models.scoring.signals import finish_signals, signal_tensors


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _solid(colour: tuple[int, int, int]) -> bytes:
    return _png(Image.new("RGB", (32, 32), colour))


def test_score_flags_solid_colours_atypical_and_matches_direct_typicality(
    server: LiveServer, service_registry: Registry, cifar_slice: Path
) -> None:
    paths = sorted((cifar_slice / "test").rglob("*.jpg"))[:4]
    blobs = [p.read_bytes() for p in paths] + [_solid((200, 30, 30)), _solid((10, 10, 10))]
    files = [("files", (f"f{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    with server.client() as client:
        before = sum_samples(client.get("/metrics").text, "qscore_atypical_images_total")
        body = client.post("/score", files=files).json()
        text = client.get("/metrics").text
    results = body["results"]
    assert body["feature_set"]["bank_vectors"] == 300 and body["feature_set"]["typicality_threshold"] > 0
    # the same numbers computed without the service
    imported, fs = service_registry.load_model("tiny"), service_registry.load_feature_set("tiny")
    x = torch.stack([eval_transform(imported.encoder.spec)(decode_image(b)) for b in blobs])
    with torch.inference_mode():
        h = imported.encoder.eval()(x).float()
    spec = imported.encoder.spec
    pixels = x * torch.tensor(spec.std).view(1, 3, 1, 1) + torch.tensor(spec.mean).view(1, 3, 1, 1)
    parts = q_score_parts(h, fs.discriminative_indices, fs.eps)
    tensors = signal_tensors(h, pixels, parts, fs.typicality, fs.bank)
    sig = finish_signals({name: t.numpy() for name, t in tensors.items()}, fs.typicality)
    np.testing.assert_allclose([r["typicality"] for r in results], sig["typicality"], rtol=1e-3)
    for r in results:
        assert r["atypical"] == (r["typicality"] > 1)
        expected = (["q_below_alpha"] if r["low_quality"] else []) + (["atypical"] if r["atypical"] else [])
        assert r["reasons"] == expected
        assert r["risk"] is None  # no evaluation calibrated this feature set
    assert results[4]["atypical"] and results[5]["atypical"]
    assert "atypical" in results[4]["reasons"]
    flagged = sum(r["atypical"] for r in results)
    assert sum_samples(text, "qscore_atypical_images_total") - before == flagged
    assert sum_samples(text, "qscore_typicality_count") >= len(results)
    assert sum_samples(text, "qscore_reference_bank_bytes") == 300 * h.shape[1] * 4 + sum(
        c.numel() * 4 for c in fs.bank.prototypes.values()
    )
    assert "\nqscore_expected_atypical_ratio{" in text


def test_admin_active_shows_bank_memory(server: LiveServer) -> None:
    with server.client() as client:
        body = client.get("/admin/active").json()
    assert body["serving"]["bank_bytes"] > 0
    assert body["serving"]["feature_set"]["reference_atypical_share"] <= 0.05
