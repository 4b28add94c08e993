"""The traffic monitor: window figures from hand-made batches, reset, drift off the request path."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models.monitoring.image_properties import PROPERTIES, held_out_properties, property_signals
from models.monitoring.monitor import BackgroundRunner, TrafficMonitor, reference_error
from models.scoring.error_estimate import COTT_MIN_IMAGES, ErrorEstimator, SetCorrection, thresholded_transport
from models.scoring.feature_set import FeatureSet
from models.scoring.result import ImageScore

DEMO = Path(__file__).resolve().parents[3] / "models" / "weights" / "demo-feature-set.json"


@pytest.fixture(scope="module")
def demo_features() -> FeatureSet:
    """The packaged demo feature set, with its 5,000-vector reference bank (128 features), estimating
    the error by the mean risk (its own estimator, COTT, is tested apart)."""
    fs = FeatureSet.load(DEMO)
    assert fs.bank is not None
    return fs.model_copy(update={"error_estimator": ErrorEstimator(method="mean_risk")})


def _score(
    risk: float | None,
    confidence: float | None = None,
    atypical: bool | None = False,
    low: bool = False,
    typicality: float | None = None,
):
    return ImageScore(
        q_score=0.1,
        low_quality=low,
        risk=risk,
        l1_norm=1.0,
        dominant=None,
        discriminative_active=None,
        atypical=atypical,
        confidence=confidence,
        typicality=typicality,
    )


def _h(b: int, seed: int = 0, dim: int = 128) -> torch.Tensor:
    return torch.rand(b, dim, generator=torch.Generator().manual_seed(seed))


def test_estimate_is_the_mean_risk_of_a_hand_made_batch(demo_features: FeatureSet) -> None:
    monitor = TrafficMonitor(window=8, drift_every=8)
    monitor.activate("m", "f", demo_features)
    scores = [_score(0.2, atypical=True), _score(0.4, low=True), _score(0.9), _score(None, atypical=None)]
    monitor.observe("m", _h(4), scores)
    (snap,) = monitor.snapshot()
    assert snap.estimator_method == "mean_risk"
    assert snap.estimated_error == pytest.approx(0.5)  # (0.2 + 0.4 + 0.9) / 3: the unknown risk is left out
    assert snap.estimated_error_last_batch == pytest.approx(0.5) and snap.last_batch_images == 4
    assert snap.mean_risk == pytest.approx(0.5)
    assert snap.atypical_share == pytest.approx(1 / 3) and snap.low_quality_share == pytest.approx(1 / 4)
    assert snap.mean_confidence is None
    assert (snap.window_size, snap.count, snap.images_seen) == (8, 4, 4)
    monitor.observe("m", _h(2, 1), [_score(0.0), _score(0.0)])
    (snap,) = monitor.snapshot()
    assert snap.estimated_error == pytest.approx(1.5 / 5) and snap.estimated_error_last_batch == 0.0
    monitor.close()


def test_window_estimate_uses_the_feature_sets_atc_estimator(demo_features: FeatureSet) -> None:
    atc = demo_features.model_copy(update={"error_estimator": ErrorEstimator(method="atc", threshold=0.5)})
    monitor = TrafficMonitor(window=8, drift_every=8)
    monitor.activate("m", "f", atc)
    monitor.observe("m", _h(4), [_score(0.1, c) for c in (0.3, 0.6, 0.9, 0.4)])
    (snap,) = monitor.snapshot()
    assert snap.estimator_method == "atc"
    assert snap.estimated_error == 0.5  # two of four confidences below 0.5
    assert snap.mean_confidence == pytest.approx(0.55)
    monitor.close()


def test_window_estimate_uses_cott_on_the_heads_probabilities_once_the_window_is_large_enough(
    demo_features: FeatureSet,
) -> None:
    cott = ErrorEstimator(method="cott", threshold=0.6, class_prior=[0.1] * 10)
    monitor = TrafficMonitor(window=COTT_MIN_IMAGES + 50, drift_every=10_000)
    monitor.activate("m", "f", demo_features.model_copy(update={"error_estimator": cott}))
    head = demo_features.classifier
    assert head is not None
    batches = [_h(50, seed) for seed in range(6)]
    for i, h in enumerate(batches[:3]):
        monitor.observe("m", h, [_score(0.25)] * 50)
        (snap,) = monitor.snapshot()
        # under COTT's minimum: the mean risk, and said so
        assert (snap.count, snap.estimated_error, snap.estimator_method) == (50 * (i + 1), 0.25, "cott")
        assert snap.estimated_error_method == "mean_risk"
    for h in batches[3:]:
        monitor.observe("m", h, [_score(0.25)] * 50)
    (snap,) = monitor.snapshot()
    kept = torch.cat(batches)[-(COTT_MIN_IMAGES + 50) :]  # the ring holds the last 250 of 300
    expected = thresholded_transport(torch.softmax(head.logits(kept), 1).numpy(), [0.1] * 10, 0.6)
    assert snap.estimated_error_method == "cott" and snap.count == COTT_MIN_IMAGES + 50
    assert snap.estimated_error == pytest.approx(expected, abs=1e-6)
    assert snap.estimated_error != pytest.approx(0.25)
    assert snap.estimated_error_last_batch == pytest.approx(0.25)  # one batch: under the minimum
    monitor.close()


def test_cott_reads_the_probabilities_the_scorer_gives_instead_of_running_the_head(
    demo_features: FeatureSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The signal graph computed them with the verdicts: the monitor does not run the head again."""
    cott = ErrorEstimator(method="cott", threshold=0.6, class_prior=[0.1] * 10)
    monitor = TrafficMonitor(window=COTT_MIN_IMAGES, drift_every=10_000)
    monitor.activate("m", "f", demo_features.model_copy(update={"error_estimator": cott}))
    monkeypatch.setattr("models.monitoring.monitor.head_probabilities", lambda *a: pytest.fail("the head ran"))
    rng = np.random.default_rng(0)
    given = [rng.dirichlet(np.full(10, 0.3), size=50).astype(np.float32) for _ in range(COTT_MIN_IMAGES // 50)]
    for seed, p in enumerate(given):
        monitor.observe("m", _h(50, seed), [_score(0.25)] * 50, probabilities=p)
    (snap,) = monitor.snapshot()
    assert snap.estimated_error_method == "cott"
    assert snap.estimated_error == pytest.approx(thresholded_transport(np.concatenate(given), [0.1] * 10, 0.6))
    monitor.close()


def test_activate_starts_from_an_empty_window_and_drops_the_old_pairs_batches(demo_features: FeatureSet) -> None:
    monitor = TrafficMonitor(window=8, drift_every=8)
    monitor.activate("a", "fa", demo_features)
    monitor.observe("a", _h(3), [_score(0.5)] * 3)
    monitor.activate("b", "fb", demo_features)
    monitor.observe("a", _h(3), [_score(0.5)] * 3)  # a batch of the old model, finished after the switch
    monitor.observe("b", _h(3), [_score(0.5)] * 3, feature_set_version="other")  # not the served feature set
    (snap,) = monitor.snapshot()
    assert (snap.model_version, snap.count, snap.images_seen, snap.estimated_error) == ("b", 0, 0, None)
    monitor.activate("b", "fb", demo_features)
    monitor.observe("b", _h(2), [_score(0.25)] * 2, feature_set_version="fb")
    assert monitor.snapshot()[0].count == 2
    monitor.close()


def test_drift_is_tested_every_k_images_in_the_background(demo_features: FeatureSet) -> None:
    monitor = TrafficMonitor(window=40, drift_every=20, permutations=100, reference_size=200)
    monitor.activate("m", "f", demo_features)
    bank = demo_features.bank.vectors[torch.randperm(5000, generator=torch.Generator().manual_seed(0))]  # type: ignore[union-attr]
    for start in range(0, 18, 6):  # 18 images: no test yet
        monitor.observe("m", bank[start : start + 6], [_score(0.5)] * 6)
    assert monitor.wait_for_drift(30)
    assert monitor.snapshot()[0].drift_p_value is None
    monitor.observe("m", bank[18:24], [_score(0.5)] * 6)  # 24 images: a test of the window as it was
    assert monitor.wait_for_drift(30)
    snap = monitor.snapshot()[0]
    assert snap.drift_computed_at == 24 and snap.drift_window_count == 24
    assert 1 / 101 <= snap.drift_p_value <= 1  # type: ignore[operator]
    monitor.observe("m", bank[24:30], [_score(0.5)] * 6)  # 30: under 20 since the last test
    assert monitor.wait_for_drift(30)
    assert monitor.snapshot()[0].drift_computed_at == 24
    monitor.close()


def test_drift_of_shifted_representations_is_significant(demo_features: FeatureSet) -> None:
    monitor = TrafficMonitor(window=100, drift_every=100, permutations=100, reference_size=300)
    monitor.activate("m", "f", demo_features)
    monitor.observe("m", torch.rand(100, 128, generator=torch.Generator().manual_seed(0)), [_score(0.5)] * 100)
    assert monitor.wait_for_drift(30)
    assert monitor.snapshot()[0].drift_p_value == pytest.approx(1 / 101)
    monitor.close()


def test_window_estimate_is_corrected_with_the_last_drift_tests_mmd2(demo_features: FeatureSet) -> None:
    correction = SetCorrection(intercept=0.01, mmd2_coef=2.0, estimate_coef=0.0)
    fs = demo_features.model_copy(update={"error_estimator": ErrorEstimator(method="mean_risk", correction=correction)})
    monitor = TrafficMonitor(window=100, drift_every=100, permutations=20, reference_size=300)
    monitor.activate("m", "f", fs)
    monitor.observe("m", _h(50), [_score(0.3)] * 50)
    (snap,) = monitor.snapshot()
    # no drift test yet: the estimate as it is, and no correction said
    assert snap.estimated_error == pytest.approx(0.3) and snap.estimated_error_correction is None
    monitor.observe("m", _h(50, 1), [_score(0.3)] * 50)
    assert monitor.wait_for_drift(30)
    (snap,) = monitor.snapshot()
    assert snap.drift_mmd2 is not None and snap.drift_mmd2 > 0.01  # uniform noise, far from the bank
    expected = min(1.0, 0.3 + 0.01 + 2.0 * snap.drift_mmd2)
    assert snap.estimated_error == pytest.approx(expected)
    assert snap.estimated_error_correction == pytest.approx(expected - 0.3)
    assert snap.estimated_error_last_batch == pytest.approx(0.3)  # a batch is never corrected
    monitor.close()


def test_drift_tests_the_windows_typicality_against_the_held_out_images(demo_features: FeatureSet) -> None:
    rng = np.random.default_rng(0)
    held_out = np.sort(rng.gamma(4.0, 0.15, 2000)).tolist()
    evaluated = demo_features.model_copy(
        update={"typicality": demo_features.typicality.model_copy(update={"held_out": held_out})}  # type: ignore[union-attr]
    )
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(1))
    bank = demo_features.bank.vectors[order]  # type: ignore[union-attr]  # the bank is stored class by class
    results = {}
    for name, shift in (("clean", 0.0), ("shifted", 0.4)):
        monitor = TrafficMonitor(window=200, drift_every=200, permutations=200, reference_size=1000)
        monitor.activate("m", "f", evaluated)
        typ = rng.gamma(4.0, 0.15, 200) + shift
        monitor.observe("m", bank[:200], [_score(0.5, typicality=float(t)) for t in typ])  # the bank's directions
        assert monitor.wait_for_drift(30)
        results[name] = monitor.snapshot()[0]
        monitor.close()
    clean, shifted = results["clean"], results["shifted"]
    assert shifted.drift_mmd_p_value > 0.05 and clean.drift_mmd_p_value > 0.05  # type: ignore[operator]
    assert shifted.drift_typicality_p_value < 1e-6 < 0.01 < clean.drift_typicality_p_value  # type: ignore[operator]
    assert shifted.drift_p_value == pytest.approx(2 * shifted.drift_typicality_p_value)  # type: ignore[operator]
    # a window without typicality (no typicality model at scoring time): the MMD alone
    monitor = TrafficMonitor(window=50, drift_every=50, permutations=200, reference_size=300)
    monitor.activate("m", "f", evaluated)
    monitor.observe("m", bank[:50], [_score(0.5)] * 50)
    assert monitor.wait_for_drift(30)
    snap = monitor.snapshot()[0]
    assert snap.drift_typicality_p_value is None and snap.drift_p_value == snap.drift_mmd_p_value
    monitor.close()


def test_drift_waits_for_the_minimum_interval(demo_features: FeatureSet) -> None:
    monitor = TrafficMonitor(window=20, drift_every=10, drift_min_interval_s=3600, permutations=100, reference_size=50)
    monitor.activate("m", "f", demo_features)
    for seed in range(3):
        monitor.observe("m", _h(10, seed), [_score(0.5)] * 10)
        assert monitor.wait_for_drift(30)
    assert monitor.snapshot()[0].drift_computed_at == 10  # the first test only
    monitor.close()


def test_without_a_bank_there_is_no_drift_test(demo_features: FeatureSet) -> None:
    bankless = FeatureSet.model_validate_json(DEMO.read_text())  # JSON only: its bank was never attached
    assert bankless.bank is None
    monitor = TrafficMonitor(window=10, drift_every=2)
    monitor.activate("m", "f", bankless)
    monitor.observe("m", np.ones((4, 128), dtype=np.float32), [_score(0.5)] * 4)
    assert monitor.wait_for_drift(5)
    assert monitor.snapshot()[0].drift_p_value is None and monitor.snapshot()[0].count == 4
    monitor.close()


def test_reference_error_comes_from_the_head_or_the_risk_fit(demo_features: FeatureSet) -> None:
    assert reference_error(demo_features) == pytest.approx(1.0 - demo_features.head.top1)  # type: ignore[union-attr]
    headless = demo_features.model_copy(update={"head": None})
    risk = demo_features.risk_model.model_copy(update={"metrics": {"base_rate_misclassified": 0.57}})  # type: ignore[union-attr]
    assert reference_error(headless.model_copy(update={"risk_model": risk})) == 0.57
    assert reference_error(headless.model_copy(update={"risk_model": None})) is None


def test_bad_monitor_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="window >= 2"):
        TrafficMonitor(window=1)


