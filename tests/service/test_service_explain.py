"""POST /explain, GET /atlas and the offline docs against a real uvicorn server."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from service_helpers import LiveServer

from models.explanation.atlas import AtlasConfig, compute_atlas
from models.registry.versions import Registry
from service.explain_worker import ExplainBusy, ExplainWorker


def _jpeg(size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


TRUNCATED_JPEG = _jpeg()[:300]


def _image(cifar_slice: Path, n: int = 0) -> tuple[str, bytes, str]:
    path = sorted((cifar_slice / "test").rglob("*.jpg"))[n]
    return (path.name, path.read_bytes(), "image/jpeg")


def test_explain_agrees_with_score_and_its_maps_are_exact(server: LiveServer, cifar_slice: Path) -> None:
    with server.client() as client:
        for n in (0, 37, 71):
            image = _image(cifar_slice, n)
            scored = client.post("/score", files={"files": image}, params={"features": "true"}).json()
            response = client.post("/explain", files={"files": image}, params={"top": 4, "arrays": "true"})
            assert response.status_code == 200, response.text
            body = response.json()
            verdict = scored["results"][0]
            assert body["filename"] == image[0] and body["model"] == scored["model"]
            assert body["score"] == {k: v for k, v in verdict.items() if k not in ("filename", "error")}
            dec = body["decomposition"]
            assert dec["q_score"] == pytest.approx(verdict["q_score"], abs=1e-12)
            assert dec["n_active"] == len(verdict["discriminative_active"]) == len(dec["active"])
            assert dec["l1_norm"] == pytest.approx(dec["discriminative_mass"] + dec["noisy_mass"], rel=1e-6)
            if dec["active"]:
                assert sum(c["share"] for c in dec["active"]) == pytest.approx(1.0)
            why = body["why"]  # the typicality's components: the largest is the typicality
            components = why["typicality"]["components"]
            assert components[0]["name"] == why["typicality"]["driver"]
            assert components[0]["typicality"] == pytest.approx(verdict["typicality"], rel=1e-9)
            assert [c["atypical"] for c in components] == [c["typicality"] > 1 for c in components]
            if why["risk"] is not None:
                r = why["risk"]
                assert 1 - (1 - r["of_a_class"]) * (1 - r["no_class"]) == pytest.approx(verdict["risk"], abs=1e-9)
            maps = body["heatmaps"]
            assert maps["method"] == "channel_map" and len(maps["features"]) == 4
            for entry in maps["features"]:
                # exact: the channel map before upsampling averages to the feature's value
                assert np.mean(entry["map"]) == pytest.approx(entry["value"], rel=1e-4, abs=1e-6)
                picture = Image.open(io.BytesIO(base64.b64decode(entry["png"])))
                assert picture.format == "PNG" and picture.size == (32, 32)
        plain = client.post("/explain", files={"files": _image(cifar_slice)}).json()
    assert len(plain["heatmaps"]["features"]) == 3 and all(e["map"] is None for e in plain["heatmaps"]["features"])


def test_explain_runs_apart_from_the_score_batches(server: LiveServer, cifar_slice: Path) -> None:
    batches = server.metric("qscore_batch_size_count")
    scored = server.metric("qscore_images_scored_total")
    explained = server.metric("qscore_explain_duration_seconds_count")
    with server.client() as client:
        assert client.post("/explain", files={"files": _image(cifar_slice)}).status_code == 200
    assert server.metric("qscore_batch_size_count") == batches  # the batcher never saw it
    assert server.metric("qscore_images_scored_total") == scored
    assert server.metric("qscore_explain_duration_seconds_count") == explained + 1


@pytest.mark.parametrize(
    ("files", "params", "status", "code"),
    [
        (
            [("files", ("a.jpg", b"x", "image/jpeg")), ("files", ("b.jpg", b"y", "image/jpeg"))],
            {},
            413,
            "too_many_files",
        ),
        ([("files", ("a.txt", b"not an image", "text/plain"))], {}, 422, "not_an_image"),
        ([("files", ("a.jpg", b"", "image/jpeg"))], {}, 422, "empty_file"),
        ([("files", ("a.jpg", TRUNCATED_JPEG, "image/jpeg"))], {}, 422, "corrupt_image"),
        ([("other", ("a.jpg", b"x", "image/jpeg"))], {}, 422, "no_files"),
        ([("files", ("a.jpg", b"x" * (1024 * 1024 + 1), "image/jpeg"))], {}, 413, "file_too_large"),
        (None, {"top": 9}, 422, "invalid_request"),
        (None, {"top": 0}, 422, "invalid_request"),
    ],
)
def test_explain_refuses_what_score_refuses(
    server: LiveServer, cifar_slice: Path, files: list | None, params: dict, status: int, code: str
) -> None:
    with server.client() as client:
        response = client.post("/explain", files=files or {"files": _image(cifar_slice)}, params=params)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail["code"] == code
    if code == "too_many_files":
        assert detail["limit"] == 1 and "POST /explain takes one image" in detail["message"]


def test_explain_needs_multipart(server: LiveServer) -> None:
    with server.client() as client:
        response = client.post("/explain", content=b"{}", headers={"content-type": "application/json"})
    assert response.status_code == 415 and response.json()["detail"]["code"] == "unsupported_media_type"


def test_explain_answers_503_when_its_queue_is_full(make_server: Callable[..., LiveServer], cifar_slice: Path) -> None:
    live = make_server(max_explain_queue=2)
    worker: ExplainWorker = live.app.state.explain
    worker.in_flight = 2  # as if two explanations waited or ran
    try:
        with live.client() as client:
            busy = client.post("/explain", files={"files": _image(cifar_slice)})
            scored = client.post("/score", files={"files": _image(cifar_slice)})
    finally:
        worker.in_flight = 0
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["detail"] == {
        "code": "explain_busy",
        "message": "2 explanations are waiting or running (QSCORE_MAX_EXPLAIN_QUEUE); retry shortly",
        "limit": 2,
    }
    assert scored.status_code == 200  # /score does not wait on explanations
    with live.client() as client:
        assert client.post("/explain", files={"files": _image(cifar_slice)}).status_code == 200


def test_explain_worker_runs_one_at_a_time_and_bounds_the_wait() -> None:
    async def scenario() -> list[object]:
        worker = ExplainWorker(limit=2)
        release = asyncio.Event()
        loop = asyncio.get_running_loop()
        order: list[object] = []

        def slow(tag: str) -> str:
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)
            order.append(tag)
            return tag

        first = asyncio.ensure_future(worker.run(slow, "a"))
        second = asyncio.ensure_future(worker.run(order.append, "b"))
        await asyncio.sleep(0.05)
        assert worker.in_flight == 2 and worker.full
        try:
            await worker.run(order.append, "c")
        except ExplainBusy:
            order.append("busy")
        release.set()
        assert await first == "a"
        await second
        assert worker.in_flight == 0
        worker.shutdown()
        return order

    assert asyncio.run(scenario()) == ["busy", "a", "b"]


@pytest.fixture(scope="module")
def atlas_registry(service_registry: Registry, tiny_model: tuple, cifar_slice: Path) -> Registry:
    encoder, _, _ = tiny_model
    fs = service_registry.load_feature_set("tiny")
    atlas = compute_atlas(
        encoder, fs, cifar_slice / "train", config=AtlasConfig(top_k=3, tail_sample=2, batch_size=100)
    )
    atlas.meta.update(dataset="slice-train")
    service_registry.add_atlas("tiny", "atlas-test", atlas)
    return service_registry


def test_atlas_routes_serve_the_registry_atlas(server: LiveServer, atlas_registry: Registry) -> None:
    fs = atlas_registry.load_feature_set("tiny")
    with server.client() as client:
        index = client.get("/atlas").json()
        assert (index["feature_set"], index["atlas"], index["n_images"], index["top_k"]) == (
            "tiny",
            "atlas-test",
            300,
            3,
        )
        assert index["dataset"] == "slice-train" and index["method"] == "channel_map" and len(index["classes"]) == 10
        d = [f["index"] for f in index["features"] if f["group"] == "discriminative"]
        assert d == fs.discriminative
        j = next(f["index"] for f in index["features"] if f["n_dominant"] > 0)
        entry = client.get(f"/atlas/{j}").json()
        assert entry["index"] == j and 1 <= len(entry["top"]) <= 3 and entry["atlas"] == "atlas-test"
        assert sum(entry["classes"].values()) == entry["n_dominant"]
        assert entry["purity"] == pytest.approx(max(entry["classes"].values()) / entry["n_dominant"])
        sheet = client.get(entry["sheet_url"])
        assert sheet.status_code == 200 and sheet.headers["content-type"] == "image/png"
        # a column of 64 + 4 px per top image (at most 3 here) under its title, the sheet as wide as either
        width, height = Image.open(io.BytesIO(sheet.content)).size
        assert width >= 4 + len(entry["top"]) * 68 and height == 18 + 158 + 4
        named = client.get(f"/atlas/{j}", params={"feature_set": "tiny"}).json()
        assert named["top"] == entry["top"]

        missing = client.get("/atlas/100000")
        none_yet = client.get("/atlas", params={"feature_set": "tiny-b"})
        unknown = client.get("/atlas", params={"feature_set": "nope"})
        bad_name = client.get("/atlas", params={"feature_set": "../x"})
        negative = client.get("/atlas/-1")
    assert missing.status_code == 404 and missing.json()["detail"]["code"] == "feature_not_in_atlas"
    # what the atlas holds, counted by group (tail_sample=2: two of each tail)
    groups = [f["group"] for f in index["features"]]
    held = f"{len(d)} discriminative, 2 upper-tail, 2 lower-tail features"
    assert groups.count("upper_tail") == groups.count("lower_tail") == 2 and held in missing.json()["detail"]["message"]
    assert none_yet.status_code == 404 and none_yet.json()["detail"]["code"] == "atlas_not_found"
    assert "POST /jobs/atlas" in none_yet.json()["detail"]["message"]
    assert unknown.status_code == 404 and unknown.json()["detail"]["code"] == "version_not_found"
    assert bad_name.status_code == 422 and negative.status_code == 422


def test_docs_and_redoc_are_served_from_local_assets(server: LiveServer) -> None:
    with server.client() as client:
        for path, asset in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
            page = client.get(path)
            assert page.status_code == 200 and page.headers["content-security-policy"].startswith("default-src 'self'")
            assert f"/static-offline-docs/{asset}" in page.text
            assert "cdn." not in page.text and "https://" not in page.text.replace("https://fastapi", "")
            js = client.get(f"/static-offline-docs/{asset}")
            assert js.status_code == 200 and len(js.content) > 500_000
        ui = client.get("/ui/")
        assert ui.status_code == 200 and "<title>qscore" in ui.text and "content-security-policy" in ui.headers
        root = client.get("/", follow_redirects=False)
        assert root.status_code == 307 and root.headers["location"] == "/ui/"
