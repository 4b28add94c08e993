"""The last N scored images of one served model: a bounded ring buffer (issue 15, item 6).

Preallocated numpy arrays, written in place: an append of B images is a few vectorised slice
assignments (at ``(next + arange(B)) % N`` when it wraps), whatever N; memory is ``N * (r + 11 + C)`` float32
values for the model's whole life (``C``: the head's classes, kept only where the error estimate reads
them, else 0). Unknown signals (no risk model, no head, no typicality) and image properties (a batch
recorded without its pixels) are NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.monitoring.image_properties import PROPERTIES

#: The per-image signals a window keeps, in the row order of :attr:`RingWindow.signals`.
SIGNALS = ("risk", "confidence", "atypical", "low_quality", "typicality")


@dataclass(frozen=True)
class WindowContents:
    """A copy of a window's images, oldest first: ``vectors`` (n, r) float32, the rest (n,) float32."""

    vectors: np.ndarray
    risk: np.ndarray
    confidence: np.ndarray
    atypical: np.ndarray
    low_quality: np.ndarray
    typicality: np.ndarray
    probabilities: np.ndarray | None = None  # (n, C) float32, in a window that keeps them
    properties: np.ndarray | None = None  # (len(PROPERTIES), n) float32 image properties, NaN where unknown


class RingWindow:
    """The last ``capacity`` images' L2-normalised representations (``dim`` features), signals and
    image properties (:mod:`models.monitoring.image_properties`), and with ``classes`` > 0 the
    head's class probabilities.

    Not thread-safe on its own: :class:`models.monitoring.monitor.TrafficMonitor` holds the lock.
    """

    def __init__(self, capacity: int, dim: int, classes: int = 0) -> None:
        if capacity < 1 or dim < 1 or classes < 0:
            raise ValueError(
                f"a window needs capacity >= 1, dim >= 1 and classes >= 0, got {capacity}, {dim} and {classes}"
            )
        self.capacity, self.dim, self.classes = capacity, dim, classes
        self.vectors = np.zeros((capacity, dim), dtype=np.float32)
        self.probabilities = np.zeros((capacity, classes), dtype=np.float32) if classes else None
        # one row per name of SIGNALS (atypical and low_quality as 1/0), NaN where unknown
        self.signals = np.full((len(SIGNALS), capacity), np.nan, dtype=np.float32)
        self.properties = np.full((len(PROPERTIES), capacity), np.nan, dtype=np.float32)
        self.seen = 0  # images ever appended; the next write goes to seen % capacity

    @property
    def count(self) -> int:
        """Images in the window (at most ``capacity``)."""
        return min(self.seen, self.capacity)

    def append(
        self,
        vectors: np.ndarray,
        signals: np.ndarray,
        probabilities: np.ndarray | None = None,
        properties: np.ndarray | None = None,
    ) -> None:
        """Add B images: ``vectors`` (B, dim), ``signals`` (len(SIGNALS), B) as in :attr:`signals` rows,
        ``probabilities`` (B, classes) in a window that keeps them (required there, refused elsewhere),
        and ``properties`` (len(PROPERTIES), B) when known (else NaN).

        Of a batch larger than the window only its last ``capacity`` images are kept.
        """
        b = vectors.shape[0]
        rows = len(SIGNALS)
        if vectors.shape != (b, self.dim) or signals.shape != (rows, b):
            raise ValueError(
                f"expected vectors ({b}, {self.dim}) and signals ({rows}, {b}), got {vectors.shape} and {signals.shape}"
            )
        if (probabilities is None) != (self.probabilities is None) or (
            probabilities is not None and probabilities.shape != (b, self.classes)
        ):
            got = None if probabilities is None else probabilities.shape
            raise ValueError(f"expected probabilities {(b, self.classes) if self.classes else None}, got {got}")
        if properties is None:
            properties = np.full((len(PROPERTIES), b), np.nan, dtype=np.float32)
        elif properties.shape != (len(PROPERTIES), b):
            raise ValueError(f"expected properties ({len(PROPERTIES)}, {b}), got {properties.shape}")
        skip = max(0, b - self.capacity)
        start = (self.seen + skip) % self.capacity
        end = start + b - skip
        if end <= self.capacity:  # one slice (the usual case: a batch is far smaller than the window)
            self.vectors[start:end] = vectors[skip:]
            self.signals[:, start:end] = signals[:, skip:]
            self.properties[:, start:end] = properties[:, skip:]
            if self.probabilities is not None:
                self.probabilities[start:end] = probabilities[skip:]  # type: ignore[index]
        else:
            slots = (start + np.arange(b - skip)) % self.capacity
            self.vectors[slots] = vectors[skip:]
            self.signals[:, slots] = signals[:, skip:]
            self.properties[:, slots] = properties[:, skip:]
            if self.probabilities is not None:
                self.probabilities[slots] = probabilities[skip:]  # type: ignore[index]
        self.seen += b

    def _order(self) -> np.ndarray:
        """Slots from the oldest image to the newest."""
        if self.seen <= self.capacity:
            return np.arange(self.seen)
        return (self.seen + np.arange(self.capacity)) % self.capacity

    def contents(self) -> WindowContents:
        """A copy of the window, oldest first (the drift test reads it while appends go on)."""
        order = self._order()
        signals = self.signals[:, order]
        probabilities = None if self.probabilities is None else self.probabilities[order]
        return WindowContents(
            self.vectors[order], *signals, probabilities=probabilities, properties=self.properties[:, order]
        )

    def probability_rows(self) -> np.ndarray | None:
        """A copy of the window's class probabilities (count, classes), in slot order; None where not kept."""
        return None if self.probabilities is None else self.probabilities[: self.count].copy()

    def values(self, name: str) -> np.ndarray:
        """The known values of signal ``name`` over the window (in slot order, not arrival order)."""
        row = self.signals[SIGNALS.index(name), : self.count]
        return row[~np.isnan(row)]
