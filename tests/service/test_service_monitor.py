"""GET /monitor and the monitor's gauges through the real service: the window of scored images,
its estimated error (the mean of the risks /score returned), drift, and the reset on a switch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from service_helpers import LiveServer, build_registry, sum_samples
from test_service_score import cifar_files, upload

from models.monitoring.monitor import TrafficMonitor
from models.scoring.error_estimate import COTT_MIN_IMAGES, ErrorEstimator, SetCorrection
from models.scoring.probe import HeadInfo, LinearHead
from models.scoring.risk import RiskModel
from qscore_config.settings import Settings

MONITOR_GAUGES = (
    "qscore_estimated_error_ratio",
    "qscore_drift_p_value",
    "qscore_monitor_window_images",
    "qscore_window_atypical_ratio",
)


@pytest.fixture()
def monitored(make_server: Callable[..., LiveServer], tmp_path: Path, tiny_model: tuple) -> LiveServer:
    """The tiny model served with feature set 'tiny-risk' (a risk on the Q-Score, held-out typicality and
    brightness far above any image's: the drift test's typicality and image property tests run and see a
    shift), a window of 16."""
    registry = build_registry(tmp_path / "registry", tiny_model)
    risk = RiskModel.from_q_curve([0.0, 0.05, 1.0], [0.9, 0.4, 0.1], "test: risk falls with Q")
    fs = registry.load_feature_set("tiny")
    typicality = fs.typicality.model_copy(update={"held_out": [1e6 + i for i in range(40)]})
    brighter = {"brightness": [2.0 + i / 100 for i in range(40)]}  # brightness is at most 1
    update = {"risk_model": risk, "typicality": typicality, "held_out_image_properties": brighter}
    registry.add_feature_set(fs.model_copy(update=update), version="tiny-risk")
    registry.set_active("tiny", "tiny-risk")
    return make_server(registry_root=registry.root, monitor_window=16, drift_every=8, drift_min_interval_s=0)


def _score(live: LiveServer, paths: list[Path]) -> list[dict]:
    results = []
    with live.client() as client:
        for start in range(0, len(paths), 6):
            r = client.post("/score", files=upload(paths[start : start + 6]))
            assert r.status_code == 200, r.text
            results += r.json()["results"]
    return results


def _monitor(live: LiveServer) -> dict:
    traffic: TrafficMonitor = live.app.state.monitor
    assert traffic.wait_for_drift(30)
    with live.client() as client:
        body = client.get("/monitor").json()
    assert body["enabled"] is True and len(body["models"]) == 1
    return body["models"][0]


def test_monitor_reports_the_window_of_scored_images(monitored: LiveServer, cifar_slice: Path) -> None:
    paths = cifar_files(cifar_slice, 20)
    first = _score(monitored, paths[:12])
    window = _monitor(monitored)
    risks = [r["risk"] for r in first]
    assert (window["model_version"], window["feature_set_version"]) == ("tiny", "tiny-risk")
    assert (window["window_size"], window["count"], window["images_seen"]) == (16, 12, 12)
    assert window["estimator_method"] == "mean_risk" and window["reference_error"] is None
    assert window["estimated_error"] == pytest.approx(np.mean(risks), rel=1e-5)
    assert window["mean_risk"] == pytest.approx(np.mean(risks), rel=1e-5)
    assert window["atypical_share"] == pytest.approx(np.mean([r["atypical"] for r in first]))
    assert window["low_quality_share"] == pytest.approx(np.mean([r["low_quality"] for r in first]))
    assert window["mean_confidence"] is None  # no head
    assert 1 / 501 <= window["drift_mmd_p_value"] <= 1
    typicality_p = window["drift_typicality_p_value"]  # against the held-out images: none as high as them
    assert typicality_p < 1e-6
    # the batcher hands the monitor each batch's pixels: their brightness, against the held-out images'
    property_p = window["drift_property_p_value"]
    assert window["drift_property_p_values"] == {"brightness": pytest.approx(property_p)} and property_p < 1e-6
    assert window["drift_p_value"] == pytest.approx(3 * min(typicality_p, property_p))  # Bonferroni over three
    assert window["drift_window_count"] == window["drift_computed_at"] <= 12

    second = _score(monitored, paths[12:20])  # 20 seen: the window keeps the last 16
    window = _monitor(monitored)
    last = [r["risk"] for r in (first + second)[-16:]]
    assert (window["count"], window["images_seen"]) == (16, 20)
    assert window["estimated_error"] == pytest.approx(np.mean(last), rel=1e-5)
    assert window["drift_computed_at"] > 12


def test_monitor_restarts_from_an_empty_window_on_a_switch(monitored: LiveServer, cifar_slice: Path) -> None:
    paths = cifar_files(cifar_slice, 10)
    _score(monitored, paths)
    assert _monitor(monitored)["count"] == 10
    with monitored.client() as client:
        r = client.post("/admin/switch", json={"model": "tiny-b", "feature_set": "tiny-b", "persist": False})
        assert r.status_code == 200, r.text
    window = _monitor(monitored)
    assert (window["model_version"], window["count"], window["images_seen"]) == ("tiny-b", 0, 0)
    assert window["estimated_error"] is None and window["drift_p_value"] is None
    _score(monitored, paths[:3])
    with monitored.client() as client:  # the pair already served: no restart
        client.post("/admin/switch", json={"model": "tiny-b", "feature_set": "tiny-b", "persist": False})
    assert _monitor(monitored)["count"] == 3


def test_metrics_expose_the_monitor_gauges(monitored: LiveServer, cifar_slice: Path) -> None:
    _score(monitored, cifar_files(cifar_slice, 12))
    window = _monitor(monitored)
    text = monitored.client().get("/metrics").text
    pair = {"model_version": "tiny", "feature_set_version": "tiny-risk"}
    assert sum_samples(text, "qscore_estimated_error_ratio", **pair) == pytest.approx(window["estimated_error"])
    assert sum_samples(text, "qscore_drift_p_value", **pair) == pytest.approx(window["drift_p_value"])
    assert sum_samples(text, "qscore_monitor_window_images", **pair) == 12
    assert sum_samples(text, "qscore_window_atypical_ratio", **pair) == pytest.approx(window["atypical_share"])
    assert "qscore_reference_error_ratio" not in text  # the feature set records no held-out error
    # one series per image property the feature set holds (here brightness alone): which input moved
    property_p = window["drift_property_p_values"]["brightness"]
    series = sum_samples(text, "qscore_drift_property_p_value", **pair, property="brightness")
    assert series == pytest.approx(property_p)
    assert text.count("qscore_drift_property_p_value{") == 1


def test_monitor_off_reports_nothing_and_scoring_goes_on(
    make_server: Callable[..., LiveServer], cifar_slice: Path
) -> None:
    live = make_server(monitor=False)
    assert live.app.state.monitor is None
    assert len(_score(live, cifar_files(cifar_slice, 4))) == 4
    with live.client() as client:
        assert client.get("/monitor").json() == {"enabled": False, "models": []}
        text = client.get("/metrics").text
    assert not any(name in text for name in MONITOR_GAUGES)


def test_monitor_settings_fail_fast_with_the_reason() -> None:
    defaults = Settings(_env_file=None)
    assert (defaults.monitor, defaults.monitor_window, defaults.drift_every) == (True, 500, 100)
    assert (defaults.drift_permutations, defaults.drift_reference_size) == (500, 1000)
    with pytest.raises(ValidationError, match=r"QSCORE_DRIFT_EVERY \(600\) must not exceed QSCORE_MONITOR_WINDOW"):
        Settings(_env_file=None, drift_every=600)
    with pytest.raises(ValidationError, match="greater than or equal to 300"):
        Settings(_env_file=None, drift_permutations=299)  # the combined p of three could never go below 0.01
    assert 3 / (1 + Settings(_env_file=None, drift_permutations=300).drift_permutations) < 0.01


@pytest.mark.parametrize(("threshold", "window_error"), [(0.0, 1.0), (1.5, 0.0)])
def test_a_cott_feature_set_estimates_by_transport_once_the_window_holds_enough_images(
    make_server: Callable[..., LiveServer],
    tmp_path: Path,
    tiny_model: tuple,
    cifar_slice: Path,
    threshold: float,
    window_error: float,
) -> None:
    """The served feature set has a head and a COTT estimator whose threshold makes the transport's
    answer exact whatever the images (every cost >= 0; none >= 1.5): the mean risk until the window
    holds COTT_MIN_IMAGES images, then the transport's, over HTTP."""
    registry = build_registry(tmp_path / "registry", tiny_model)
    fs = registry.load_feature_set("tiny")
    dim = fs.encoder.feature_dim
    head = LinearHead(torch.randn(3, dim, generator=torch.Generator().manual_seed(0)), torch.zeros(3), ["a", "b", "c"])
    cott = ErrorEstimator(method="cott", threshold=threshold, class_prior=[0.5, 0.25, 0.25])
    risk = RiskModel.from_q_curve([0.0, 0.05, 1.0], [0.9, 0.4, 0.1], "test: risk falls with Q")
    served = fs.with_head(head, HeadInfo(kind="linear", classes=head.classes, source="test"))
    registry.add_feature_set(
        served.model_copy(update={"risk_model": risk, "error_estimator": cott}), version="tiny-cott"
    )
    registry.set_active("tiny", "tiny-cott")
    live = make_server(
        registry_root=registry.root, monitor_window=COTT_MIN_IMAGES + 10, drift_every=COTT_MIN_IMAGES + 10
    )
    paths = cifar_files(cifar_slice, 8)  # QSCORE_MAX_FILES a request; 25 requests fill the window
    risks: list[float] = []
    with live.client() as client:

        def score() -> None:
            answer = client.post("/score", files=upload(paths))
            assert answer.status_code == 200, answer.text
            risks.extend(r["risk"] for r in answer.json()["results"])

        while len(risks) < COTT_MIN_IMAGES - 8:
            score()
        window = client.get("/monitor").json()["models"][0]
        assert (window["estimator_method"], window["estimated_error_method"]) == ("cott", "mean_risk")
        assert window["estimated_error"] == pytest.approx(np.mean(risks), rel=1e-5)
        score()
        window = client.get("/monitor").json()["models"][0]
    assert window["count"] == COTT_MIN_IMAGES and window["estimated_error_method"] == "cott"
    assert window["estimated_error"] == pytest.approx(window_error)
    assert window["mean_risk"] == pytest.approx(np.mean(risks), rel=1e-5)


