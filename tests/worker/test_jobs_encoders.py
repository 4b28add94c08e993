"""Jobs on encoders people bring (issue 9): a TorchScript module and a timm ViT in the registry.

Discovery and a regularize job on the timm ViT run on a real Celery worker (Redis); a regularize
job on a TorchScript model is refused with 422 before anything is queued (embedded mode: no
Redis needed for that).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from models.registry.versions import Registry
from service.app import create_app
from tests.shared_encoders import RESNET20_PREPROCESSING, RESNET20_TORCHSCRIPT, shared_file
from tests.worker.conftest import CeleryWorker, make_settings, wait_for


@pytest.fixture()
def brought(tiny_registry: Registry, tmp_path: Path) -> Registry:
    """The tiny registry plus 'r20' (the shared TorchScript ResNet-20) and 'vit' (a random timm ViT)."""
    tiny_registry.import_model(shared_file(RESNET20_TORCHSCRIPT), version="r20", **RESNET20_PREPROCESSING)
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=10)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    tiny_registry.import_model(tmp_path / "vit.safetensors", version="vit", arch="timm:test_vit", image_size=32)
    return tiny_registry


def test_regularize_job_on_torchscript_is_refused_before_queueing(job_env: dict[str, str], brought: Registry) -> None:
    with TestClient(create_app(make_settings(job_env, redis_url=None))) as client:
        response = client.post(
            "/jobs/regularize", json={"dataset": "slice-train", "model": "r20", "feature_set": "tiny"}
        )
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert detail["code"] == "invalid_request"
        assert detail["errors"][0]["loc"] == ["body", "model"]
        assert "cannot regularize model 'r20'" in detail["message"]
        assert "TorchScript encoders are inference exports" in detail["message"]
        assert client.get("/jobs").json() == {"jobs": []}
        backend = getattr(client.app.state, "job_backend", None)  # type: ignore[attr-defined]
        if backend is not None:
            backend.shutdown()


@pytest.mark.integration
def test_discover_jobs_on_brought_encoders_run_on_a_worker(
    job_env: dict[str, str],
    redis_url: str,
    brought: Registry,
    start_worker: Callable[..., CeleryWorker],
) -> None:
    env = {**job_env, "QSCORE_REDIS_URL": redis_url}
    start_worker(env)
    with TestClient(create_app(make_settings(env))) as client:
        jobs = {}
        for model in ("r20", "vit"):
            body = {"dataset": "slice-train", "model": model, "eps": "auto", "sample_size": 200, "shards": 2}
            response = client.post("/jobs/discover", json=body)
            assert response.status_code == 202, response.text
            jobs[model] = response.json()["job_id"]
        records = {model: wait_for(client, job_id, timeout=240) for model, job_id in jobs.items()}
        # a timm encoder is trainable: fine-tune the ViT a few steps on its discovered features
        tuned = client.post(
            "/jobs/regularize",
            json={
                "dataset": "slice-train",
                "model": "vit",
                "feature_set": records["vit"]["artifacts"]["feature_set"],
                "max_steps": 2,
                "batch_size": 16,
                "discover": {"dataset": "slice-train", "eps": "auto", "sample_size": 100},
            },
        )
        assert tuned.status_code == 202, tuned.text
        tuned_record = wait_for(client, tuned.json()["job_id"], timeout=240)
    assert tuned_record["state"] == "succeeded", tuned_record
    new_model = brought.model_record(tuned_record["artifacts"]["model"])
    assert new_model.parent == "vit" and new_model.spec == brought.model_record("vit").spec
    assert new_model.fingerprint != brought.model_record("vit").fingerprint
    assert brought.load_model(new_model.version).encoder.spec.arch == "timm:test_vit"
    for model, record in records.items():
        assert record["state"] == "succeeded", record
        fs = brought.load_feature_set(record["artifacts"]["feature_set"])
        assert fs.encoder.model_version == model
        assert fs.encoder.fingerprint == brought.model_record(model).fingerprint
    r20, vit = records["r20"]["result"], records["vit"]["result"]
    assert r20["negative_share"] == 0.0 and r20["signed_warning"] is None
    assert 0.3 < vit["negative_share"] < 0.7 and "SIGNED REPRESENTATION" in vit["signed_warning"]
    assert r20["coverage"] >= 0.9  # eps auto on a strong encoder
