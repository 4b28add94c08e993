"""Faults with real processes: a whole worker SIGKILLed (default settings), a worker cut off
(SIGSTOP) that comes back while its job runs elsewhere, a broker restart (a private RabbitMQ
node), and a restart of the API in embedded mode (SIGKILL of the uvicorn process).

RabbitMQ is the broker here (a vhost of this test run), Redis the job store, as in
docker-compose.yml. Every job is a tiny regularize job (width-8 model, a few steps).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from models.registry.versions import Registry
from service.app import create_app
from tests.worker.conftest import REPO, CeleryWorker, free_port, make_settings, no_partial_versions, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REGULARIZE = {
    "dataset": "slice-train",
    "batch_size": 32,
    "epochs": 20,
    "checkpoint_every": 2,
    "discover": {"dataset": "slice-train", "eps": "auto", "sample_size": 100, "batch_size": 50},
}


@pytest.fixture()
def env(job_env: dict[str, str], redis_url: str, rabbitmq_url: str) -> dict[str, str]:
    """The project's default job settings (time limit 6 h, heartbeat 20 s), RabbitMQ as broker."""
    defaults = {
        k: v for k, v in job_env.items() if k not in ("QSCORE_JOB_TIME_LIMIT_S", "QSCORE_JOB_VISIBILITY_TIMEOUT_S")
    }
    return {**defaults, "QSCORE_REDIS_URL": redis_url, "QSCORE_BROKER_URL": rabbitmq_url}


