"""The traffic monitor: per served model, the window of recent images, its estimated error and its drift.

:meth:`TrafficMonitor.observe` runs in the batcher's inference thread after every batch: it
normalises the batch's representations, writes them and the verdicts' signals into the model's
:class:`~models.monitoring.window.RingWindow` and, every ``drift_every`` images, hands a drift
test to one background thread, to start no sooner than ``drift_min_interval_s`` after the last
one. Nothing heavier happens on the request path. One test at most waits (while another runs or
for the interval), and it reads the window when it starts: a burst followed by silence is
tested as it ended, instead of leaving the result of a window taken mid-burst (and an alert on
it) until traffic comes back.

:meth:`TrafficMonitor.activate` starts a served pair from an empty window (the service calls it
where it switches pairs); batches of the previous pair that finish afterwards are dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from models.monitoring.drift import DEFAULT_PERMUTATIONS, DEFAULT_REFERENCE_SIZE, DriftReference, DriftResult
from models.monitoring.image_properties import Pixels, image_properties
from models.monitoring.window import SIGNALS, RingWindow
from models.scoring.error_estimate import ErrorEstimator
from models.scoring.feature_set import FeatureSet
from models.scoring.probe import head_probabilities
from models.scoring.result import ImageScore

log = logging.getLogger(__name__)

#: The estimator of a feature set that records none: the mean calibrated risk (CBPE's form).
MEAN_RISK = ErrorEstimator(method="mean_risk", source="mean of the calibrated risk (the feature set records none)")


def reference_error(fs: FeatureSet) -> float | None:
    """The probe's error on the feature set's labelled held-out sample, when it was recorded."""
    if fs.head is not None and fs.head.top1 is not None:
        return 1.0 - fs.head.top1
    if fs.risk_model is not None and "base_rate_misclassified" in fs.risk_model.metrics:
        return float(fs.risk_model.metrics["base_rate_misclassified"])
    return None


@dataclass(frozen=True)
class ModelSnapshot:
    """What ``GET /monitor`` and ``/metrics`` report of one served model (None: not known yet)."""

    model_version: str
    feature_set_version: str
    window_size: int
    count: int
    images_seen: int
    estimator_method: str
    estimated_error: float | None
    #: What estimated_error was computed with: the estimator's method, or "mean_risk" where COTT's
    #: window is still under COTT_MIN_IMAGES (or the head is missing); None while it is None.
    estimated_error_method: str | None
    #: What the feature set's set-level correction added to estimated_error, with the last drift
    #: test's MMD^2 (ErrorEstimator.correction); None when it was not applied.
    estimated_error_correction: float | None
    estimated_error_last_batch: float | None
    last_batch_images: int
    reference_error: float | None
    drift_p_value: float | None
    drift_mmd_p_value: float | None
    drift_typicality_p_value: float | None
    drift_property_p_value: float | None
    #: Per image property, its own KS p-value (which property moved); None without held-out properties.
    drift_property_p_values: dict[str, float] | None
    drift_mmd2: float | None
    drift_computed_at: int | None
    drift_window_count: int | None
    atypical_share: float | None
    low_quality_share: float | None
    mean_risk: float | None
    mean_confidence: float | None


class _ModelState:
    def __init__(self, model_version: str, feature_set_version: str, fs: FeatureSet, window: int) -> None:
        self.model_version, self.feature_set_version = model_version, feature_set_version
        self.estimator = fs.error_estimator or MEAN_RISK
        self.reference_error = reference_error(fs)
        self.bank = fs.bank
        self.held_out_typicality = None if fs.typicality is None else fs.typicality.held_out
        self.held_out_properties = fs.held_out_image_properties
        # COTT reads the head's class probabilities of the window's images: the head runs on them here.
        self.head = fs.classifier if self.estimator.method == "cott" else None
        classes = 0 if self.head is None else len(self.head.classes)
        self.window = RingWindow(window, fs.encoder.feature_dim, classes)
        self.last_batch: np.ndarray | None = None  # (len(SIGNALS), B) signals of the last batch, as in the window
        self.drift: DriftResult | None = None
        self.drift_reference: DriftReference | None = None  # built by the first test, in its thread
        self.drift_requested_at = 0  # images seen when the last test was handed over or started
        self.drift_started = -float("inf")  # time.monotonic() when that test was to start


class BackgroundRunner:
    """One daemon thread running one job at a time, and at most one more waiting for its start time;
    a job offered while one waits is refused."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._cond = threading.Condition()
        self._job: Callable[[], None] | None = None
        self._start_at = 0.0  # time.monotonic() the waiting job may start
        self._busy = self._closed = False
        self._thread: threading.Thread | None = None

    def offer(self, job: Callable[[], None], start_at: float = 0.0) -> bool:
        """Queue ``job`` to run once the running one (if any) ends and ``time.monotonic()`` reaches
        ``start_at``; False (and nothing queued) when a job already waits or the runner is closed."""
        with self._cond:
            if self._closed or self._job is not None:
                return False
            self._job, self._start_at = job, start_at
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    if self._job is None:
                        self._cond.wait()
                    elif (wait := self._start_at - time.monotonic()) > 0:
                        self._cond.wait(wait)
                    else:
                        break
                if self._closed:
                    return
                job, self._job, self._busy = self._job, None, True
            try:
                job()
            except Exception:  # a failed test must not end the thread: the next one may succeed
                log.exception("a background monitoring job failed")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no job runs or may start now (one waiting for a later start time does not
        count); False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._busy and (self._job is None or self._start_at > time.monotonic()), timeout
            )

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)


