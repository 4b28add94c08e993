"""The Q-Score of one image taken apart (paper eq. 3, figures 5 and 6).

``Q_i = sum_{j in L_i ∩ D} h_ij / (|L_i ∩ D| * ||h_i||_1)``: the numerator is the sum of the
image's dominant discriminative features, so each of them gets its *share* of it; the
denominator's L1 norm splits into the mass on ``D`` and the *noisy* mass outside it (features
of the upper tail, dominant for a large share of the reference: texture, colour; of the lower
tail, dominant for almost nobody; and those never dominant). The paper's figures 5 and 6 show
that mis-classified images have weak discriminative and strong noisy features: this is the
per-image account of both.

Feature groups come from the feature set alone (its per-feature dominance counts and ``D``),
as discovery drew them (SPEC section 2): the features dominant at least once, sorted by count
(ties by index), are cut into the lower tail, the band ``D`` and the upper tail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from models.scoring.qscore import DEFAULT_EPS, discriminative_mask, q_score_parts

Group = Literal["discriminative", "upper_tail", "lower_tail", "never_dominant"]
GROUPS: tuple[Group, ...] = ("discriminative", "upper_tail", "lower_tail", "never_dominant")


def feature_groups(counts: Sequence[int] | np.ndarray | torch.Tensor, discriminative: Sequence[int]) -> np.ndarray:
    """The group of every feature, an (r,) array of :data:`GROUPS` names.

    ``counts``: (r,) dominance counts of the reference set (a feature set's ``counts``);
    ``discriminative``: the indices of ``D``. A feature outside ``D`` that is dominant at least
    once is in the lower tail when it comes before ``D``'s first member in discovery's order
    (count ascending, ties by index), else in the upper tail.
    """
    counts = np.asarray(torch.as_tensor(counts).cpu().numpy(), dtype=np.int64)
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-D (one per feature), got shape {counts.shape}")
    r = counts.shape[0]
    d = np.asarray(list(discriminative), dtype=np.int64)
    if d.size and (d.min() < 0 or d.max() >= r):
        raise ValueError(f"discriminative indices must lie in [0, {r}), got min {d.min()} and max {d.max()}")
    groups = np.full(r, "never_dominant", dtype=object)
    ever = np.flatnonzero(counts > 0)
    # discovery's order: stable sort by count, so ties keep index order (dominance.select_discriminative)
    order = ever[np.argsort(counts[ever], kind="stable")]
    position = np.full(r, -1, dtype=np.int64)
    position[order] = np.arange(order.size)
    in_d = np.zeros(r, dtype=bool)
    in_d[d] = True
    first = int(position[d].min()) if d.size else order.size
    for j in order:
        if in_d[j]:
            groups[j] = "discriminative"
        else:
            groups[j] = "lower_tail" if position[j] < first else "upper_tail"
    return groups


@dataclass(frozen=True)
class Contribution:
    """One feature of an image: its value ``h_j``, its group and, for a dominant discriminative
    feature, its share of eq. 3's numerator (the shares of an image sum to 1)."""

    index: int
    value: float
    group: Group
    dominant: bool
    share: float | None = None

    def row(self) -> dict[str, object]:
        return {
            "index": self.index,
            "value": self.value,
            "group": self.group,
            "dominant": self.dominant,
            "share": self.share,
        }


@dataclass(frozen=True)
class Decomposition:
    """The pieces of one image's Q-Score (eq. 3).

    ``q_score = numerator / (len(active) * l1_norm)`` (0 without active features);
    ``l1_norm = discriminative_mass + noisy_mass``; ``active``: the dominant discriminative
    features, strongest first; ``noisy_dominant``: the dominant features outside ``D``,
    strongest first (figures 5 and 6: strong noisy features go with mis-classification).
    """

    q_score: float
    numerator: float
    mean_active: float
    l1_norm: float
    discriminative_mass: float
    noisy_mass: float
    active: tuple[Contribution, ...]
    noisy_dominant: tuple[Contribution, ...]
    noisy_mass_by_group: dict[str, float]

    @property
    def noisy_share(self) -> float:
        """Share of the L1 norm outside ``D`` (0 for an all-zero representation)."""
        return self.noisy_mass / self.l1_norm if self.l1_norm > 0 else 0.0

    def row(self) -> dict[str, object]:
        """The JSON form (``/explain``'s ``decomposition``, ``qscore explain``'s report)."""
        return {
            "q_score": self.q_score,
            "numerator": self.numerator,
            "n_active": len(self.active),
            "mean_active": self.mean_active,
            "l1_norm": self.l1_norm,
            "discriminative_mass": self.discriminative_mass,
            "noisy_mass": self.noisy_mass,
            "noisy_share": self.noisy_share,
            "noisy_mass_by_group": dict(self.noisy_mass_by_group),
            "active": [c.row() for c in self.active],
            "noisy_dominant": [c.row() for c in self.noisy_dominant],
        }


def decompose(
    h: torch.Tensor,
    discriminative: torch.Tensor | Sequence[int],
    groups: np.ndarray,
    eps: float = DEFAULT_EPS,
) -> list[Decomposition]:
    """One :class:`Decomposition` per row of ``h`` (N, r), with ``D`` and ``eps`` of a feature set.

    ``groups``: (r,) from :func:`feature_groups`. The Q-Score is :func:`q_score_parts`'s, so it is
    the number ``/score`` gives for the same representation.
    """
    if h.dim() != 2:
        raise ValueError(f"h must have shape (N, r), got {tuple(h.shape)}")
    r = h.shape[1]
    if groups.shape != (r,):
        raise ValueError(f"groups must have shape ({r},), got {groups.shape}")
    h = h.detach().float()
    d_mask = discriminative_mask(torch.as_tensor(discriminative), r).to(h.device)
    parts = q_score_parts(h, d_mask, eps)
    values = h.cpu().numpy().astype(np.float64)
    dominant = parts.dominant.cpu().numpy()
    active = parts.active.cpu().numpy()
    in_d = d_mask.cpu().numpy()
    out = []
    for i in range(h.shape[0]):
        v, absv = values[i], np.abs(values[i])
        act = np.flatnonzero(active[i])
        numerator = float(v[act].sum())
        act = act[np.argsort(-v[act], kind="stable")]
        noisy = np.flatnonzero(dominant[i] & ~in_d)
        noisy = noisy[np.argsort(-v[noisy], kind="stable")]
        by_group = {g: float(absv[(groups == g) & ~in_d].sum()) for g in GROUPS if g != "discriminative"}
        out.append(
            Decomposition(
                q_score=float(parts.q_score[i]),
                numerator=numerator,
                mean_active=float(parts.mean_active[i]),
                l1_norm=float(parts.l1_norm[i]),
                discriminative_mass=float(absv[in_d].sum()),
                noisy_mass=float(absv[~in_d].sum()),
                active=tuple(
                    Contribution(int(j), float(v[j]), "discriminative", True, _share(v[j], numerator)) for j in act
                ),
                noisy_dominant=tuple(Contribution(int(j), float(v[j]), groups[j], True) for j in noisy),
                noisy_mass_by_group=by_group,
            )
        )
    return out


def ranked_features(decomposition: Decomposition, h: np.ndarray, groups: np.ndarray, top: int) -> list[Contribution]:
    """The ``top`` features of one image to explain with heatmaps, in this order: its dominant
    discriminative features (the ones its Q-Score is made of), then its other dominant features
    (the noisy ones), then the rest, each by value, strongest first."""
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    chosen = list(decomposition.active) + list(decomposition.noisy_dominant)
    if len(chosen) < top:
        taken = {c.index for c in chosen}
        rest = [int(j) for j in np.argsort(-h, kind="stable") if int(j) not in taken]
        chosen += [Contribution(j, float(h[j]), groups[j], False) for j in rest[: top - len(chosen)]]
    return chosen[:top]


def _share(value: float, numerator: float) -> float:
    return float(value / numerator) if numerator != 0 else 0.0