@pytest.fixture()
def api() -> Iterator[Callable[[dict[str, str]], TestClient]]:
    clients: list[TestClient] = []

    def make(env: dict[str, str], **overrides: Any) -> TestClient:
        client = TestClient(create_app(make_settings(env, **overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def _submit(client: TestClient, max_steps: int) -> str:
    response = client.post("/jobs/regularize", json={**REGULARIZE, "max_steps": max_steps})
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def _holder(record: dict[str, Any], workers: list[CeleryWorker]) -> CeleryWorker:
    (worker,) = [w for w in workers if w.runs(record["history"][-1])]
    return worker


def _single_outputs(registry: Registry, job_id: str) -> None:
    models = [p.name for p in registry.models_dir.iterdir() if job_id in p.name]
    feature_sets = [p.name for p in registry.feature_sets_dir.iterdir() if job_id in p.name]
    assert models == [f"model-{job_id}"] and feature_sets == [f"features-{job_id}"]
    assert no_partial_versions(registry) == []


def test_whole_worker_sigkill_with_default_settings_runs_again_on_another_worker(
    env: dict[str, str],
    api: Callable[..., TestClient],
    start_worker: Callable[..., CeleryWorker],
    tiny_registry: Registry,
) -> None:
    """SIGKILL a worker's whole process group mid-training: RabbitMQ gives the job to the other
    worker as the connection drops (default settings: no 6 h visibility timeout to wait for)."""
    workers = [start_worker(env), start_worker(env)]
    client = api(env)
    # 60 steps, killed after step 5: the kill lands in training, not after it (fast machines)
    job_id = _submit(client, max_steps=60)
    record = wait_for(client, job_id, until=lambda r: r["metrics"].get("step", 0) >= 5)
    victim = _holder(record, workers)
    victim.kill()
    killed_at = time.monotonic()
    again = wait_for(client, job_id, until=lambda r: r["attempts"] >= 2, timeout=120)
    print(f"job running again {time.monotonic() - killed_at:.1f} s after the SIGKILL")
    record = wait_for(client, job_id, timeout=240)
    assert record["state"] == "succeeded", (record, [w.output()[-2000:] for w in workers])
    assert record["attempts"] == 2 and again["attempts"] == 2
    first, second = record["history"]
    assert victim.runs(first) and not victim.runs(second)
    assert first["outcome"] == "lost" and "delivered again (attempt 2" in first["reason"]
    assert second["outcome"] == "succeeded"
    assert record["result"]["training"]["resumed_from"] >= 4 and record["result"]["training"]["steps"] == 60
    _single_outputs(tiny_registry, job_id)
    assert not (Path(env["QSCORE_JOB_CHECKPOINT_DIR"]) / f"{job_id}.ckpt").exists()


def test_cut_off_worker_comes_back_stops_its_copy_and_writes_nothing(
    env: dict[str, str],
    api: Callable[..., TestClient],
    start_worker: Callable[..., CeleryWorker],
    tiny_registry: Registry,
) -> None:
    """SIGSTOP the worker running a job (its connections stay open): after the AMQP heartbeat
    timeout RabbitMQ gives the job to the other worker; SIGCONT the first while the job runs
    there: the late attempt stops at its next step, writes nothing, and says why."""
    env = {**env, "QSCORE_BROKER_HEARTBEAT_S": "2"}  # short, to keep the test short
    workers = [start_worker(env), start_worker(env)]
    client = api(env)
    job_id = _submit(client, max_steps=60)
    record = wait_for(client, job_id, until=lambda r: r["metrics"].get("step", 0) >= 5)
    frozen = _holder(record, workers)
    frozen.freeze()
    try:
        frozen_at = time.monotonic()
        record = wait_for(client, job_id, until=lambda r: r["attempts"] >= 2, timeout=120)
        print(f"job running again {time.monotonic() - frozen_at:.1f} s after the SIGSTOP")
        resumed_from = record["metrics"].get("step", 0)
        wait_for(client, job_id, until=lambda r: r["metrics"].get("step", 0) > resumed_from + 2, timeout=120)
        assert client.get(f"/jobs/{job_id}").json()["state"] == "running"
    finally:
        frozen.thaw()
    record = wait_for(client, job_id, until=lambda r: r["history"][0]["outcome"] == "superseded", timeout=60)
    record = wait_for(client, job_id, timeout=240)
    assert record["state"] == "succeeded", (record, [w.output()[-2000:] for w in workers])
    assert record["attempts"] == 2
    first, second = record["history"]
    assert frozen.runs(first) and not frozen.runs(second)
    assert first["outcome"] == "superseded"
    assert "attempt 2" in first["reason"] and "stopped without writing" in first["reason"], first
    assert second["outcome"] == "succeeded"
    assert record["result"]["training"]["steps"] == 60
    _single_outputs(tiny_registry, job_id)
    assert "stopped" in frozen.output() and "took the job over" in frozen.output()


def test_broker_restart_mid_job_loses_nothing(
    job_env: dict[str, str],
    redis_url: str,
    private_rabbitmq: Any,
    api: Callable[..., TestClient],
    start_worker: Callable[..., CeleryWorker],
    tiny_registry: Registry,
) -> None:
    """Stop the broker (a private RabbitMQ node) mid-job and start it again: the running job
    ends once, a job submitted during the outage is refused (503), one submitted after runs."""
    env = {**job_env, "QSCORE_REDIS_URL": redis_url, "QSCORE_BROKER_URL": private_rabbitmq.url}
    worker = start_worker(env)
    client = api(env)
    job_id = _submit(client, max_steps=24)
    wait_for(client, job_id, until=lambda r: r["metrics"].get("step", 0) >= 3)
    private_rabbitmq.stop()
    response = client.post("/jobs/regularize", json={**REGULARIZE, "max_steps": 2})
    assert response.status_code == 503, response.text
    assert response.json()["detail"]["code"] == "job_store_unavailable" and response.headers["Retry-After"]
    private_rabbitmq.start()
    record = wait_for(client, job_id, timeout=240)
    assert record["state"] == "succeeded", (record, worker.output()[-3000:])
    assert record["history"][-1]["outcome"] == "succeeded"
    assert all(a["outcome"] in ("succeeded", "lost", "superseded") for a in record["history"])
    _single_outputs(tiny_registry, job_id)
    after = _submit(client, max_steps=2)
    assert wait_for(client, after, timeout=240)["state"] == "succeeded"


def _serve(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from service.server import run; run(port={port})"],
        cwd=REPO,
        env={**os.environ, **env, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the service did not start:\n{log.read_text()[-3000:]}")


def test_embedded_api_killed_mid_job_resumes_it_after_restart(
    job_env: dict[str, str], tiny_registry: Registry, tmp_path: Path
) -> None:
    """Embedded mode (no Redis): SIGKILL the service (and its job process) mid-training; the
    restarted service finds the job in its SQLite records and resumes it from the checkpoint."""
    env = {k: v for k, v in job_env.items() if k != "QSCORE_REDIS_URL"}
    port = free_port()
    log = tmp_path / "serve.log"
    server = _serve(env, port, log)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            response = client.post("/jobs/regularize", json={**REGULARIZE, "max_steps": 60})
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            wait_for(client, job_id, until=lambda r: r["metrics"].get("step", 0) >= 5, timeout=180)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
        server = _serve(env, port, log)
        with httpx.Client(base_url=base, timeout=10) as client:
            record = wait_for(client, job_id, timeout=240)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
    assert record["state"] == "succeeded", (record, log.read_text()[-3000:])
    assert record["attempts"] == 2
    first, second = record["history"]
    assert first["outcome"] == "interrupted" and "service stopped" in first["reason"]
    assert second["outcome"] == "succeeded"
    assert record["result"]["training"]["resumed_from"] >= 4
    _single_outputs(tiny_registry, job_id)
