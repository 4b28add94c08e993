"""One image's verdict: the one result type behind the HTTP schema, the CLI's rows and the metrics.

:class:`ImageScore` is what the scorer returns. :meth:`ImageScore.row` is its JSON form, the
fields of ``/score``'s ``results`` entries and of ``qscore score --json`` lines; ``service/schemas.py``
derives the OpenAPI schema from the same fields (:data:`SCORE_FIELDS`), and the service's metrics
read the scores themselves, so the three cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple


class FeatureValue(NamedTuple):
    """One feature of a representation: its index and value. A named tuple, not a dataclass:
    a batch of 64 lists thousands, and a frozen dataclass costs five times as much to make."""

    index: int
    value: float


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class ImageScore:
    """The verdict on one image. Field metadata ``doc`` is the description the HTTP schema shows."""

    q_score: float = field(metadata=_doc("Mean of the dominant discriminative features over the L1 norm (eq. 3)."))
    low_quality: bool = field(metadata=_doc("Q-Score below the feature set's alpha."))
    risk: float | None = field(metadata=_doc("Calibrated P(mis-classified); null when uncalibrated."))
    l1_norm: float = field(metadata=_doc("L1 norm of the representation."))
    dominant: list[FeatureValue] | None = field(
        metadata=_doc("Dominant features (index, value); null unless asked for (?features=true).")
    )
    discriminative_active: list[FeatureValue] | None = field(
        metadata=_doc("Dominant discriminative features (index, value); null unless asked for (?features=true).")
    )
    typicality: float | None = field(
        default=None,
        metadata=_doc("How unlike the reference set the image is: above 1 is atypical; null without typicality."),
    )
    atypical: bool | None = field(default=None, metadata=_doc("typicality above 1; null without typicality."))
    reasons: tuple[str, ...] = field(default=(), metadata=_doc('Why flagged: "q_below_alpha", "atypical".'))
    predicted_class: str | None = field(
        default=None, metadata=_doc("The served head's class for the image; null unless asked for (?predict=true).")
    )
    confidence: float | None = field(
        default=None, metadata=_doc("The head's maximum softmax probability; null unless asked for (?predict=true).")
    )

    def row(self) -> dict[str, Any]:
        """The JSON form (plain types, in :data:`SCORE_FIELDS` order)."""
        return {
            "q_score": self.q_score,
            "low_quality": self.low_quality,
            "typicality": self.typicality,
            "atypical": self.atypical,
            "risk": self.risk,
            "reasons": list(self.reasons),
            "predicted_class": self.predicted_class,
            "confidence": self.confidence,
            "l1_norm": self.l1_norm,
            "dominant": _values(self.dominant),
            "discriminative_active": _values(self.discriminative_active),
        }


#: The JSON fields of one verdict, in the order answers list them.
SCORE_FIELDS: tuple[str, ...] = (
    "q_score",
    "low_quality",
    "typicality",
    "atypical",
    "risk",
    "reasons",
    "predicted_class",
    "confidence",
    "l1_norm",
    "dominant",
    "discriminative_active",
)
assert set(SCORE_FIELDS) == {f.name for f in fields(ImageScore)}  # internal invariant: one list of fields


def error_row(code: str, message: str) -> dict[str, Any]:
    """The JSON form of an image that could not be scored: every verdict field null."""
    return dict.fromkeys(SCORE_FIELDS) | {"error": {"code": code, "message": message}}


def reasons_of(low_quality: bool, atypical: bool | None) -> tuple[str, ...]:
    """Why an image is flagged: ``q_below_alpha`` (Q < alpha), ``atypical`` (typicality > 1)."""
    return (("q_below_alpha",) if low_quality else ()) + (("atypical",) if atypical else ())


def _values(values: list[FeatureValue] | None) -> list[dict[str, float]] | None:
    return None if values is None else [{"index": v.index, "value": v.value} for v in values]
