"""The atlas job (POST /jobs/atlas): embedded and on a real Celery worker, served by GET /atlas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.explanation.atlas import read_atlas
from models.registry.versions import Registry
from service.app import create_app
from tests.worker.conftest import CeleryWorker, make_settings, no_partial_versions, wait_for

BODY = {"dataset": "slice-train", "top_k": 3, "tail_sample": 2, "batch_size": 100}
# The job tests' 40 s time limit is for jobs that are killed on purpose; an atlas on a busy 2-core
# machine may take longer than that.
LIMITS = {"QSCORE_JOB_TIME_LIMIT_S": "240", "QSCORE_JOB_VISIBILITY_TIMEOUT_S": "300"}


@pytest.fixture()
def embedded(job_env: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings({**job_env, **LIMITS}, redis_url=None))) as client:
        yield client
        backend = getattr(client.app.state, "job_backend", None)  # type: ignore[attr-defined]
        if backend is not None:
            backend.shutdown()


def _check_served_atlas(client: TestClient, registry: Registry, record: dict, cifar_slice: Path) -> None:
    name = record["artifacts"]["atlas"]
    assert name == f"atlas-{record['id']}"
    folder = registry.current_atlas("tiny")
    assert folder == registry.atlas_dir("tiny", name)
    data = read_atlas(folder)
    fs = registry.load_feature_set("tiny")
    groups = [f["group"] for f in data["features"].values()]
    assert groups.count("discriminative") == len(fs.discriminative)
    assert groups.count("upper_tail") <= 2 and groups.count("lower_tail") <= 2
    assert (data["n_images"], data["dataset"], data["model"], data["feature_set"]) == (
        300,
        "slice-train",
        "tiny",
        "tiny",
    )
    assert record["result"]["features"] == len(data["features"]) and record["result"]["labelled"] is True
    assert record["result"]["groups"]["discriminative"]["features"] == len(fs.discriminative)
    assert record["progress"] == 1.0

    index = client.get("/atlas")
    assert index.status_code == 200, index.text
    assert index.json()["atlas"] == name and len(index.json()["features"]) == len(data["features"])
    some = next(f for f in data["features"].values() if f["top"])
    entry = client.get(f"/atlas/{some['index']}").json()
    assert entry["top"] == some["top"] and len(entry["top"]) <= 3
    assert entry["classes"] == some["classes"] and sum(entry["classes"].values()) == entry["n_dominant"]
    for image in entry["top"]:  # the paths name images of the data set, their labels are their folders
        assert (cifar_slice / "train" / image["image"]).is_file() and image["image"].split("/")[0] == image["label"]
    sheet = client.get(entry["sheet_url"].replace("http://testserver", ""))
    assert sheet.status_code == 200 and sheet.headers["content-type"] == "image/png"
    assert sheet.content == (folder / "sheets" / f"{some['index']}.png").read_bytes()
    assert no_partial_versions(registry) == [] and not list((folder.parent).glob(".tmp-*"))


def test_atlas_job_embedded_writes_the_atlas_beside_the_feature_set(
    embedded: TestClient, tiny_registry: Registry, cifar_slice: Path
) -> None:
    assert embedded.get("/atlas").json()["detail"]["code"] == "atlas_not_found"
    response = embedded.post("/jobs/atlas", json=BODY)
    assert response.status_code == 202, response.text
    record = wait_for(embedded, response.json()["job_id"], timeout=300)
    assert record["state"] == "succeeded", record
    assert record["params"]["feature_set"] == "tiny" and record["params"]["model"] == "tiny"
    _check_served_atlas(embedded, tiny_registry, record, cifar_slice)


def test_atlas_job_bad_parameters_are_refused_before_queueing(embedded: TestClient) -> None:
    unknown = embedded.post("/jobs/atlas", json={"dataset": "nope"})
    assert unknown.status_code == 422 and "unknown data set 'nope'" in unknown.json()["detail"]["message"]
    too_many = embedded.post("/jobs/atlas", json={**BODY, "top_k": 65})
    assert too_many.status_code == 422 and too_many.json()["detail"]["errors"][0]["loc"] == ["body", "top_k"]
    mismatch = embedded.post("/jobs/atlas", json={**BODY, "model": "tiny", "feature_set": "nope"})
    assert mismatch.status_code == 422 and "no feature set version" in mismatch.json()["detail"]["message"]
    assert embedded.get("/jobs").json()["jobs"] == []


@pytest.mark.integration
def test_atlas_job_on_a_celery_worker(
    job_env: dict[str, str],
    redis_url: str,
    start_worker,
    tiny_registry: Registry,
    cifar_slice: Path,
) -> None:
    env = {**job_env, **LIMITS, "QSCORE_REDIS_URL": redis_url}
    worker: CeleryWorker = start_worker(env)
    with TestClient(create_app(make_settings(env))) as client:
        response = client.post("/jobs/atlas", json=BODY)
        assert response.status_code == 202, response.text
        record = wait_for(client, response.json()["job_id"], timeout=300)
        assert record["state"] == "succeeded", (record, worker.log.read_text()[-3000:] if worker.log else "")
        assert worker.runs(record["history"][0])
        _check_served_atlas(client, tiny_registry, record, cifar_slice)
    # every contact sheet is a PNG of one row of at most 3 columns (top_k) of 64 px tiles, as wide as its title
    sheet = Image.open(registry_sheet(tiny_registry))
    assert sheet.size[0] >= 4 + 3 * 68 and sheet.size[1] == 18 + 158 + 4 and np.asarray(sheet).ndim == 3


def registry_sheet(registry: Registry) -> Path:
    folder = registry.current_atlas("tiny")
    assert folder is not None
    return sorted((folder / "sheets").glob("*.png"))[0]