def test_a_feature_sets_set_correction_moves_the_window_estimate_by_the_drift_tests_mmd2(
    make_server: Callable[..., LiveServer], tmp_path: Path, tiny_model: tuple, cifar_slice: Path
) -> None:
    """estimate + 0.05 + 2 MMD^2 (clipped to [0, 1]) once a drift test has run, over HTTP and in /metrics."""
    registry = build_registry(tmp_path / "registry", tiny_model)
    risk = RiskModel.from_q_curve([0.0, 0.05, 1.0], [0.9, 0.4, 0.1], "test: risk falls with Q")
    correction = SetCorrection(intercept=0.05, mmd2_coef=2.0, estimate_coef=0.0)
    estimator = ErrorEstimator(method="mean_risk", correction=correction)
    fs = registry.load_feature_set("tiny")
    registry.add_feature_set(
        fs.model_copy(update={"risk_model": risk, "error_estimator": estimator}), version="tiny-corrected"
    )
    registry.set_active("tiny", "tiny-corrected")
    live = make_server(registry_root=registry.root, monitor_window=16, drift_every=8, drift_min_interval_s=0)
    paths = cifar_files(cifar_slice, 6)
    risks = [r["risk"] for r in _score(live, paths)]  # 6 images: under drift_every, no test yet
    window = _monitor(live)
    assert window["drift_mmd2"] is None and window["estimated_error_correction"] is None
    assert window["estimated_error"] == pytest.approx(np.mean(risks), rel=1e-5)
    risks += [r["risk"] for r in _score(live, cifar_files(cifar_slice, 12)[6:])]
    window = _monitor(live)
    assert window["drift_computed_at"] == 12 and window["drift_mmd2"] is not None
    expected = float(np.clip(np.mean(risks) + 0.05 + 2.0 * window["drift_mmd2"], 0.0, 1.0))
    assert window["estimated_error"] == pytest.approx(expected, rel=1e-5)
    assert window["estimated_error_correction"] == pytest.approx(expected - np.mean(risks), abs=1e-6)
    with live.client() as client:
        text = client.get("/metrics").text
    pair = {"model_version": "tiny", "feature_set_version": "tiny-corrected"}
    assert sum_samples(text, "qscore_estimated_error_ratio", **pair) == pytest.approx(expected, rel=1e-5)