class TrafficMonitor:
    """Windows of the last ``window`` images per served model, and their drift tests.

    ``drift_every``: images between two tests; ``drift_min_interval_s``: least seconds between two;
    ``permutations`` and ``reference_size``: see :class:`~models.monitoring.drift.DriftReference`.
    """

    def __init__(
        self,
        window: int = 500,
        drift_every: int = 100,
        drift_min_interval_s: float = 0.0,
        permutations: int = DEFAULT_PERMUTATIONS,
        reference_size: int = DEFAULT_REFERENCE_SIZE,
    ) -> None:
        if window < 2 or drift_every < 1 or drift_min_interval_s < 0 or permutations < 1 or reference_size < 2:
            raise ValueError(
                "the monitor needs window >= 2, drift_every >= 1, drift_min_interval_s >= 0, permutations >= 1 and "
                f"reference_size >= 2; got {window}, {drift_every}, {drift_min_interval_s}, {permutations}, "
                f"{reference_size}"
            )
        self.window, self.drift_every, self.drift_min_interval_s = window, drift_every, drift_min_interval_s
        self.permutations, self.reference_size = permutations, reference_size
        self._lock = threading.Lock()
        self._models: dict[str, _ModelState] = {}
        self._runner = BackgroundRunner("qscore-drift")
        self._blas = ThreadpoolController()

    def activate(self, model_version: str, feature_set_version: str, feature_set: FeatureSet) -> None:
        """Serve this pair from now on: its window starts empty; other models' states are dropped."""
        state = _ModelState(model_version, feature_set_version, feature_set, self.window)
        with self._lock:
            self._models = {model_version: state}

    def observe(
        self,
        model_version: str,
        h: torch.Tensor | np.ndarray,
        scores: Sequence[ImageScore],
        feature_set_version: str | None = None,
        probabilities: np.ndarray | None = None,
        pixels: Pixels | None = None,
    ) -> None:
        """Record one batch: representations ``h`` (B, r) and their B verdicts. Thread-safe.

        A batch of a model (or, when given, a feature set) not served any more is ignored.
        ``probabilities``: the head's (B, C) class probabilities where the scorer has them
        (``Inference.probabilities``); else the head runs on ``h`` here. ``pixels``: the batch's
        images as the scorer took them, whose properties the drift test compares with the
        feature set's held-out images' (measured only where it has them).
        """
        if not scores:
            return
        state = self._models.get(model_version)
        if state is None or (feature_set_version is not None and feature_set_version != state.feature_set_version):
            return
        rows = _host_rows(h)
        vectors = _unit_rows(rows)
        if state.head is None:
            probabilities = None
        elif probabilities is None:
            probabilities = head_probabilities(state.head, torch.from_numpy(rows))
        # in SIGNALS order; spelled out, as attrgetter(*SIGNALS) costs a fifth more on this thread
        signals = np.array(
            [[s.risk, s.confidence, s.atypical, s.low_quality, s.typicality] for s in scores], dtype=np.float32
        ).T
        properties = None
        if pixels is not None and state.held_out_properties:
            properties = image_properties(pixels)
        with self._lock:
            if self._models.get(model_version) is not state:  # switched meanwhile
                return
            state.window.append(vectors, signals, probabilities, properties)
            state.last_batch = signals  # its estimate is made when asked for, off this thread
            if state.bank is None or state.window.seen - state.drift_requested_at < self.drift_every:
                return
            start_at = max(time.monotonic(), state.drift_started + self.drift_min_interval_s)
            if self._runner.offer(lambda: self._test_drift(state), start_at):
                state.drift_requested_at, state.drift_started = state.window.seen, start_at

    def _test_drift(self, state: _ModelState) -> None:
        """In the drift thread: the window's representations (and typicality, image properties) against the
        reference, one BLAS thread."""
        with self._lock:
            contents, seen = state.window.contents(), state.window.seen
            state.drift_requested_at = seen  # the next test is due drift_every images after the ones read now
        vectors = contents.vectors
        if vectors.shape[0] < 2 or state.bank is None:
            return
        # numpy's BLAS pool is process-wide: one thread for the length of the test leaves the
        # cores to the encoder (torch's own pool, untouched).
        with self._blas.limit(limits=1, user_api="blas"):
            if state.drift_reference is None:
                bank = state.bank.vectors.float().cpu().numpy()
                state.drift_reference = DriftReference(
                    bank,
                    self.reference_size,
                    held_out_typicality=state.held_out_typicality,
                    held_out_properties=state.held_out_properties,
                )
            result = state.drift_reference.test(
                vectors,
                self.permutations,
                seed=seen,
                computed_at=seen,
                typicality=contents.typicality,
                properties=contents.properties,
            )
        with self._lock:
            state.drift = result

    def wait_for_drift(self, timeout: float | None = None) -> bool:
        """Wait until no drift test runs (tests and experiments); False on timeout."""
        return self._runner.wait_idle(timeout)

    def snapshot(self) -> list[ModelSnapshot]:
        """Every served model's window figures, now (COTT's transport solved outside the lock)."""
        with self._lock:
            taken = [(state, _snapshot(state), state.window.probability_rows()) for state in self._models.values()]
        return [_with_transport_estimate(state, snap, probabilities) for state, snap, probabilities in taken]

    def close(self) -> None:
        self._runner.close()


