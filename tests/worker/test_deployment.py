"""The deployment files: the compose file against the Compose specification, what it mounts,
the Prometheus configuration (promtool), the Grafana dashboard and the Dockerfile."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO.parent / "shared" / "reference" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_file_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    if not SCHEMA.is_file():
        pytest.skip(f"no Compose schema at {SCHEMA}")
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_compose_has_every_service_and_the_gpu_reservation(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"api", "worker", "rabbitmq", "redis", "prometheus", "alertmanager", "grafana"} <= set(services)
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    assert any(v.startswith("redis-data:") for v in services["redis"]["volumes"])
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["QSCORE_REDIS_URL"] == "redis://redis:6379/0" and "QSCORE_DATASETS" in env
        assert env["QSCORE_BROKER_URL"].startswith("amqp://qscore:") and env["QSCORE_BROKER_URL"].endswith(
            "@rabbitmq:5672/qscore"
        )
        assert set(services[name]["depends_on"]) == {"redis", "rabbitmq"}
    rabbitmq = services["rabbitmq"]
    assert rabbitmq["environment"]["RABBITMQ_DEFAULT_VHOST"] == "qscore"
    assert any(v.startswith("rabbitmq-data:/var/lib/rabbitmq") for v in rabbitmq["volumes"])
    major, minor = (int(x) for x in rabbitmq["image"].split(":")[1].split("-")[0].split(".")[:2])
    assert (major, minor) >= (3, 12), "x-consumer-timeout needs RabbitMQ 3.12 or later"
    assert services["worker"]["command"][:2] == ["qscore", "worker"]


def test_every_file_the_compose_file_mounts_or_builds_exists(compose: dict[str, Any]) -> None:
    missing = []
    for name, service in compose["services"].items():
        build = service.get("build")
        if build and not (REPO / build["context"] / build["dockerfile"]).is_file():
            missing.append(f"{name}: {build['dockerfile']}")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and not (REPO / source).exists():
                missing.append(f"{name}: {source}")
    assert not missing
    mounted = {v.split(":")[1] for v in compose["services"]["prometheus"]["volumes"]}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= mounted


def test_prometheus_config_passes_promtool() -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed")
    result = subprocess.run(
        ["promtool", "check", "config", str(REPO / "deploy/prometheus/prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {c["job_name"] for c in config["scrape_configs"]}
    assert {"qscore-api", "qscore-worker"} <= jobs


def test_grafana_provisioning_and_dashboard_cover_quality_traffic_and_jobs() -> None:
    root = REPO / "deploy/grafana"
    datasource = yaml.safe_load((root / "provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((root / "provisioning/dashboards/qscore.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((root / "dashboards/qscore.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "qscore_q_score_bucket",
        "qscore_low_quality_images_total",
        "qscore_images_scored_total",
        "qscore_request_duration_seconds_bucket",
        "qscore_jobs",
        "qscore_jobs_finished_total",
        "qscore_job_duration_seconds_bucket",
        "qscore_atypical_images_total",
        "qscore_typicality_bucket",
    ):
        assert metric in exprs, metric
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_alertmanager_config_routes_to_a_receiver() -> None:
    config = yaml.safe_load((REPO / "deploy/alertmanager/alertmanager.yml").read_text())
    receivers = {r["name"] for r in config["receivers"]}
    assert config["route"]["receiver"] in receivers
    if shutil.which("amtool"):
        result = subprocess.run(
            ["amtool", "check-config", str(REPO / "deploy/alertmanager/alertmanager.yml")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_the_project_and_starts_it() -> None:
    """One image for API and workers (tests/deploy/test_containers.py lints it and its compose use)."""
    text = (REPO / "docker/qscore.Dockerfile").read_text()
    assert "pip install --no-deps ." in text and "USER 1000:1000" in text
    assert 'CMD ["qscore", "serve"' in text
