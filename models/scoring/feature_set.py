"""Discriminative features (paper section 4, fig. 3; SPEC sections 2, 3 and 3b).

Three steps, each usable on its own:
1. :class:`DominanceCounts` counts, per feature, how many samples it is dominant for. Counts
   add up across shards, so discovery streams over data in ``O(r)`` memory.
2. :func:`select_discriminative` keeps the middle band of features sorted by count.
3. :class:`FeatureSet` is the artifact: counts, the selected indices, the reference Q-Score
   statistics, alpha, coverage and where it all came from.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from models.monitoring.image_properties import PROPERTIES
from models.scoring.bank import ReferenceBank
from models.scoring.dominance import ALPHA_PERCENTILE
from models.scoring.error_estimate import ErrorEstimator
from models.scoring.probe import Head, HeadInfo, check_head, head_path, load_head
from models.scoring.risk import RiskModel
from models.scoring.typicality import TypicalityModel
from models.storage.atomic import write_json_atomic

log = logging.getLogger(__name__)


#: Below this coverage most Q-Scores are ties at 0 and the score ranks little (SPEC 3b).
LOW_COVERAGE = 0.5


#: Above this share of negative entries in ``h`` the Q-Score's assumptions do not hold (issue 9).
SIGNED_SHARE = 0.05


FEATURE_SET_FORMAT = "qscore.feature_set/v1"


class Preprocessing(BaseModel):
    """How images were fed to the encoder: resize and centre-crop to ``image_size``, normalise."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, spec: Any) -> Preprocessing:
        """The preprocessing of an :class:`models.encoders.spec.EncoderSpec`."""
        return cls(image_size=spec.image_size, mean=spec.mean, std=spec.std)


class EncoderRef(BaseModel):
    fingerprint: str
    arch: str
    feature_dim: int = Field(gt=0)
    model_version: str | None = None
    #: Recorded by discovery: the same tensors fed otherwise give other representations, which
    #: the fingerprint (tensors only) cannot tell apart. None in feature sets made before it.
    preprocessing: Preprocessing | None = None


class DataProvenance(BaseModel):
    dataset: str
    n_available: int
    n_reference: int
    sampling: str
    seed: int | None = None


class Selection(BaseModel):
    method: Literal["quantile_band", "size"]
    lo: float | None = None
    hi: float | None = None
    size: int | None = None


def bank_path(feature_set_path: str | Path) -> Path:
    """Where a feature set's reference bank lives: ``x.json`` -> ``x.bank.safetensors``."""
    return Path(feature_set_path).with_suffix(".bank.safetensors")


class RiskCurve(BaseModel):
    """The older risk of feature sets before issue 10: P(mis-classified | Q), read only.

    A feature set that still carries one gets it converted to an equivalent :class:`RiskModel`
    on ``q_score`` when loaded, so there is one notion of risk.
    """

    q: list[float]
    risk: list[float]
    source: str

    @model_validator(mode="after")
    def _same_length(self) -> RiskCurve:
        if len(self.q) != len(self.risk) or not self.q:
            raise ValueError("a risk curve needs as many (non-zero) q points as risk points")
        return self


