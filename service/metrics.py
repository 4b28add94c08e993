"""Prometheus metrics of one app instance (its own CollectorRegistry, so tests can run several).

Counters and histograms carry ``model_version`` and ``feature_set_version`` labels. Gauges that
describe the served pair (coverage, reference median, expected low-quality share) and the queue
are read at scrape time, so a switch leaves no stale series behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from models.monitoring.monitor import ModelSnapshot
from models.scoring.feature_set import FeatureSet
from models.scoring.result import ImageScore

#: Q-Scores are ratios to the L1 norm of hundreds of features: small numbers. The buckets are
#: 0 (no discriminative evidence) and 8 per decade from 1e-4 to 1, so histogram_quantile can
#: estimate the live median within about 15%.
Q_BUCKETS: tuple[float, ...] = (0.0,) + tuple(round(10 ** (-4 + i / 8), 8) for i in range(33))
#: Typicality is 1 at the reference's 99th percentile; fine buckets around it, coarse far out.
TYPICALITY_BUCKETS: tuple[float, ...] = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 100.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
QUEUE_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
PAIR = ("model_version", "feature_set_version")


def batch_buckets(max_batch_size: int) -> tuple[float, ...]:
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(float(b))
        b *= 2
    return tuple(sizes) + (float(max_batch_size),)


def expected_low_quality_share(fs: FeatureSet) -> float:
    """Share of the reference set below alpha, read off its stored Q percentiles (a lower bound)."""
    below = [float(k[1:]) for k, v in fs.reference_q_percentiles.items() if v < fs.alpha]
    return max(below, default=0.0) / 100.0


class Metrics:
    def __init__(self, max_batch_size: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.images_scored = Counter("qscore_images_scored", "Images scored.", PAIR, registry=r)
        self.low_quality = Counter("qscore_low_quality_images", "Images with Q-Score below alpha.", PAIR, registry=r)
        self.q_score = Histogram("qscore_q_score", "Q-Scores of scored images.", PAIR, buckets=Q_BUCKETS, registry=r)
        self.atypical = Counter(
            "qscore_atypical_images", "Images with typicality above 1 (unlike the reference).", PAIR, registry=r
        )
        self.typicality = Histogram(
            "qscore_typicality",
            "Typicality of scored images (1 = the reference's 99th percentile).",
            PAIR,
            buckets=TYPICALITY_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "qscore_request_duration_seconds",
            "Duration of /score requests, from first byte to answer.",
            ("model_version", "status"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.explain_duration = Histogram(
            "qscore_explain_duration_seconds",
            "Duration of /explain requests (one image), from first byte to answer.",
            ("model_version",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "qscore_batch_size",
            "Images per encoder batch.",
            ("model_version",),
            buckets=batch_buckets(max_batch_size),
            registry=r,
        )
        self.queue_wait = Histogram(
            "qscore_queue_wait_seconds",
            "Time an image waits before its batch runs.",
            ("model_version",),
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "qscore_inference_seconds",
            "Encoder and scoring time per batch.",
            ("model_version",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "qscore_errors",
            "Errors, by code (per file or per request).",
            ("model_version", "code"),
            registry=r,
        )

    def attach(self, served: Callable[[], ServedPair | None], queue: Callable[[], QueueLevel]) -> None:
        """Gauges read at scrape time: the served pair (``served()``) and the queue (``queue()``)."""
        self.registry.register(_LiveCollector(served, queue))

    def attach_monitor(self, snapshots: Callable[[], list[ModelSnapshot]]) -> None:
        """Gauges of the traffic monitor's windows (``snapshots()``), read at scrape time."""
        self.registry.register(_MonitorCollector(snapshots))

    def error(self, model_version: str | None, code: str, n: int = 1) -> None:
        self.errors.labels(model_version or "none", code).inc(n)

    def observe_scores(self, model_version: str, feature_set_version: str, scores: Sequence[ImageScore]) -> None:
        """The verdicts of one request: counts, the Q-Score and typicality histograms."""
        if not scores:
            return
        pair = (model_version, feature_set_version)
        self.images_scored.labels(*pair).inc(len(scores))
        low = sum(1 for s in scores if s.low_quality)
        if low:
            self.low_quality.labels(*pair).inc(low)
        hist = self.q_score.labels(*pair)
        for s in scores:
            hist.observe(s.q_score)
        typical = [s.typicality for s in scores if s.typicality is not None]
        if typical:
            typicality_hist = self.typicality.labels(*pair)
            for t in typical:
                typicality_hist.observe(t)
            atypical = sum(1 for s in scores if s.atypical)
            if atypical:
                self.atypical.labels(*pair).inc(atypical)

    def observe_batch(self, model_version: str, seconds: float, waits: list[float]) -> None:
        """One encoder batch: its size, its duration and how long each of its images waited."""
        self.batch_size.labels(model_version).observe(len(waits))
        self.inference_duration.labels(model_version).observe(seconds)
        wait = self.queue_wait.labels(model_version)
        for w in waits:
            wait.observe(w)


