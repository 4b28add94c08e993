"""Jobs on a real Celery worker (a separate process) and the real Redis at 127.0.0.1:6379.

Every job is tiny: the width-8 model of ``tiny_registry``, a few hundred CIFAR-10 images, a few
training steps.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from models.data.datasets import image_folder
from models.data.transforms import eval_transform
from models.discovery.discover import discover
from models.registry.versions import Registry
from models.scoring.feature_set import EncoderRef
from service.app import create_app
from tests.worker.conftest import (
    CeleryWorker,
    free_port,
    make_settings,
    no_partial_versions,
    wait_for,
)

pytestmark = pytest.mark.integration


@pytest.fixture()
def env(job_env: dict[str, str], redis_url: str) -> dict[str, str]:
    return {**job_env, "QSCORE_REDIS_URL": redis_url}


@pytest.fixture()
def api(env: dict[str, str]) -> Iterator[Callable[..., TestClient]]:
    """The service app (``service.app.create_app``) on these settings; several may be made."""
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        client = TestClient(create_app(make_settings(env, **overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def _score(client: TestClient, image: Path) -> dict[str, Any]:
    response = client.post("/score", files={"files": (image.name, image.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    return response.json()


def test_discover_sharded_matches_single_pass_and_service_switches(
    env: dict[str, str],
    api: Callable[..., TestClient],
    start_worker: Callable[..., CeleryWorker],
    tiny_registry: Registry,
    tiny_model: tuple,
    cifar_slice: Path,
) -> None:
    start_worker(env)
    client = api(auto_switch=True)
    image = next((cifar_slice / "test").rglob("*.jpg"))
    assert _score(client, image)["feature_set"]["version"] == "tiny"

    response = client.post(
        "/jobs/discover",
        json={
            "dataset": "slice-train",
            "eps": "auto",
            "sample_size": 250,
            "seed": 3,
            "shards": 3,
            "batch_size": 32,
        },
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    record = wait_for(client, job_id)
    assert record["state"] == "succeeded", record
    assert record["metrics"]["shards_counted"] == 3 and record["metrics"]["shards_scored"] == 3
    assert record["result"]["activated"] is True and record["result"]["shards"] == 3
    version = record["artifacts"]["feature_set"]
    assert tiny_registry.active().feature_set == version

    # Sharded counting gives what one pass over the same sample gives (SPEC section 2).
    encoder, digest, _ = tiny_model
    single = discover(
        encoder,
        image_folder(cifar_slice / "train", eval_transform(encoder.spec)),
        dataset_name="slice-train",
        encoder_ref=EncoderRef(fingerprint=digest, arch="resnet18", feature_dim=encoder.spec.feature_dim),
        eps="auto",
        sample_size=250,
        seed=3,
        batch_size=32,
    )
    sharded = tiny_registry.load_feature_set(version)
    assert sharded.counts == single.counts
    assert sharded.discriminative == single.discriminative
    assert sharded.eps == single.eps and sharded.coverage_by_eps == single.coverage_by_eps
    assert sharded.alpha == pytest.approx(single.alpha, rel=1e-5)

    # The service follows the registry (QSCORE_AUTO_SWITCH) and /score uses the new feature set.
    deadline = time.monotonic() + 20
    while _score(client, image)["feature_set"]["version"] != version:
        assert time.monotonic() < deadline, "the service did not switch to the new feature set"
        time.sleep(0.2)


def test_regularize_writes_a_new_model_and_evaluate_reports(
    env: dict[str, str],
    api: Callable[..., TestClient],
    start_worker: Callable[..., CeleryWorker],
    tiny_registry: Registry,
) -> None:
    metrics_port = free_port()
    start_worker({**env, "QSCORE_WORKER_METRICS_PORT": str(metrics_port)})
    client = api()
    response = client.post(
        "/jobs/regularize",
        json={
            "dataset": "slice-train",
            "method": "simclr",
            "lambda": 0.5,
            "epochs": 1,
            "batch_size": 32,
            "lr": 0.05,
            "max_steps": 3,
            "discover": {
                "dataset": "slice-train",
                "eps": "auto",
                "sample_size": 150,
                "batch_size": 64,
            },
        },
    )
    assert response.status_code == 202, response.text
    record = wait_for(client, response.json()["job_id"])
    assert record["state"] == "succeeded", record
    result = record["result"]
    assert result["parent"] == "tiny" and result["fingerprint"] != result["parent_fingerprint"]
    assert result["training"]["steps"] == 3 and result["training"]["lambda"] == 0.5
    assert record["metrics"]["step"] == 3 and "loss" in record["metrics"]
    new_model = record["artifacts"]["model"]
    assert tiny_registry.model_record(new_model).parent == "tiny"
    tiny_registry.check_pair(new_model, record["artifacts"]["feature_set"])
    assert tiny_registry.active().model == "tiny"  # not switched: QSCORE_AUTO_SWITCH is off

    response = client.post(
        "/jobs/evaluate",
        json={
            "model": new_model,
            "train_dataset": "slice-train",
            "test_dataset": "slice-test",
            "batch_size": 100,
            "shift_samples": 20,
        },
    )
    assert response.status_code == 202, response.text
    record = wait_for(client, response.json()["job_id"])
    assert record["state"] == "succeeded", record
    calibrated = tiny_registry.load_feature_set(record["artifacts"]["feature_set"])
    # the evaluation's probe is served as the head; the risk saw shifted copies of 20 test images
    assert calibrated.head is not None and calibrated.error_estimator is not None
    assert record["result"]["report"]["risk"]["subsets"]["shifted"]["n"] == 20 * 82
    report = record["result"]["report"]
    assert 0.0 <= report["top1"] <= 1.0 and report["n_test"] == 100
    assert 0.0 <= report["q_score"]["auroc"] <= 1.0 and 0.0 <= report["q_score"]["auprc"] <= 1.0
    assert report["compression"] and {"subset", "size", "top1"} <= set(report["compression"][0])
    assert record["metrics"]["top1"] == report["top1"]
    assert record["metrics"]["error_estimator"] == calibrated.error_estimator.method
    assert record["metrics"]["risk_clean_weight"] == report["risk"]["clean_weight"] in (0.5, 0.6, 0.7)
    assert record["metrics"]["error_estimate_window_error"] == report["error_estimate"]["window_error"]
    corrected = tiny_registry.load_feature_set(record["artifacts"]["feature_set"]).error_estimator.correction
    assert record["metrics"]["error_estimate_corrected"] == report["error_estimate"]["correction"]["kept"]
    assert (corrected is not None) == record["metrics"]["error_estimate_corrected"]
    calibrated = tiny_registry.load_feature_set(record["artifacts"]["feature_set"])
    assert calibrated.risk_model is not None and calibrated.alpha == report["alpha"]
    assert record["result"]["evaluated_feature_set"] == record["params"]["feature_set"]

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert 'qscore_jobs_finished_total{outcome="succeeded",type="evaluate"} 1.0' in text
    assert 'qscore_job_duration_seconds_count{outcome="succeeded",type="regularize"} 1.0' in text


def test_cancel_running_job_stops_and_says_so(
    env: dict[str, str],
    api: Callable[..., TestClient],
    start_worker: Callable[..., CeleryWorker],
    tiny_registry: Registry,
) -> None:
    start_worker(env)
    client = api()
    response = client.post("/jobs/regularize", json={"dataset": "slice-train", "batch_size": 32, "epochs": 100})
    job_id = response.json()["job_id"]
    wait_for(client, job_id, until=lambda r: r["metrics"].get("step", 0) >= 2)
    response = client.delete(f"/jobs/{job_id}")
    assert response.status_code == 200 and response.json()["cancel_requested"] is True
    record = wait_for(client, job_id, timeout=30)
    assert record["state"] == "cancelled" and "cancelled by request" in record["error"]
    assert not tiny_registry.model_dir(f"model-{job_id}").exists()
    assert not (Path(env["QSCORE_JOB_CHECKPOINT_DIR"]) / f"{job_id}.ckpt").exists()


def test_queued_job_survives_api_restart_and_cancelled_never_runs(
    env: dict[str, str],
    api: Callable[..., TestClient],
    start_worker: Callable[..., CeleryWorker],
    tiny_registry: Registry,
) -> None:
    first = api()
    job_id = first.post("/jobs/discover", json={"dataset": "slice-train", "sample_size": 50}).json()["job_id"]
    queued = first.post("/jobs/discover", json={"dataset": "slice-train", "sample_size": 50}).json()["job_id"]
    first.__exit__(None, None, None)  # the API goes away; Redis keeps the records

    second = api()
    listed = {j["id"]: j for j in second.get("/jobs").json()["jobs"]}
    assert listed[job_id]["state"] == "queued" and listed[queued]["state"] == "queued"
    assert second.delete(f"/jobs/{queued}").json()["state"] == "cancelled"
    start_worker(env)
    assert wait_for(second, job_id)["state"] == "succeeded"
    record = wait_for(second, queued)
    assert record["state"] == "cancelled" and record["started_at"] is None
    assert not tiny_registry.feature_set_dir(f"features-{queued}").exists()


def _regularize_until_step_5(client: TestClient) -> str:
    """Queue a 60-step regularize job checkpointing every 2 steps; return once it passed step 5.

    60 steps (several epochs of the 300-image slice) so that a kill after step 5 lands in training
    even on a fast machine: with one epoch (9 steps) it could land in the discovery that follows.
    """
    response = client.post(
        "/jobs/regularize",
        json={
            "dataset": "slice-train",
            "batch_size": 32,
            "epochs": 20,
            "max_steps": 60,
            "checkpoint_every": 2,
            "discover": {"dataset": "slice-train", "eps": "auto", "sample_size": 100, "batch_size": 50},
        },
    )
    job_id = response.json()["job_id"]
    wait_for(client, job_id, until=lambda r: r["metrics"].get("step", 0) >= 5)
    return job_id


@pytest.mark.slow
def test_worker_pool_child_killed_mid_training_is_redelivered_and_resumes(
    env: dict[str, str],
    api: Callable[..., TestClient],
    start_worker: Callable[..., CeleryWorker],
    tiny_registry: Registry,
) -> None:
    """SIGKILL the process running the job: it is re-delivered and resumes from its checkpoint."""
    worker = start_worker(env)
    client = api()
    job_id = _regularize_until_step_5(client)
    pid = worker.proc.pid  # type: ignore[union-attr]
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1
    os.kill(int(children[0]), signal.SIGKILL)
    record = wait_for(client, job_id, timeout=240)
    assert record["state"] == "succeeded", (record, worker.output()[-3000:])
    assert record["attempts"] == 2
    assert record["result"]["training"]["resumed_from"] >= 4
    assert no_partial_versions(tiny_registry) == []
    assert not (Path(env["QSCORE_JOB_CHECKPOINT_DIR"]) / f"{job_id}.ckpt").exists()


def test_redis_down_jobs_503_scoring_unaffected_then_recovers(
    job_env: dict[str, str],
    private_redis: Any,
    start_worker: Callable[..., CeleryWorker],
    tiny_registry: Registry,
    cifar_slice: Path,
) -> None:
    env = {**job_env, "QSCORE_REDIS_URL": private_redis.url}
    start_worker(env)
    image = next((cifar_slice / "test").rglob("*.jpg"))
    with TestClient(create_app(make_settings(env))) as client:
        job_id = client.post("/jobs/discover", json={"dataset": "slice-train", "sample_size": 50}).json()["job_id"]
        assert wait_for(client, job_id)["state"] == "succeeded"

        private_redis.stop()
        for method, path in (
            ("GET", "/jobs"),
            ("GET", f"/jobs/{job_id}"),
            ("DELETE", f"/jobs/{job_id}"),
            ("POST", "/jobs/discover"),
        ):
            response = client.request(method, path, json={"dataset": "slice-train"})
            assert response.status_code == 503, (method, path, response.text)
            assert response.json()["detail"]["code"] == "job_store_unavailable"
        assert _score(client, image)["results"][0]["q_score"] >= 0.0

        private_redis.start()
        assert client.get(f"/jobs/{job_id}").json()["state"] == "succeeded"  # persisted (append-only file)
        again = client.post("/jobs/discover", json={"dataset": "slice-train", "sample_size": 50})
        assert again.status_code == 202, again.text
        assert wait_for(client, again.json()["job_id"], timeout=120)["state"] == "succeeded"
        assert _score(client, image)["results"][0]["q_score"] >= 0.0
