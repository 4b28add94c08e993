"""Admin endpoints: versions, atomic switching under load, fingerprint refusal, the API key."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from service_helpers import LiveServer
from test_service_score import cifar_files, expected_q, upload

from models.registry.versions import Registry


def test_admin_lists_versions_and_active_pair(make_server: Callable[..., LiveServer]) -> None:
    live = make_server()
    with live.client() as client:
        models = client.get("/admin/models").json()
        feature_sets = client.get("/admin/feature-sets").json()
        active = client.get("/admin/active").json()
    assert sorted(m["version"] for m in models) == ["tiny", "tiny-b"]
    assert sorted(f["version"] for f in feature_sets) == ["tiny", "tiny-b"]
    assert active["serving"]["model"]["version"] == "tiny"
    assert active["registry_active"] == {"model": "tiny", "feature_set": "tiny"}


def test_switch_under_load_never_fails_or_mixes_versions(
    make_server: Callable[..., LiveServer], cifar_slice: Path
) -> None:
    live = make_server()
    registry = Registry(live.settings.registry_root)
    paths = cifar_files(cifar_slice, 4)
    blobs = [p.read_bytes() for p in paths]
    expected = {v: expected_q(registry, v, blobs) for v in ("tiny", "tiny-b")}
    assert not np.allclose(expected["tiny"], expected["tiny-b"], rtol=1e-4)
    stop = threading.Event()
    seen: list[tuple[int, str, list[float]]] = []

    def load() -> None:
        with live.client() as client:
            while not stop.is_set():
                r = client.post("/score", files=upload(paths))
                body = r.json()
                seen.append(
                    (
                        r.status_code,
                        body.get("model", {}).get("version", ""),
                        [x["q_score"] for x in body.get("results", [])],
                    )
                )

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    with live.client() as client:
        for target in ("tiny-b", "tiny", "tiny-b"):
            time.sleep(0.4)
            r = client.post("/admin/switch", json={"model": target, "feature_set": target})
            assert r.status_code == 200, r.text
            assert r.json()["model"]["version"] == target
    time.sleep(0.4)
    stop.set()
    for t in threads:
        t.join()
    assert seen and all(status == 200 for status, _, _ in seen)
    assert {v for _, v, _ in seen} == {"tiny", "tiny-b"}
    for _, version, scores in seen:  # every response is entirely from the version it names
        np.testing.assert_allclose(scores, expected[version], rtol=1e-4, atol=1e-7)
    assert registry.active().model == "tiny-b"  # persisted


def test_switch_fingerprint_mismatch_is_refused_with_409(
    make_server: Callable[..., LiveServer],
) -> None:
    live = make_server()
    with live.client() as client:
        r = client.post("/admin/switch", json={"model": "tiny", "feature_set": "tiny-b"})
        active = client.get("/admin/active").json()
    assert r.status_code == 409
    assert r.json()["detail"]["code"] == "feature_set_mismatch"
    assert "tiny-b" in r.json()["detail"]["message"]
    assert active["serving"]["model"]["version"] == "tiny"


def test_switch_unknown_or_invalid_version_is_404_or_422(
    make_server: Callable[..., LiveServer],
) -> None:
    live = make_server()
    with live.client() as client:
        missing = client.post("/admin/switch", json={"model": "nope", "feature_set": "nope"})
        invalid = client.post("/admin/switch", json={"model": "../etc", "feature_set": "x"})
    assert missing.status_code == 404 and missing.json()["detail"]["code"] == "version_not_found"
    # the version named, the server's paths not
    assert missing.json()["detail"]["message"] == "no model version 'nope' in the registry's models"
    assert invalid.status_code == 422 and invalid.json()["detail"]["code"] == "invalid_request"
    assert invalid.json()["detail"]["errors"][0]["loc"] == ["body", "model"]


@pytest.mark.parametrize(
    ("body", "at"), [(b"notjson", "at character 0"), (b'{"model": "demo"', "at character 16")]
)  # (an empty body is a missing one: 422 invalid_request, body: Field required)
def test_a_json_body_that_is_not_json_is_400_malformed_body(
    make_server: Callable[..., LiveServer], body: bytes, at: str
) -> None:
    live = make_server()
    with live.client() as client:
        r = client.post("/admin/switch", content=body, headers={"content-type": "application/json"})
        jobs = client.post("/jobs/discover", content=body, headers={"content-type": "application/json"})
    for answer in (r, jobs):
        assert answer.status_code == 400, answer.text
        detail = answer.json()["detail"]
        assert detail["code"] == "malformed_body" and detail["message"].startswith(f"the body is not JSON ({at})")


def test_admin_needs_api_key_when_configured(make_server: Callable[..., LiveServer]) -> None:
    live = make_server(api_key="s3cret")
    with live.client() as client:
        no_key = client.get("/admin/models")
        wrong = client.post(
            "/admin/switch",
            json={"model": "tiny-b", "feature_set": "tiny-b"},
            headers={"X-API-Key": "nope"},
        )
        right = client.get("/admin/models", headers={"X-API-Key": "s3cret"})
        health = client.get("/healthz")
    assert no_key.status_code == 401 and no_key.json()["detail"]["code"] == "unauthorized"
    assert wrong.status_code == 401
    assert right.status_code == 200 and len(right.json()) == 2
    assert health.status_code == 200


def test_without_auto_switch_only_a_job_activation_is_followed(make_server: Callable[..., LiveServer]) -> None:
    """A job asked to activate its output ("activate": true) promises the switch: the service makes it
    without QSCORE_AUTO_SWITCH. A change by the command line (qscore activate) is left to a restart."""
    live = make_server(auto_switch=False, registry_poll_seconds=0.1)
    registry = Registry(live.settings.registry_root)
    with live.client() as client:
        registry.set_active("tiny-b", "tiny-b")  # as `qscore activate` does
        time.sleep(1.0)  # ten polls
        assert client.get("/readyz").json()["model_version"] == "tiny"
        assert client.get("/admin/active").json()["registry_active"] == {"model": "tiny-b", "feature_set": "tiny-b"}
        registry.set_active("tiny", "tiny", set_by="job:0123abcd")  # as a job with "activate": true does
        registry.set_active("tiny-b", "tiny-b", set_by="job:0123abcd")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and client.get("/readyz").json()["model_version"] != "tiny-b":
            time.sleep(0.1)
        assert client.get("/readyz").json()["model_version"] == "tiny-b"
        assert client.get("/admin/active").json()["registry_active"]["set_by"] == "job:0123abcd"


def test_auto_switch_follows_registry_active_pair(make_server: Callable[..., LiveServer]) -> None:
    live = make_server(auto_switch=True, registry_poll_seconds=0.1)
    Registry(live.settings.registry_root).set_active("tiny-b", "tiny-b")
    deadline = time.monotonic() + 10
    with live.client() as client:
        while time.monotonic() < deadline:
            if client.get("/readyz").json()["model_version"] == "tiny-b":
                break
            time.sleep(0.1)
        assert client.get("/admin/active").json()["serving"]["feature_set"]["version"] == "tiny-b"
        text = client.get("/metrics").text
    assert 'qscore_serving_info{device="cpu",feature_set_version="tiny-b"' in text or 'model_version="tiny-b"' in text
