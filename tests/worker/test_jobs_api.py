"""The job API in embedded mode (no Redis): validation before queueing, API key, one job."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from models.registry.versions import Registry
from service.app import create_app
from tests.worker.conftest import make_settings, wait_for


@pytest.fixture()
def embedded(job_env: dict[str, str]) -> Iterator[TestClient]:
    settings = make_settings(job_env, redis_url=None, api_key="s3cret")
    with TestClient(create_app(settings)) as client:
        client.headers["X-API-Key"] = "s3cret"
        yield client
        backend = getattr(client.app.state, "job_backend", None)  # type: ignore[attr-defined]
        if backend is not None:
            backend.shutdown()


@pytest.mark.parametrize(
    ("path", "body", "loc", "needle"),
    [
        ("/jobs/discover", {"dataset": "nope"}, ["body", "dataset"], "unknown data set 'nope'"),
        ("/jobs/discover", {"dataset": "../../etc"}, ["body", "dataset"], "pattern"),
        (
            "/jobs/discover",
            {"dataset": "slice-train", "model": "missing"},
            ["body", "model"],
            "no model version 'missing' in the registry's models",  # not its path on the server
        ),
        ("/jobs/discover", {"dataset": "slice-train", "eps": -1}, ["body", "eps"], "greater than 0"),
        ("/jobs/discover", {"dataset": "slice-train", "eps": 1e300}, ["body", "eps"], "less than or equal to 100"),
        (
            "/jobs/discover",
            {"dataset": "slice-train", "seed": 1e30},
            ["body", "seed"],
            "less than or equal to 4294967295",
        ),
        ("/jobs/discover", {"dataset": "slice-train", "size": 100000}, ["body", "size"], "exceeds the 64 features"),
        # the tiny model has 64 features: none can lie more than sqrt(63) = 7.94 sigma above the mean
        ("/jobs/discover", {"dataset": "slice-train", "eps": 8.0}, ["body", "eps"], "sqrt(64 - 1) = 7.94"),
        (
            "/jobs/regularize",
            {"dataset": "slice-train", "discover": {"dataset": "slice-train", "size": 5000}},
            ["body", "discover", "size"],
            "size 5000 exceeds the 64 features of model 'tiny'",
        ),
        ("/jobs/discover", {"dataset": "slice-train", "lo": 0.8, "hi": 0.2}, ["body"], "lo < hi"),
        (
            "/jobs/regularize",
            {"dataset": "slice-train", "method": "dino"},
            ["body", "method"],
            "simclr",
        ),
        (
            "/jobs/regularize",
            {"dataset": "slice-train", "epochs": 0},
            ["body", "epochs"],
            "greater than",
        ),
        (
            "/jobs/regularize",
            {"dataset": "slice-train", "batch_size": 100000},
            ["body", "batch_size"],
            "less than",
        ),
        # fewer images than one training batch: it failed in the worker after a 202
        (
            "/jobs/regularize",
            {"dataset": "slice-train", "batch_size": 4096},
            ["body", "batch_size"],
            "fewer than one training batch of 4096: lower batch_size",
        ),
        ("/jobs/regularize", {"dataset": "slice-train", "lr": 0}, ["body", "lr"], "greater than"),
        (
            "/jobs/regularize",
            {"dataset": "slice-train", "feature_set": "nope"},
            ["body", "feature_set"],
            "no feature set version",
        ),
        (
            "/jobs/evaluate",
            {"train_dataset": "slice-train", "test_dataset": "other"},
            ["body", "test_dataset"],
            "unknown data set",
        ),
        (
            "/jobs/evaluate",
            {"train_dataset": "slice-train", "test_dataset": "slice-test", "path": "/etc"},
            ["body", "path"],
            "Extra inputs",
        ),
    ],
)
def test_submit_bad_parameters_get_422_and_queue_nothing(
    embedded: TestClient, path: str, body: dict[str, Any], loc: list[str], needle: str
) -> None:
    response = embedded.post(path, json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["code"] == "invalid_request"
    assert any(e["loc"][: len(loc)] == loc and needle in e["msg"] for e in detail["errors"]), detail
    assert embedded.get("/jobs").json() == {"jobs": []}


@pytest.mark.parametrize("raw", [b"1e309", b"Infinity", b"NaN"])
def test_infinite_or_nan_numbers_get_422_and_queue_nothing(embedded: TestClient, raw: bytes) -> None:
    """JSON's 1e309 parses to infinity (Python's parser takes Infinity and NaN too): refused here,
    not stored as null by a job that then fails."""
    body = b'{"dataset": "slice-train", "eps": ' + raw + b"}"
    response = embedded.post("/jobs/discover", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]["errors"]
    assert any(e["loc"][:2] == ["body", "eps"] and "finite number" in e["msg"] for e in errors), errors
    assert embedded.get("/jobs").json() == {"jobs": []}


def test_jobs_without_api_key_get_401(embedded: TestClient) -> None:
    for method, path in (
        ("GET", "/jobs"),
        ("POST", "/jobs/discover"),
        ("GET", "/jobs/" + "0" * 32),
        ("DELETE", "/jobs/" + "0" * 32),
    ):
        response = embedded.request(method, path, json={"dataset": "slice-train"}, headers={"X-API-Key": "wrong"})
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["detail"]["code"] == "unauthorized"


def test_get_unknown_job_is_404(embedded: TestClient) -> None:
    response = embedded.get("/jobs/" + "a" * 32)
    assert response.status_code == 404
    assert response.json()["detail"]["code"] == "job_not_found"
    not_an_id = embedded.get("/jobs/not-an-id")  # no job path at all: the route needs 32 hex digits
    assert not_an_id.status_code == 404 and not_an_id.json()["detail"]["code"] == "not_found"


def test_discover_embedded_writes_a_feature_set(embedded: TestClient, tiny_registry: Registry) -> None:
    response = embedded.post(
        "/jobs/discover",
        json={
            "dataset": "slice-train",
            "eps": "auto",
            "sample_size": 200,
            "shards": 3,
            "batch_size": 64,
        },
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    record = wait_for(embedded, job_id, timeout=120)
    assert record["state"] == "succeeded", record
    assert record["progress"] == 1.0
    assert record["metrics"]["shards"] == 3 and record["metrics"]["shards_counted"] == 3
    version = record["artifacts"]["feature_set"]
    assert version == f"features-{job_id}"
    fs = tiny_registry.load_feature_set(version)
    assert fs.data.n_reference == 200 and fs.encoder.model_version == "tiny"
    # the reference bank, gathered from the 3 shards, is written beside the feature set
    assert (tiny_registry.feature_set_dir(version) / "feature_set.bank.safetensors").is_file()
    assert fs.bank is not None and fs.bank.size == 200 and fs.typicality is not None
    assert record["result"]["bank_vectors"] == 200
    assert record["result"]["activated"] is False  # QSCORE_AUTO_SWITCH is off
    assert [j["id"] for j in embedded.get("/jobs").json()["jobs"]] == [job_id]


def test_a_job_asked_to_activate_is_served_without_auto_switch(embedded: TestClient, tiny_registry: Registry) -> None:
    """ "activate": true makes the output the registry's active pair *and* the service switches to it
    (a journey found the registry switched and the service not, until some later restart)."""
    body = {"dataset": "slice-train", "eps": "auto", "sample_size": 100, "batch_size": 64, "activate": True}
    response = embedded.post("/jobs/discover", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    record = wait_for(embedded, job_id, timeout=120)
    assert record["state"] == "succeeded" and record["result"]["activated"] is True, record
    version = record["artifacts"]["feature_set"]
    active = tiny_registry.active()
    assert (active.model, active.feature_set, active.set_by) == ("tiny", version, f"job:{job_id}")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and embedded.get("/readyz").json()["feature_set_version"] != version:
        time.sleep(0.2)
    assert embedded.get("/readyz").json()["feature_set_version"] == version
    assert embedded.get("/admin/active").json()["auto_switch"] is False


def test_embedded_job_over_the_time_limit_fails_with_the_reason(job_env: dict[str, str]) -> None:
    """The workers' soft time limit applies in embedded mode too (the job runs in a child process)."""
    # 20 s: room to start the job's child process and train a step, even on a loaded machine
    settings = make_settings(job_env, redis_url=None, job_time_limit_s=20)
    with TestClient(create_app(settings)) as client:
        response = client.post("/jobs/regularize", json={"dataset": "slice-train", "batch_size": 32, "epochs": 1000})
        assert response.status_code == 202, response.text
        record = wait_for(client, response.json()["job_id"], timeout=120)
    assert record["state"] == "failed" and record["error"] == "time limit of 20 s exceeded", record
    assert record["metrics"]["step"] >= 1 and record["history"][0]["outcome"] == "failed"


def test_a_regularize_jobs_discover_body_takes_eps_auto_and_the_jobs_data_set_and_seed() -> None:
    """What the README promises for what the sub-body leaves out (a discover job's own eps, 4, left
    a fine-tuned model with 2 discriminative features and coverage 0.03 in a user's run)."""
    from worker.params import RegularizeParams

    left_out = RegularizeParams.model_validate({"dataset": "slice-train", "seed": 7, "discover": {"sample_size": 100}})
    assert left_out.discover is not None
    assert (left_out.discover.dataset, left_out.discover.eps, left_out.discover.seed) == ("slice-train", "auto", 7)
    given = RegularizeParams.model_validate(
        {"dataset": "slice-train", "discover": {"dataset": "slice-test", "eps": 2.0, "seed": 3}}
    )
    assert given.discover is not None
    assert (given.discover.dataset, given.discover.eps, given.discover.seed) == ("slice-test", 2.0, 3)
    assert RegularizeParams.model_validate({"dataset": "slice-train"}).discover is None  # the job's own default
