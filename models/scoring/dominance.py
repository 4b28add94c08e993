"""Dominance counts and the band of discriminative features (paper section 4, fig. 3; SPEC 2, 3b)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.scoring.qscore import dominant_mask

log = logging.getLogger(__name__)


#: Grid for ``eps="auto"``, largest first (SPEC section 3b).
AUTO_EPS_GRID: tuple[float, ...] = (4.0, 3.5, 3.0, 2.5, 2.0, 1.5)


AUTO_COVERAGE_TARGET = 0.9


#: alpha defaults to this percentile of the reference set's non-zero Q-Scores (SPEC section 3).
ALPHA_PERCENTILE = 10.0


REFERENCE_PERCENTILES: tuple[float, ...] = (1, 5, 10, 25, 50, 75, 90, 95, 99)


@dataclass
class DominanceCounts:
    """Per-feature dominance counts ``c_j`` for one or more values of eps.

    ``counts`` is a (G, r) int64 tensor, one row per value in ``eps``; ``n_samples`` is how many
    representations were counted, ``n_negative`` how many of their entries were negative (a
    signed representation, see :attr:`FeatureSet.signed_warning`). Two counts over disjoint
    shards add up to the counts over their union.
    """

    eps: tuple[float, ...]
    counts: torch.Tensor
    n_samples: int = 0
    n_negative: int = 0

    @classmethod
    def zeros(cls, eps: Sequence[float], r: int) -> DominanceCounts:
        eps = tuple(float(e) for e in eps)
        if not eps:
            raise ValueError("at least one eps is needed")
        return cls(eps, torch.zeros(len(eps), r, dtype=torch.int64), 0)

    @classmethod
    def of(cls, h: torch.Tensor, eps: Sequence[float]) -> DominanceCounts:
        """Counts over one batch ``h`` of shape (N, r)."""
        counts = cls.zeros(eps, h.shape[1])
        counts.update(h)
        return counts

    @property
    def r(self) -> int:
        return int(self.counts.shape[1])

    def update(self, h: torch.Tensor) -> None:
        """Add the dominance of every row of ``h`` (N, r) to the counts."""
        if h.dim() != 2 or h.shape[1] != self.r:
            raise ValueError(f"expected representations of shape (N, {self.r}), got {tuple(h.shape)}")
        for row, eps in enumerate(self.eps):
            self.counts[row] += dominant_mask(h, eps).sum(dim=0).to("cpu", torch.int64)
        self.n_samples += int(h.shape[0])
        self.n_negative += int((h < 0).sum())

    def __add__(self, other: DominanceCounts) -> DominanceCounts:
        if self.eps != other.eps or self.r != other.r:
            raise ValueError(
                f"cannot add counts over eps {self.eps} and r={self.r} to counts over eps {other.eps} and r={other.r}"
            )
        return DominanceCounts(
            self.eps, self.counts + other.counts, self.n_samples + other.n_samples, self.n_negative + other.n_negative
        )

    def for_eps(self, eps: float) -> torch.Tensor:
        """The (r,) counts for one eps of the grid."""
        try:
            return self.counts[self.eps.index(float(eps))]
        except ValueError:
            raise ValueError(f"eps {eps} was not counted; counted: {self.eps}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "eps": list(self.eps),
            "counts": self.counts.tolist(),
            "n_samples": self.n_samples,
            "n_negative": self.n_negative,
        }

    @property
    def negative_share(self) -> float | None:
        """Share of negative entries among all counted entries of ``h``."""
        total = self.n_samples * self.r
        return self.n_negative / total if total else None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DominanceCounts:
        return cls(
            tuple(float(e) for e in data["eps"]),
            torch.tensor(data["counts"], dtype=torch.int64),
            int(data["n_samples"]),
            int(data.get("n_negative", 0)),
        )


def select_discriminative(
    counts: torch.Tensor,
    lo: float = 0.25,
    hi: float = 0.75,
    size: int | None = None,
) -> torch.Tensor:
    """The discriminative band ``D`` from per-feature counts (SPEC section 2).

    ``counts``: (r,) dominance counts. Features never dominant are never selected. The others
    are sorted by count, ascending (ties by index), and either the rank-quantile band
    ``[lo, hi)`` is kept or, when ``size`` is given, ``size`` features centred on the middle.
    Returns the sorted (|D|,) int64 indices.
    """
    counts = torch.as_tensor(counts)
    if counts.dim() != 1:
        raise ValueError(f"counts must be a 1-D tensor, got shape {tuple(counts.shape)}")
    ever = torch.nonzero(counts > 0).flatten()
    m = int(ever.numel())
    # Stable sort on count keeps ties in index order, so the band is deterministic.
    order = ever[torch.sort(counts[ever], stable=True).indices]
    if size is not None:
        if not 0 < size <= m:
            raise ValueError(f"size must be between 1 and the {m} features dominant at least once, got {size}")
        start = (m - size) // 2
        chosen = order[start : start + size]
    else:
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"the band needs 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
        chosen = order[math.floor(lo * m) : math.floor(hi * m)]
    return torch.sort(chosen).values


def percentiles(values: np.ndarray, qs: Sequence[float] = REFERENCE_PERCENTILES) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {f"p{q:g}": float(np.percentile(values, q)) for q in qs}


def default_alpha(q_scores: np.ndarray) -> float:
    """The 10th percentile of the non-zero reference Q-Scores (SPEC section 3).

    With no non-zero score at all, nothing separates samples: alpha is 1, so every sample
    (each has Q < 1) is flagged rather than none.
    """
    nonzero = q_scores[q_scores > 0]
    if nonzero.size == 0:
        return 1.0
    return float(np.percentile(nonzero, ALPHA_PERCENTILE))


def choose_auto_eps(coverages: dict[float, float], target: float = AUTO_COVERAGE_TARGET) -> float:
    """The largest eps whose coverage reaches ``target``; the best-covered eps otherwise."""
    reaching = [eps for eps, cov in coverages.items() if cov >= target]
    if reaching:
        return max(reaching)
    best = max(coverages, key=lambda eps: (coverages[eps], eps))
    log.warning("no eps of %s reaches coverage %.0f%%; using eps=%g", sorted(coverages), target * 100, best)
    return best
