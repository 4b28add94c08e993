"""End to end: a real uvicorn server scoring real CIFAR-10 JPEGs, and hostile uploads."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from service_helpers import LiveServer

from models.data.images import decode_image
from models.data.transforms import eval_transform
from models.registry.versions import Registry
from models.scoring.qscore import q_score


def cifar_files(cifar_slice: Path, n: int) -> list[Path]:
    return sorted((cifar_slice / "test").rglob("*.jpg"))[:n]


def upload(paths: list[Path]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def expected_q(registry: Registry, version: str, blobs: list[bytes]) -> np.ndarray:
    """q_score computed directly, without the service, on the same decoded tensors."""
    imported = registry.load_model(version)
    fs = registry.load_feature_set(version)
    transform = eval_transform(imported.encoder.spec)
    x = torch.stack([transform(decode_image(b)) for b in blobs])
    with torch.inference_mode():
        h = imported.encoder.eval()(x).float()
    return q_score(h, fs.discriminative_indices, fs.eps).numpy()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and carries (almost) no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_score_cifar_images_matches_direct_q_score(
    server: LiveServer, service_registry: Registry, cifar_slice: Path
) -> None:
    paths = cifar_files(cifar_slice, 6)
    with server.client() as client:
        response = client.post("/score", files=upload(paths), params={"features": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["version"] == "tiny" and body["feature_set"]["version"] == "tiny"
    assert [r["filename"] for r in body["results"]] == [p.name for p in paths]
    expected = expected_q(service_registry, "tiny", [p.read_bytes() for p in paths])
    got = np.array([r["q_score"] for r in body["results"]])
    # One request is one batch here: the service computes exactly what q_score does.
    np.testing.assert_array_equal(got, expected.astype(np.float64))
    alpha = body["feature_set"]["alpha"]
    for r in body["results"]:
        assert r["error"] is None
        assert r["low_quality"] == (r["q_score"] < alpha)
        assert r["risk"] is None  # no evaluation calibrated this feature set
        assert r["l1_norm"] > 0
        active = {v["index"] for v in r["discriminative_active"]}
        assert active <= {v["index"] for v in r["dominant"]}
        assert (r["q_score"] > 0) == bool(active)


def test_score_without_features_answers_lean_results_with_the_same_scores(
    server: LiveServer, cifar_slice: Path
) -> None:
    paths = cifar_files(cifar_slice, 6)
    with server.client() as client:
        lean = client.post("/score", files=upload(paths))
        full = client.post("/score", files=upload(paths), params={"features": "true"})
    assert lean.status_code == 200 and full.status_code == 200, (lean.text, full.text)
    assert lean.headers["content-type"] == "application/json"
    lean_results, full_results = lean.json()["results"], full.json()["results"]
    for r in lean_results:
        assert r["dominant"] is None and r["discriminative_active"] is None
        assert set(r) == {
            "filename",
            "q_score",
            "low_quality",
            "typicality",
            "atypical",
            "risk",
            "reasons",
            "predicted_class",
            "confidence",
            "l1_norm",
            "dominant",
            "discriminative_active",
            "error",
        }
    assert [r["q_score"] for r in lean_results] == [r["q_score"] for r in full_results]
    assert [r["typicality"] for r in lean_results] == [r["typicality"] for r in full_results]
    assert [r["l1_norm"] for r in lean_results] == [r["l1_norm"] for r in full_results]
    assert any(r["dominant"] for r in full_results)
    assert lean.json()["model"] == full.json()["model"]


def test_score_concurrent_requests_are_batched(server: LiveServer, cifar_slice: Path) -> None:
    paths = cifar_files(cifar_slice, 40)
    scored_before = server.metric("qscore_images_scored_total", model_version="tiny")
    batches_before = server.metric("qscore_batch_size_count", model_version="tiny")
    images_before = server.metric("qscore_batch_size_sum", model_version="tiny")

    def one(path: Path) -> int:
        with server.client() as client:
            return client.post("/score", files=upload([path])).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, paths))
    assert statuses == [200] * len(paths)
    batches = server.metric("qscore_batch_size_count", model_version="tiny") - batches_before
    images = server.metric("qscore_batch_size_sum", model_version="tiny") - images_before
    assert images == len(paths)
    assert batches < len(paths), "no request was batched with another"
    assert server.metric("qscore_batch_size_bucket", model_version="tiny", le="1.0") < server.metric(
        "qscore_batch_size_count", model_version="tiny"
    )
    assert server.metric("qscore_images_scored_total", model_version="tiny") - scored_before == len(paths)


def test_score_formats_and_modes_are_converted(server: LiveServer, cifar_slice: Path) -> None:
    base = Image.open(cifar_files(cifar_slice, 1)[0])
    variants = {
        "a.png": ("PNG", base),
        "b.webp": ("WEBP", base),
        "c.bmp": ("BMP", base),
        "d.gif": ("GIF", base.convert("P")),
        "e.png": ("PNG", base.convert("L")),
        "f.png": ("PNG", base.convert("RGBA")),
        "g.jpg": ("JPEG", base.convert("CMYK")),
        "h.png": (
            "PNG",
            Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257).convert("I;16"),
        ),
    }
    files = []
    for name, (fmt, image) in variants.items():
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        files.append(("files", (name, buf.getvalue(), "application/octet-stream")))
    with server.client() as client:
        body = client.post("/score", files=files).json()
    assert [r["filename"] for r in body["results"]] == list(variants)
    assert all(r["error"] is None and r["q_score"] is not None for r in body["results"]), body


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("empty.jpg", b"", "empty_file"),
        ("notes.jpg", b"this is a text file, not a JPEG\n" * 10, "not_an_image"),
        ("bomb.png", png_header_only(30_000, 30_000), "too_many_pixels"),
        ("huge.png", png_header_only(10_000, 10_000), "too_many_pixels"),
    ],
)
def test_score_unusable_file_gets_error_entry_and_others_are_scored(
    server: LiveServer, cifar_slice: Path, name: str, data: bytes, code: str
) -> None:
    good = cifar_files(cifar_slice, 2)
    errors_before = server.metric("qscore_errors_total", model_version="tiny", code=code)
    files = upload(good[:1]) + [("files", (name, data, "image/jpeg"))] + upload(good[1:])
    with server.client() as client:
        response = client.post("/score", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [good[0].name, name, good[1].name]
    assert results[1]["error"]["code"] == code and results[1]["q_score"] is None
    # the limit that was exceeded, as every error body gives it
    assert results[1]["error"]["limit"] == (server.settings.max_image_pixels if code == "too_many_pixels" else None)
    assert results[0]["q_score"] is not None and results[2]["q_score"] is not None
    assert server.metric("qscore_errors_total", model_version="tiny", code=code) == errors_before + 1


def test_score_bad_query_value_is_a_counted_422(server: LiveServer, cifar_slice: Path) -> None:
    """A query the framework refuses before the handler runs is counted like the handler's own errors."""
    before = server.metric("qscore_errors_total", model_version="tiny", code="invalid_request")
    with server.client() as client:
        response = client.post("/score?predict=maybe", files=upload(cifar_files(cifar_slice, 1)))
    assert response.status_code == 422
    assert response.json()["detail"]["code"] == "invalid_request"
    assert "predict" in response.json()["detail"]["message"]
    assert server.metric("qscore_errors_total", model_version="tiny", code="invalid_request") == before + 1