class ServedPair(Protocol):
    """What the gauges read of the served pair (service.state.ServingState has it)."""

    model_version: str
    feature_set_version: str
    feature_set: FeatureSet

    @property
    def serving_labels(self) -> tuple[str, str, str]:
        """(fingerprint prefix, device, precision)."""
        ...


@dataclass(frozen=True)
class QueueLevel:
    depth: int
    capacity: int


class _LiveCollector(Collector):
    def __init__(self, served: Callable[[], ServedPair | None], queue: Callable[[], QueueLevel]) -> None:
        self._served, self._queue = served, queue

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state, queue = self._served(), self._queue()
        version = state.model_version if state is not None else "none"
        depth = GaugeMetricFamily("qscore_queue_depth", "Images waiting for the encoder.", labels=["model_version"])
        depth.add_metric([version], queue.depth)
        capacity = GaugeMetricFamily(
            "qscore_queue_capacity",
            "Images the queue holds before answering 503.",
            labels=["model_version"],
        )
        capacity.add_metric([version], queue.capacity)
        yield depth
        yield capacity
        if state is None:
            return
        pair = [state.model_version, state.feature_set_version]
        fs = state.feature_set
        info = GaugeMetricFamily(
            "qscore_serving_info",
            "The served pair (value 1).",
            labels=[*PAIR, "fingerprint", "device", "precision"],
        )
        info.add_metric([*pair, *state.serving_labels], 1)
        yield info
        for name, doc, value in (
            ("qscore_feature_set_coverage", "Share of reference samples with Q > 0.", fs.coverage),
            ("qscore_alpha", "Low-quality threshold of the served feature set.", fs.alpha),
            (
                "qscore_reference_q_median",
                "Median Q-Score of the feature set's reference set.",
                fs.reference_median,
            ),
            (
                "qscore_expected_low_quality_ratio",
                "Share of the reference set below alpha.",
                expected_low_quality_share(fs),
            ),
            (
                "qscore_expected_atypical_ratio",
                "Share of the reference set above the typicality threshold.",
                None if fs.typicality is None else fs.typicality.reference_atypical_share,
            ),
            (
                "qscore_reference_bank_bytes",
                "Memory of the reference bank on the serving device.",
                state.scorer.bank_bytes,
            ),
            (
                "qscore_reference_bank_vectors",
                "Reference representations in the bank.",
                0 if state.scorer.bank is None else state.scorer.bank.size,
            ),
        ):
            if value is None:
                continue
            family = GaugeMetricFamily(name, doc, labels=list(PAIR))
            family.add_metric(pair, float(value))
            yield family


#: The traffic monitor's gauges: (name, help, the snapshot's field).
MONITOR_GAUGES = (
    (
        "qscore_estimated_error_ratio",
        "Estimated error rate of the head over the window of recent images (GET /monitor).",
        "estimated_error",
    ),
    (
        "qscore_reference_error_ratio",
        "Error rate of the head on the feature set's labelled held-out sample.",
        "reference_error",
    ),
    (
        "qscore_drift_p_value",
        "p-value of the drift test of the window against the reference (MMD of the representations, with the "
        "typicality and image property tests where the feature set has their held-out values).",
        "drift_p_value",
    ),
    ("qscore_monitor_window_images", "Images in the monitor's window.", "count"),
    ("qscore_window_atypical_ratio", "Share of atypical images in the monitor's window.", "atypical_share"),
)


class _MonitorCollector(Collector):
    def __init__(self, snapshots: Callable[[], list[ModelSnapshot]]) -> None:
        self._snapshots = snapshots

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshots = self._snapshots()
        for name, doc, field in MONITOR_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=list(PAIR))
            for snap in snapshots:
                value = getattr(snap, field)
                if value is not None:
                    family.add_metric([snap.model_version, snap.feature_set_version], float(value))
            if family.samples:
                yield family
        # which input property moved: one series per image property the last drift test compared
        family = GaugeMetricFamily(
            "qscore_drift_property_p_value",
            "Kolmogorov-Smirnov p-value of one image property of the window against the evaluation's held-out "
            "images, at the last drift test (not adjusted for the six properties).",
            labels=[*PAIR, "property"],
        )
        for snap in snapshots:
            for prop, value in (snap.drift_property_p_values or {}).items():
                family.add_metric([snap.model_version, snap.feature_set_version, prop], float(value))
        if family.samples:
            yield family