def _host_rows(h: torch.Tensor | np.ndarray) -> np.ndarray:
    """(B, r) float32 representations on the host."""
    x = np.asarray(h.detach().cpu().numpy() if isinstance(h, torch.Tensor) else h, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"representations must have shape (B, r), got {x.shape}")
    return x


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """(B, r) float32 rows of unit L2 norm: the bank's normalisation (``torch.nn.functional.normalize``,
    norms clamped at 1e-12), in numpy: a third of torch's per-call cost on the small batches of the
    inference thread."""
    return x / np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x))[:, None], 1e-12)


def _known(values: np.ndarray) -> np.ndarray:
    return values[~np.isnan(values)]


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean(dtype=np.float64)) if values.size else None


def _snapshot(state: _ModelState) -> ModelSnapshot:
    window, drift, batch = state.window, state.drift, state.last_batch
    values = {name: window.values(name) for name in SIGNALS}
    # a request batch is under COTT's minimum: its estimate is the mean risk (see ErrorEstimator.estimate)
    batch_error = None if batch is None else state.estimator.estimate(_known(batch[0]), _known(batch[1]))
    window_error, correction = _window_estimate(state.estimator, drift, values["risk"], values["confidence"], None)
    return ModelSnapshot(
        model_version=state.model_version,
        feature_set_version=state.feature_set_version,
        window_size=window.capacity,
        count=window.count,
        images_seen=window.seen,
        estimator_method=state.estimator.method,
        estimated_error=window_error,
        estimated_error_method=None if window_error is None else state.estimator.method_for(None),
        estimated_error_correction=correction,
        estimated_error_last_batch=batch_error,
        last_batch_images=0 if batch is None else batch.shape[1],
        reference_error=state.reference_error,
        drift_p_value=None if drift is None else drift.p_value,
        drift_mmd_p_value=None if drift is None else drift.mmd_p_value,
        drift_typicality_p_value=None if drift is None else drift.typicality_p_value,
        drift_property_p_value=None if drift is None else drift.property_p_value,
        drift_property_p_values=None if drift is None else drift.property_p_values,
        drift_mmd2=None if drift is None else drift.mmd2,
        drift_computed_at=None if drift is None else drift.computed_at,
        drift_window_count=None if drift is None else drift.window_count,
        atypical_share=_mean(values["atypical"]),
        low_quality_share=_mean(values["low_quality"]),
        mean_risk=_mean(values["risk"]),
        mean_confidence=_mean(values["confidence"]),
    )


def _with_transport_estimate(
    state: _ModelState, snap: ModelSnapshot, probabilities: np.ndarray | None
) -> ModelSnapshot:
    """``snap`` with COTT's window estimate once the window holds COTT_MIN_IMAGES images (before: the mean risk)."""
    if state.estimator.method_for(probabilities) != "cott":
        return snap
    estimate, correction = _window_estimate(state.estimator, state.drift, None, None, probabilities)
    return replace(snap, estimated_error=estimate, estimated_error_method="cott", estimated_error_correction=correction)


def _window_estimate(
    estimator: ErrorEstimator,
    drift: DriftResult | None,
    risk: np.ndarray | None,
    confidence: np.ndarray | None,
    probabilities: np.ndarray | None,
) -> tuple[float | None, float | None]:
    """The window's estimate (corrected with the last drift test's MMD^2 where the estimator has a
    correction; a test lags the window by ``drift_every`` images or ``drift_min_interval_s``) and what the
    correction added."""
    plain = estimator.estimate(risk, confidence, probabilities)  # COTT's transport: solved once
    added = estimator.correction_added(plain, probabilities, None if drift is None else drift.mmd2)
    return (plain, None) if added is None else (plain + added, added)  # type: ignore[operator]