def test_a_corrected_cott_window_solves_its_transport_once_a_snapshot(
    demo_features: FeatureSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.scoring import error_estimate

    correction = SetCorrection(intercept=0.0, mmd2_coef=1.0, estimate_coef=0.0)
    cott = ErrorEstimator(method="cott", threshold=0.6, class_prior=[0.1] * 10, correction=correction)
    monitor = TrafficMonitor(window=COTT_MIN_IMAGES, drift_every=COTT_MIN_IMAGES, permutations=20, reference_size=300)
    monitor.activate("m", "f", demo_features.model_copy(update={"error_estimator": cott}))
    monitor.observe("m", _h(COTT_MIN_IMAGES), [_score(0.25)] * COTT_MIN_IMAGES)
    assert monitor.wait_for_drift(30)
    calls: list[int] = []
    solve = error_estimate.thresholded_transport
    monkeypatch.setattr(error_estimate, "thresholded_transport", lambda *a: calls.append(1) or solve(*a))
    (snap,) = monitor.snapshot()
    assert len(calls) == 1 and snap.estimated_error_method == "cott"
    assert snap.estimated_error_correction == pytest.approx(snap.drift_mmd2)  # type: ignore[arg-type]
    head = demo_features.classifier
    assert head is not None
    plain = solve(torch.softmax(head.logits(_h(COTT_MIN_IMAGES)), 1).numpy(), [0.1] * 10, 0.6)
    assert snap.estimated_error == pytest.approx(min(1.0, plain + snap.drift_mmd2))  # type: ignore[operator]
    monitor.close()


def test_drift_tests_the_windows_image_properties_and_names_the_one_that_moved(demo_features: FeatureSet) -> None:
    rng = np.random.default_rng(3)

    def images(n: int, lift: int = 0) -> np.ndarray:
        """Smooth random 32x32 images, brighter by ``lift`` grey levels."""
        base = rng.integers(40, 200, (n, 1, 1, 3)) + rng.integers(-30, 30, (n, 32, 32, 3))
        return np.clip(base + lift, 0, 255).astype(np.uint8)

    held = held_out_properties(property_signals(images(1000)))
    assert held is not None
    evaluated = demo_features.model_copy(update={"held_out_image_properties": held})
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(2))
    bank = demo_features.bank.vectors[order]  # type: ignore[union-attr]
    results = {}
    for name, lift in (("clean", 0), ("brighter", 40)):
        monitor = TrafficMonitor(window=200, drift_every=200, permutations=200, reference_size=1000)
        monitor.activate("m", "f", evaluated)
        pixels = images(200, lift)
        for start in range(0, 200, 50):  # as the batcher hands them over: arrays of (H, W, 3)
            batch = list(pixels[start : start + 50])
            monitor.observe("m", bank[start : start + 50], [_score(0.5)] * 50, pixels=batch)
        assert monitor.wait_for_drift(30)
        results[name] = monitor.snapshot()[0]
        monitor.close()
    clean, brighter = results["clean"], results["brighter"]
    per = brighter.drift_property_p_values
    assert per is not None and set(per) == set(PROPERTIES) and min(per, key=per.get) == "brightness"  # type: ignore[arg-type]
    assert brighter.drift_property_p_value < 1e-6 < 0.01 < clean.drift_property_p_value  # type: ignore[operator]
    assert brighter.drift_mmd_p_value > 0.05  # type: ignore[operator]  # the bank's own directions
    assert brighter.drift_p_value == pytest.approx(2 * brighter.drift_property_p_value)  # type: ignore[operator]  # no typicality
    # a feature set without held-out properties: none measured, no property test
    monitor = TrafficMonitor(window=50, drift_every=50, permutations=200, reference_size=300)
    monitor.activate("m", "f", demo_features.model_copy(update={"held_out_image_properties": None}))
    monitor.observe("m", bank[:50], [_score(0.5)] * 50, pixels=list(images(50)))
    assert monitor.wait_for_drift(30)
    snap = monitor.snapshot()[0]
    assert snap.drift_property_p_value is None and snap.drift_property_p_values is None
    monitor.close()


