"""The served OpenAPI document is exact: schemathesis with all its checks on every endpoint (jobs
included, embedded, on a tiny data set, every accepted job cancelled at once) finds nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from service_helpers import LiveServer

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}


def test_openapi_schema_declares_error_models(server: LiveServer) -> None:
    with server.client() as client:
        spec = client.get("/openapi.json").json()
    score = spec["paths"]["/score"]["post"]
    for status in ("400", "413", "415", "422", "503"):
        assert score["responses"][status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }
    assert "multipart/form-data" in score["requestBody"]["content"]
    assert (
        spec["paths"]["/admin/switch"]["post"]["responses"]["409"]["content"]["application/json"]["schema"]["$ref"]
        == "#/components/schemas/ErrorResponse"
    )


@pytest.fixture()
def contract_server(make_server: Callable[..., LiveServer], cifar_slice: Path, tmp_path: Path) -> LiveServer:
    """Embedded jobs (no Redis) on a tiny data set: 8 images of each of two classes."""
    tiny = tmp_path / "tiny"
    for cls in sorted(p for p in (cifar_slice / "train").iterdir() if p.is_dir())[:2]:
        (tiny / cls.name).mkdir(parents=True)
        for image in sorted(cls.glob("*.jpg"))[:8]:
            shutil.copy(image, tiny / cls.name / image.name)
    return make_server(
        datasets={"tiny": tiny},
        job_checkpoint_dir=tmp_path / "checkpoints",
        redis_url=None,
    )


def test_schemathesis_all_checks_every_endpoint_jobs_included(contract_server: LiveServer, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",  # cancels every accepted job at once
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file",
        str(Path(__file__).parent / "schemathesis.toml"),
        "run",
        f"{contract_server.url}/openapi.json",
        "--checks",
        "all",
        # DELETE /jobs/{id} cancels a job and keeps its record (GET answers it, state
        # "cancelled"): documented, and what clients follow; not a deleted resource still served.
        "--exclude-checks",
        "use_after_free",
        "--max-examples",
        "40",
        "--seed",
        "8",
        "--workers",
        "1",
        "--no-color",
    ]
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    with contract_server.client() as client:
        paths = client.get("/openapi.json").json()["paths"]
        operations = sum(len(methods) for methods in paths.values())
        # every operation the spec declares was fuzzed (POST /admin/models included)
        assert operations >= 15
        assert f"Selected: {operations}/{operations}" in run.stdout, run.stdout[-3000:]
        assert f"Tested: {operations}" in run.stdout, run.stdout[-3000:]
        jobs = client.get("/jobs", params={"limit": 1000}).json()["jobs"]
        assert client.get("/readyz").json()["status"] == "ready"  # and it still serves
    assert {j["type"] for j in jobs} == {"discover", "regularize", "evaluate", "atlas"}  # the fuzzer got jobs accepted
    assert all(j["state"] in ("cancelled", "succeeded", "failed", "running") for j in jobs), jobs


def test_openapi_asks_for_the_api_key_only_when_one_is_configured(make_server: Callable[..., LiveServer]) -> None:
    open_spec = httpx.get(f"{make_server().url}/openapi.json").json()
    keyed_spec = httpx.get(f"{make_server(api_key='s3cret').url}/openapi.json").json()
    assert "securitySchemes" not in open_spec.get("components", {})
    for path in ("/admin/models", "/jobs", "/jobs/{job_id}"):
        for operation in open_spec["paths"][path].values():
            assert "security" not in operation and "401" not in operation["responses"], (path, operation)
        for operation in keyed_spec["paths"][path].values():
            assert operation["security"] == [{"APIKeyHeader": []}], (path, operation)
            assert operation["responses"]["401"]["content"]["application/json"]["schema"] == ERROR_REF


def test_openapi_jobs_document_their_errors_and_names(contract_server: LiveServer) -> None:
    spec = httpx.get(f"{contract_server.url}/openapi.json").json()
    for method, path in (("post", "/jobs/discover"), ("get", "/jobs"), ("get", "/jobs/{job_id}")):
        assert spec["paths"][path][method]["responses"]["422"]["content"]["application/json"]["schema"] == ERROR_REF
    for method in ("get", "delete"):
        assert (
            spec["paths"]["/jobs/{job_id}"][method]["responses"]["404"]["content"]["application/json"]["schema"]
            == ERROR_REF
        )
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    discover = spec["components"]["schemas"]["DiscoverParams"]["properties"]
    assert discover["dataset"]["enum"] == ["tiny"]
    assert [b for b in discover["model"]["anyOf"] if b.get("type") == "string"][0]["enum"] == ["tiny", "tiny-b"]
    with contract_server.client() as client:
        unknown = client.post("/jobs/discover", json={"dataset": "other"})
        mismatch = client.post(
            "/jobs/regularize", json={"dataset": "tiny", "model": "tiny", "feature_set": "tiny-b", "batch_size": 8}
        )
        not_a_job = client.get("/jobs/discover")
    assert unknown.status_code == 422 and unknown.json()["detail"]["code"] == "invalid_request"
    assert mismatch.status_code == 409 and mismatch.json()["detail"]["code"] == "feature_set_mismatch"
    assert not_a_job.status_code == 405 and not_a_job.headers["allow"] == "POST"
    assert not_a_job.json()["detail"]["code"] == "method_not_allowed"


@pytest.fixture(autouse=True)
def _restore_serving_pair(server: LiveServer):
    yield  # fuzzing may switch versions; put the module's server back on 'tiny'
    with server.client() as client:
        client.post("/admin/switch", json={"model": "tiny", "feature_set": "tiny"})