def test_score_long_strip_is_scored_like_its_centre_crop(server: LiveServer) -> None:
    """A 1 x 200,000 PNG of a few hundred bytes was resized to 32 x 6,400,000 pixels first (seconds,
    a gigabyte); it is scored as the 32 x 32 crop torchvision's resize-and-crop keeps."""
    buf = io.BytesIO()
    Image.new("RGB", (200_000, 1), (40, 120, 200)).save(buf, format="PNG")
    crop = io.BytesIO()
    Image.new("RGB", (32, 32), (40, 120, 200)).save(crop, format="PNG")
    files = [
        ("files", ("strip.png", buf.getvalue(), "image/png")),
        ("files", ("crop.png", crop.getvalue(), "image/png")),
    ]
    with server.client() as client:
        response = client.post("/score", files=files)
    assert response.status_code == 200, response.text
    strip, square = response.json()["results"]
    assert strip["error"] is None and strip["q_score"] == square["q_score"] and strip["risk"] == square["risk"]


def test_score_truncated_jpeg_gets_corrupt_image(server: LiveServer, cifar_slice: Path) -> None:
    data = cifar_files(cifar_slice, 1)[0].read_bytes()
    with server.client() as client:
        body = client.post("/score", files=[("files", ("cut.jpg", data[: len(data) // 2], "image/jpeg"))]).json()
    assert body["results"][0]["error"]["code"] == "corrupt_image"
    assert "decoded" in body["results"][0]["error"]["message"]


def test_score_real_10000_square_png_is_refused(server: LiveServer) -> None:
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    with server.client() as client:
        body = client.post("/score", files=[("files", ("big.png", buf.getvalue(), "image/png"))]).json()
    assert body["results"][0]["error"]["code"] == "too_many_pixels"


def test_score_without_files_is_422(server: LiveServer) -> None:
    with server.client() as client:
        response = client.post("/score", files=[("other", ("x.txt", b"x", "text/plain"))])
    assert response.status_code == 422
    assert response.json()["detail"]["code"] == "no_files"


def test_score_too_many_files_is_413(server: LiveServer) -> None:
    files = [("files", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(server.settings.max_files + 1)]
    with server.client() as client:
        response = client.post("/score", files=files)
    assert response.status_code == 413
    assert response.json()["detail"] == {
        "code": "too_many_files",
        "limit": server.settings.max_files,
        "message": response.json()["detail"]["message"],
    }


def test_score_file_over_per_file_limit_is_413(server: LiveServer) -> None:
    big = b"\xff" * (server.settings.max_file_bytes + 1)
    with server.client() as client:
        response = client.post("/score", files=[("files", ("big.jpg", big, "image/jpeg"))])
    assert response.status_code == 413
    assert response.json()["detail"]["code"] == "file_too_large"
    assert response.json()["detail"]["limit"] == server.settings.max_file_bytes


def test_score_huge_body_is_413(server: LiveServer) -> None:
    huge = b"\0" * (server.settings.max_request_bytes + 10)
    with server.client() as client:
        response = client.post("/score", files=[("files", ("huge.jpg", huge, "image/jpeg"))])
    assert response.status_code == 413
    assert response.json()["detail"]["code"] == "request_too_large"
    assert response.json()["detail"]["limit"] == server.settings.max_request_bytes


def test_score_huge_chunked_body_is_413(server: LiveServer) -> None:
    boundary = "qscoreboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()

    def body():  # no Content-Length: sent chunked
        yield head
        for _ in range(server.settings.max_request_bytes // 65536 + 2):
            yield b"\0" * 65536

    with server.client() as client:
        response = client.post(
            "/score",
            content=body(),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        )
    assert response.status_code == 413
    assert response.json()["detail"]["code"] == "request_too_large"


def test_score_wrong_content_type_is_415(server: LiveServer) -> None:
    with server.client() as client:
        response = client.post("/score", json={"files": ["a.jpg"]})
    assert response.status_code == 415
    assert response.json()["detail"]["code"] == "unsupported_media_type"


def test_score_server_keeps_serving_after_hostile_inputs(server: LiveServer, cifar_slice: Path) -> None:
    with server.client() as client:
        client.post(
            "/score",
            content=b"\0" * 100,
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        response = client.post("/score", files=upload(cifar_files(cifar_slice, 1)))
        assert response.status_code == 200 and response.json()["results"][0]["q_score"] is not None
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["model_version"] == "tiny"


def test_metrics_expose_required_series(server: LiveServer, cifar_slice: Path) -> None:
    with server.client() as client:
        client.post("/score", files=upload(cifar_files(cifar_slice, 2)))
        text = client.get("/metrics").text
    for name in (
        "qscore_images_scored_total",
        "qscore_low_quality_images_total",
        "qscore_q_score_bucket",
        "qscore_request_duration_seconds_bucket",
        "qscore_batch_size_bucket",
        "qscore_queue_depth",
        "qscore_errors_total",
        "qscore_reference_q_median",
        "qscore_feature_set_coverage",
        "qscore_queue_wait_seconds_bucket",
    ):
        assert f"\n{name}{{" in text, name
    assert 'model_version="tiny"' in text


def test_app_sets_no_dependency_overrides(server: LiveServer) -> None:
    # With any override set, FastAPI rebuilds every dependency signature on every request.
    assert server.app.dependency_overrides == {}
    assert server.app.state.settings is server.settings


def test_full_queue_answers_503_before_reading_the_upload(
    make_server: Callable[..., LiveServer], cifar_slice: Path
) -> None:
    # An idle encoder holds a batch that is not full for up to 3 s: two images fill the queue.
    live = make_server(max_queue_images=2, max_batch_size=16, max_batch_wait_ms=3000.0)
    with ThreadPoolExecutor(1) as pool, live.client() as client:
        first = pool.submit(client.post, "/score", files=upload(cifar_files(cifar_slice, 2)))
        deadline = time.monotonic() + 5
        while live.metric("qscore_queue_depth") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        # Not even multipart: had the body been parsed, the answer would be 415.
        refused = client.post("/score", content=b"not an upload", headers={"content-type": "text/plain"})
        assert refused.status_code == 503, refused.text
        assert refused.json()["detail"] == {
            "code": "queue_full",
            "message": refused.json()["detail"]["message"],
            "limit": 2,
        }
        assert int(refused.headers["retry-after"]) >= 1
        # not ready meanwhile, to GET and to a load balancer's HEAD alike (which gets no body)
        not_ready, head = client.get("/readyz"), client.head("/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["reason"] == "the scoring queue is saturated"
        assert head.status_code == 503 and head.content == b""
        assert first.result().status_code == 200
        ready, alive = client.head("/readyz"), client.head("/healthz")
        assert (ready.status_code, ready.content, alive.status_code, alive.content) == (200, b"", 200, b"")
    assert live.metric("qscore_errors_total", code="queue_full") == 1
    assert live.metric("qscore_request_duration_seconds_count", status="503") == 1
