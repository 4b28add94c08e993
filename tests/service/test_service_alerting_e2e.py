"""Alerting end to end with the real parts: `qscore serve`, Prometheus, Alertmanager, a webhook.

Prometheus (Debian's `prometheus`) scrapes a real `qscore serve` every second and evaluates a
test copy of deploy/prometheus/alerts.yml whose windows are 10 s and whose `for:` is 2 s;
Alertmanager (`prometheus-alertmanager`) delivers to a webhook receiver in this test. In
distribution traffic (CIFAR-10 test images) must leave it silent; inverted copies of the same
images, which typicality passes, must get `QScoreRepresentationDrift` delivered (the monitor's
window shortened to 64 images, tested every 16); grossly shifted traffic (solid colours and
uniform noise) must get `QScoreInputShift` and, as the served feature set's risk rises with
typicality above its held-out error, `QScoreEstimatedAccuracyDrop` delivered.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from service_helpers import build_registry, free_port

from models.data.shifts import apply_shift
from models.registry.versions import Registry
from models.scoring.error_estimate import ErrorEstimator
from models.scoring.probe import HeadInfo, LinearHead
from models.scoring.risk import RiskModel

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or ALERTMANAGER is None,
    reason="prometheus and prometheus-alertmanager are not installed (scripts/test.sh installs them)",
)


def shortened_rules(text: str) -> str:
    """The rules with every range window at 10 s, every `for:` at 2 s and image minimums at 10."""
    text = re.sub(r"\[\d+m\]", "[10s]", text)
    text = re.sub(r"for: \d+m", "for: 2s", text)
    return re.sub(r">= \d+\n", ">= 10\n", text)


class Webhook:
    """An HTTP receiver of Alertmanager's webhook notifications."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, name: str) -> list[dict]:
        return [
            a
            for message in self.received
            for a in message.get("alerts", [])
            if a["labels"].get("alertname") == name and a["status"] == "firing"
        ]


