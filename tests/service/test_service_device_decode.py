"""QSCORE_DEVICE_DECODE: JPEG uploads decoded in batches by torchvision on the encoder's device
(here the CPU; nvJPEG on a GPU), with the service's per-file errors kept."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from service_helpers import LiveServer

from models.data.images import decode_image
from models.registry.versions import Registry
from models.scoring.scorer import Scorer
from service.device_decode import batch_pixels, decodable_on_device, decode_jpegs


def cifar_jpegs(cifar_slice: Path, n: int) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in sorted((cifar_slice / "test").rglob("*.jpg"))[:n]]


def test_decode_jpegs_matches_pillow_preprocessing(service_registry: Registry, cifar_slice: Path) -> None:
    imported = service_registry.load_model("tiny")
    scorer = Scorer(imported.encoder, imported.fingerprint, service_registry.load_feature_set("tiny"), "cpu")
    blobs = [b for _, b in cifar_jpegs(cifar_slice, 8)]
    on_device = decode_jpegs(blobs, "cpu", imported.encoder.spec.image_size)
    pillow = torch.stack([torch.tensor(scorer.preprocess(decode_image(b))).permute(2, 0, 1) for b in blobs])
    assert on_device.dtype == pillow.dtype == torch.uint8
    assert on_device.shape == pillow.shape == (8, 3, 32, 32)
    gap = (on_device.int() - pillow.int()).abs()
    assert int(gap.max()) <= 12 and float(gap.float().mean()) < 1.0  # a few 1/255 steps at most


def test_batch_pixels_mixes_preprocessed_images_and_files_and_names_broken_ones(
    service_registry: Registry, cifar_slice: Path
) -> None:
    imported = service_registry.load_model("tiny")
    scorer = Scorer(imported.encoder, imported.fingerprint, service_registry.load_feature_set("tiny"), "cpu")
    (_, a), (_, b) = cifar_jpegs(cifar_slice, 2)
    broken = a[: len(a) // 3]  # a JPEG header, then nothing
    prepared = scorer.preprocess(decode_image(b))
    pixels, errors = batch_pixels(scorer, [a, prepared, broken])
    assert pixels is not None and pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.uint8
    assert errors[0] is None and errors[1] is None and errors[2] is not None
    assert errors[2].code == "corrupt_image"
    assert torch.equal(pixels[1], torch.tensor(prepared).permute(2, 0, 1))


def test_decodable_on_device_only_for_plain_jpegs(cifar_slice: Path) -> None:
    ((_, jpeg),) = cifar_jpegs(cifar_slice, 1)
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("CMYK").save(cmyk, "JPEG")
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(png, "PNG")
    assert decodable_on_device(jpeg, 10_000)
    assert not decodable_on_device(jpeg, 100)  # over the pixel cap: Pillow's path answers too_many_pixels
    assert not decodable_on_device(cmyk.getvalue(), 10_000)
    assert not decodable_on_device(png.getvalue(), 10_000)


def test_score_with_device_decode_scores_like_pillow_and_keeps_file_errors(
    make_server: Callable[..., LiveServer], cifar_slice: Path
) -> None:
    uploads = cifar_jpegs(cifar_slice, 6)
    broken = ("broken.jpg", uploads[0][1][:200])
    files = [("files", (name, blob, "image/jpeg")) for name, blob in [*uploads, broken]]
    device = make_server(device_decode=True)
    pillow = make_server()
    with device.client() as d, pillow.client() as p:
        on_device = d.post("/score", files=files)
        reference = p.post("/score", files=files)
    assert on_device.status_code == reference.status_code == 200
    got, want = on_device.json()["results"], reference.json()["results"]
    assert [r["filename"] for r in got] == [n for n, _ in uploads] + ["broken.jpg"]
    np.testing.assert_allclose([r["q_score"] for r in got[:6]], [r["q_score"] for r in want[:6]], atol=1e-3)
    assert got[6]["q_score"] is None and got[6]["error"]["code"] == "corrupt_image"
    assert got[6]["error"] == want[6]["error"]
    assert device.metric("qscore_errors_total", code="corrupt_image") == 1
