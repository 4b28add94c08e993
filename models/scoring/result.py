"""One image's verdict: the one result type behind the HTTP schema, the CLI's rows and the metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureValue:
    index: int
    value: float


@dataclass(frozen=True)
class ImageScore:
    q_score: float
    low_quality: bool
    risk: float | None
    l1_norm: float
    #: None when the caller did not ask for the per-feature lists (``features=False``).
    dominant: list[FeatureValue] | None
    discriminative_active: list[FeatureValue] | None
    typicality: float | None = None
    atypical: bool | None = None
    reasons: tuple[str, ...] = ()


def reasons_of(low_quality: bool, atypical: bool | None) -> tuple[str, ...]:
    """Why an image is flagged: ``q_below_alpha`` (Q < alpha), ``atypical`` (typicality > 1)."""
    return (("q_below_alpha",) if low_quality else ()) + (("atypical",) if atypical else ())