def test_a_test_due_within_the_interval_runs_when_it_ends_without_new_traffic(demo_features: FeatureSet) -> None:
    """A burst then silence: the window as the burst ended is tested once the interval allows."""
    monitor = TrafficMonitor(window=40, drift_every=10, drift_min_interval_s=0.3, permutations=100, reference_size=50)
    monitor.activate("m", "f", demo_features)
    monitor.observe("m", _h(10, 0), [_score(0.5)] * 10)  # due at once: the first test
    assert monitor.wait_for_drift(30)
    assert monitor.snapshot()[0].drift_computed_at == 10
    monitor.observe("m", _h(10, 1), [_score(0.5)] * 10)  # due, within the interval: waits for it
    monitor.observe("m", _h(5, 2), [_score(0.5)] * 5)  # arrives while it waits: read when it starts
    time.sleep(0.5)  # and no more traffic
    assert monitor.wait_for_drift(30)
    snap = monitor.snapshot()[0]
    assert snap.drift_computed_at == 25 and snap.drift_window_count == 25
    monitor.close()


def test_the_runner_queues_one_job_behind_the_running_one_and_keeps_its_start_time() -> None:
    runner = BackgroundRunner("test")
    release, ran = threading.Event(), []
    assert runner.offer(lambda: (release.wait(10), ran.append(("first", time.monotonic()))))
    time.sleep(0.05)  # the first runs (and blocks)
    start_at = time.monotonic() + 0.3
    assert runner.offer(lambda: ran.append(("second", time.monotonic())), start_at)  # waits behind it
    assert not runner.offer(lambda: ran.append(("third", time.monotonic())))  # one waits already: refused
    release.set()
    assert runner.wait_idle(10)  # the first ended; the second's start time has not come: idle
    time.sleep(0.5)
    assert runner.wait_idle(10)
    assert [name for name, _ in ran] == ["first", "second"] and ran[1][1] >= start_at
    runner.close()
    assert not runner.offer(lambda: None)  # closed