def _wait_http(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


def with_risk_and_head(registry: Registry, encoder_dim: int, classes: int = 10) -> str:
    """A copy of the tiny feature set with a head (held-out error 0.1) and a risk that rises with typicality.

    risk = sigmoid(4 log(1 + typicality) - 4): about 0.06 for typical images, near 1 for gross
    ones, so the estimated error (the mean risk) crosses the reference error + 0.1 only for those.
    """
    fs = registry.load_feature_set("tiny")
    names = [f"c{i}" for i in range(classes)]
    head = LinearHead(
        torch.randn(classes, encoder_dim, generator=torch.Generator().manual_seed(0)), torch.zeros(classes), names
    )
    fs = fs.with_head(head, HeadInfo(kind="linear", classes=names, source="test", top1=0.9))
    risk = RiskModel(signals=["log_typicality"], mean=[0.0], scale=[1.0], coef=[4.0], intercept=-4.0,
                     monotone=["log_typicality"], source="test", n_train=0)  # fmt: skip
    fs = fs.model_copy(update={"risk_model": risk, "error_estimator": ErrorEstimator(method="mean_risk")})
    return registry.add_feature_set(fs, version="tiny-risk")


@pytest.fixture()
def stack(tmp_path: Path, tiny_model: tuple) -> Iterator[dict]:
    registry = build_registry(tmp_path / "registry", tiny_model)
    registry.set_active("tiny", with_risk_and_head(registry, tiny_model[0].feature_dim))
    webhook = Webhook()
    qscore_port, prom_port, am_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "QSCORE_REGISTRY_ROOT": str(registry.root),
        "QSCORE_DEVICE": "cpu",
        "QSCORE_MAX_FILES": "64",
        "QSCORE_MONITOR_WINDOW": "64",
        "QSCORE_DRIFT_EVERY": "16",
        "QSCORE_DRIFT_MIN_INTERVAL_S": "0.5",
    }
    (tmp_path / "alerts.yml").write_text(shortened_rules(RULES.read_text()))
    (tmp_path / "prometheus.yml").write_text(
        f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [alerts.yml]
alerting:
  alertmanagers:
    - static_configs:
        - targets: ["127.0.0.1:{am_port}"]
scrape_configs:
  - job_name: qscore
    static_configs:
      - targets: ["127.0.0.1:{qscore_port}"]
"""
    )
    (tmp_path / "alertmanager.yml").write_text(
        f"""route:
  receiver: test
  group_by: [alertname]
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: test
    webhook_configs:
      - url: http://127.0.0.1:{webhook.port}/
"""
    )
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in ("qscore", "prometheus", "alertmanager")}
    processes = {
        "qscore": subprocess.Popen(
            [sys.executable, "-m", "qscore_cli.main", "serve", "--host", "127.0.0.1", "--port", str(qscore_port)],
            env=env,
            stdout=logs["qscore"],
            stderr=subprocess.STDOUT,
        ),
        "alertmanager": subprocess.Popen(
            [
                ALERTMANAGER or "alertmanager",
                f"--config.file={tmp_path / 'alertmanager.yml'}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
            ],
            stdout=logs["alertmanager"],
            stderr=subprocess.STDOUT,
        ),
        "prometheus": subprocess.Popen(
            [
                PROMETHEUS or "prometheus",
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            cwd=tmp_path,
            stdout=logs["prometheus"],
            stderr=subprocess.STDOUT,
        ),
    }
    try:
        _wait_http(f"http://127.0.0.1:{qscore_port}/readyz", processes["qscore"])
        _wait_http(f"http://127.0.0.1:{am_port}/-/ready", processes["alertmanager"])
        _wait_http(f"http://127.0.0.1:{prom_port}/-/ready", processes["prometheus"])
        yield {
            "qscore": f"http://127.0.0.1:{qscore_port}",
            "prometheus": f"http://127.0.0.1:{prom_port}",
            "webhook": webhook,
        }
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        for handle in logs.values():
            handle.close()
        webhook.server.shutdown()


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _post_for(url: str, blobs: list[bytes], seconds: float) -> tuple[int, int]:
    """Post ``blobs`` in requests of 16 for ``seconds``; return (images scored, atypical)."""
    scored = atypical = 0
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=60) as client:
        while time.monotonic() < deadline:
            for start in range(0, len(blobs), 16):
                files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs[start : start + 16])]
                results = client.post("/score", files=files).json()["results"]
                scored += len(results)
                atypical += sum(bool(r["atypical"]) for r in results)
    return scored, atypical


def _prometheus_alerts(url: str) -> list[str]:
    data = httpx.get(f"{url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return [a["labels"]["alertname"] for a in data]


def _drift_p_value(url: str) -> float | None:
    return httpx.get(f"{url}/monitor", timeout=10).json()["models"][0]["drift_p_value"]


def test_shift_alerts_are_delivered_for_shifted_images_only(stack: dict, cifar_slice: Path) -> None:
    webhook: Webhook = stack["webhook"]
    paths = sorted((cifar_slice / "test").rglob("*.jpg"))[:64]
    cifar = [p.read_bytes() for p in paths]
    # In distribution for longer than window + for: silent.
    scored, atypical = _post_for(stack["qscore"], cifar, 15)
    assert scored >= 64 and atypical / scored < 0.1
    assert _drift_p_value(stack["qscore"]) >= 0.01
    time.sleep(3)
    for alert in ("QScoreInputShift", "QScoreRepresentationDrift", "QScoreEstimatedAccuracyDrop"):
        assert alert not in _prometheus_alerts(stack["prometheus"])
        assert webhook.alerts(alert) == []

    # Inverted images: few atypical ones, but the window's representations drift.
    inverted = [_png(np.asarray(image)) for image in apply_shift("invert", (Image.open(p) for p in paths))]
    deadline = time.monotonic() + 60
    inverted_scored = inverted_atypical = 0
    while time.monotonic() < deadline and not webhook.alerts("QScoreRepresentationDrift"):
        n, a = _post_for(stack["qscore"], inverted, 2)
        inverted_scored, inverted_atypical = inverted_scored + n, inverted_atypical + a
    assert inverted_atypical / inverted_scored < 0.1
    delivered = webhook.alerts("QScoreRepresentationDrift")
    assert delivered, f"no QScoreRepresentationDrift in 60 s; Prometheus has {_prometheus_alerts(stack['prometheus'])}"
    assert delivered[0]["labels"]["model_version"] == "tiny"
    assert _drift_p_value(stack["qscore"]) < 0.01
    assert "QScoreInputShift" not in _prometheus_alerts(stack["prometheus"])
    assert webhook.alerts("QScoreEstimatedAccuracyDrop") == []  # inverted images are typical: risk stays low

    rng = np.random.default_rng(0)
    shifted = [_png(np.full((32, 32, 3), rng.integers(0, 256, 3))) for _ in range(16)]
    shifted += [_png(rng.integers(0, 256, (32, 32, 3))) for _ in range(16)]
    deadline = time.monotonic() + 90
    shifted_scored = shifted_atypical = 0
    while time.monotonic() < deadline and not (
        webhook.alerts("QScoreInputShift") and webhook.alerts("QScoreEstimatedAccuracyDrop")
    ):
        n, a = _post_for(stack["qscore"], shifted, 2)
        shifted_scored, shifted_atypical = shifted_scored + n, shifted_atypical + a
    assert shifted_atypical / shifted_scored > 0.9
    delivered = webhook.alerts("QScoreInputShift")
    assert delivered, f"no QScoreInputShift delivered in 90 s; Prometheus has {_prometheus_alerts(stack['prometheus'])}"
    assert delivered[0]["labels"]["model_version"] == "tiny"
    assert delivered[0]["labels"]["severity"] == "warning"
    dropped = webhook.alerts("QScoreEstimatedAccuracyDrop")
    assert dropped, f"no QScoreEstimatedAccuracyDrop in 90 s; Prometheus has {_prometheus_alerts(stack['prometheus'])}"
    assert dropped[0]["labels"]["model_version"] == "tiny"