class FeatureSet(BaseModel):
    """A discriminative feature set and everything needed to score with it."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["qscore.feature_set/v1"] = FEATURE_SET_FORMAT
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    encoder: EncoderRef
    eps: float
    eps_mode: Literal["fixed", "auto"] = "fixed"
    coverage_by_eps: dict[str, float] = Field(default_factory=dict)
    selection: Selection
    counts: list[int]
    discriminative: list[int]
    coverage: float = Field(ge=0.0, le=1.0)
    reference_q_percentiles: dict[str, float]
    reference_q_nonzero_percentiles: dict[str, float]
    alpha: float = Field(gt=0.0)
    alpha_source: str = f"p{ALPHA_PERCENTILE:g} of the reference set's non-zero Q-Scores"
    risk_curve: RiskCurve | None = Field(default=None, description="read only: converted to risk_model on load")
    risk_model: RiskModel | None = None
    typicality: TypicalityModel | None = None
    data: DataProvenance
    negative_share: float | None = Field(
        None, ge=0.0, le=1.0, description="Share of negative entries of h over the reference sample."
    )
    head: HeadInfo | None = Field(None, description="The classifier head served beside it (weights beside the JSON).")
    error_estimator: ErrorEstimator | None = Field(
        None, description="How the error rate of recent traffic is estimated (GET /monitor)."
    )
    held_out_image_properties: dict[str, list[float]] | None = Field(
        None,
        description="Image properties of the evaluation's held-out images, each sorted: the drift test's "
        "reference for the inputs (models/monitoring/image_properties.py).",
    )
    _bank: ReferenceBank | None = PrivateAttr(default=None)
    _bank_file: Path | None = PrivateAttr(default=None)  # loaded on first use (listings stay cheap)
    _head: Head | None = PrivateAttr(default=None)
    _head_file: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_notion_of_risk(self) -> FeatureSet:
        if self.risk_curve is not None:
            if self.risk_model is None:
                curve = self.risk_curve
                self.risk_model = RiskModel.from_q_curve(curve.q, curve.risk, curve.source)
            self.risk_curve = None
        return self

    @field_validator("held_out_image_properties")
    @classmethod
    def _known_properties(cls, value: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
        for name, values in (value or {}).items():
            if name not in PROPERTIES:
                raise ValueError(f"unknown image property {name!r}; known: {list(PROPERTIES)}")
            if len(values) < 2 or not np.isfinite(values).all():
                raise ValueError(f"image property {name!r} needs at least 2 finite held-out values")
        return value

    @field_validator("discriminative")
    @classmethod
    def _sorted_unique(cls, value: list[int]) -> list[int]:
        if value != sorted(set(value)):
            raise ValueError("discriminative indices must be sorted and unique")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSet:
        r = self.encoder.feature_dim
        if len(self.counts) != r:
            raise ValueError(f"{len(self.counts)} counts for an encoder of {r} features")
        if self.discriminative and not 0 <= self.discriminative[0] <= self.discriminative[-1] < r:
            raise ValueError(f"discriminative indices must lie in [0, {r})")
        return self

    @property
    def discriminative_indices(self) -> torch.Tensor:
        return torch.tensor(self.discriminative, dtype=torch.int64)

    @property
    def reference_median(self) -> float | None:
        return self.reference_q_percentiles.get("p50")

    @property
    def coverage_warning(self) -> str | None:
        if self.coverage >= LOW_COVERAGE:
            return None
        return (
            f"LOW COVERAGE: only {self.coverage:.0%} of reference samples have a dominant "
            f"discriminative feature at eps={self.eps:g}; the other samples all score Q=0, so "
            "Q-Scores are mostly ties and rank little. Rediscover with a lower eps or eps='auto'."
        )

    @property
    def selection_warning(self) -> str | None:
        """Set when a selection by size got fewer features than asked for (only so many ever dominate)."""
        asked = self.selection.size if self.selection.method == "size" else None
        if asked is None or len(self.discriminative) >= asked:
            return None
        return (
            f"SELECTION: {asked} features asked for, only {len(self.discriminative)} are dominant for any "
            f"reference sample at eps={self.eps:g}: D holds those {len(self.discriminative)}."
        )

    @property
    def signed_warning(self) -> str | None:
        """Set when ``h`` is signed, e.g. ViT pre-logits (no ReLU): the Q-Score assumes it is not."""
        if self.negative_share is None or self.negative_share <= SIGNED_SHARE:
            return None
        return (
            f"SIGNED REPRESENTATION: {self.negative_share:.0%} of the entries of h are negative (an encoder "
            "without a final ReLU, such as ViT pre-logits). The Q-Score assumes a mostly non-negative, "
            "sparse h: its L1 norm here also counts the negative entries, which are no evidence for any "
            "feature, and dominance (h_j > mu + eps*sigma) ignores strongly negative features. Q-Scores of "
            "this encoder rank images only roughly and are not comparable with those of ReLU encoders."
        )

    @property
    def bank(self) -> ReferenceBank | None:
        """The reference bank (CPU) when typicality uses one; read from beside the JSON on first use."""
        if self._bank is None and self._bank_file is not None:
            bank = ReferenceBank.load(self._bank_file)
            expected = (self.typicality.n_bank if self.typicality else 0, self.encoder.feature_dim)
            if (bank.size, bank.dim) != expected:
                raise ValueError(
                    f"{self._bank_file} holds {bank.size} x {bank.dim} vectors; the feature set expects "
                    f"{expected[0]} x {expected[1]}"
                )
            self._bank = bank
        return self._bank

    def with_typicality(self, model: TypicalityModel, bank: ReferenceBank | None) -> FeatureSet:
        """A copy carrying ``model`` and its ``bank`` (saved beside the JSON)."""
        if model.needs_bank and (bank is None or bank.size != model.n_bank):
            raise ValueError("the typicality model needs its own bank")
        if bank is not None and bank.dim != self.encoder.feature_dim:
            raise ValueError(f"a bank of {bank.dim} features for an encoder of {self.encoder.feature_dim}")
        copy = self.model_copy(update={"typicality": model})
        copy._bank, copy._bank_file = bank, None
        return copy

    @property
    def classifier(self) -> Head | None:
        """The classifier head (CPU), when the feature set records one; read on first use."""
        if self._head is None and self._head_file is not None and self.head is not None:
            head = load_head(self._head_file, self.head)
            check_head(head, self.encoder.feature_dim)
            self._head = head
        return self._head

    def with_head(self, head: Head, info: HeadInfo) -> FeatureSet:
        """A copy carrying ``head`` (saved beside the JSON), checked against the encoder's dimension."""
        if head.kind != info.kind or head.classes != info.classes:
            raise ValueError(
                f"the head is a {head.kind} head over {head.classes}; its record says {info.kind} over {info.classes}"
            )
        check_head(head, self.encoder.feature_dim)
        copy = self.model_copy(update={"head": info})
        copy._bank, copy._bank_file = self._bank, self._bank_file
        copy._head, copy._head_file = head, None
        return copy

    @property
    def calibrated(self) -> bool:
        return self.risk_model is not None

    def risk(self, signals: dict[str, np.ndarray]) -> np.ndarray | None:
        """Calibrated P(mis-classified) per image from its label-free signals; None when uncalibrated.

        A risk model whose signals are not all available (e.g. typicality without a bank)
        gives None rather than a number it cannot stand behind.
        """
        if self.risk_model is None or not set(self.risk_model.signals) <= set(signals):
            return None
        return self.risk_model.predict(signals)

    def save(self, path: str | Path) -> None:
        """Write the JSON and, when there are, the bank and the head beside it (each atomically, JSON last)."""
        if self.bank is not None:
            self.bank.save(bank_path(path))
        if self.head is not None and self.classifier is not None:
            self.classifier.save(head_path(path, self.head.kind))
        write_json_atomic(path, self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        """Read the JSON; its bank (``x.bank.safetensors``) is read on first use of :attr:`bank`."""
        fs = cls.model_validate_json(Path(path).read_text())
        if fs.typicality is not None and fs.typicality.needs_bank:
            if not bank_path(path).is_file():
                raise FileNotFoundError(f"the feature set's reference bank is missing: {bank_path(path)}")
            fs._bank_file = bank_path(path)
        if fs.head is not None:
            if not head_path(path, fs.head.kind).is_file():
                raise FileNotFoundError(f"the feature set's head is missing: {head_path(path, fs.head.kind)}")
            fs._head_file = head_path(path, fs.head.kind)
        return fs
