"""Request and response models of the HTTP API: what /openapi.json documents."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model

from models.registry.versions import VERSION_PATTERN, ModelRecord
from models.scoring.error_estimate import COTT_MIN_IMAGES
from models.scoring.feature_set import FeatureSet
from models.scoring.result import SCORE_FIELDS, ImageScore

VERSION_REGEX = VERSION_PATTERN.pattern


class ErrorBody(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. too_many_files.")
    message: str = Field(description="What went wrong and how to fix it.")
    limit: int | None = Field(None, description="The limit that was exceeded, when one was.")
    errors: list[dict[str, Any]] | None = Field(None, description="Field errors of a 422 validation failure.")


class ErrorResponse(BaseModel):
    """Every error answer of the service: ``{"detail": {"code": ..., "message": ...}}``."""

    detail: ErrorBody


class ModelInfo(BaseModel):
    version: str
    fingerprint: str
    arch: str
    feature_dim: int
    image_size: int
    created_at: str
    parent: str | None = None

    @classmethod
    def of(cls, record: ModelRecord) -> ModelInfo:
        return cls(
            version=record.version,
            fingerprint=record.fingerprint,
            arch=record.spec.arch,
            feature_dim=record.spec.feature_dim,
            image_size=record.spec.image_size,
            created_at=record.created_at,
            parent=record.parent,
        )


class FeatureSetInfo(BaseModel):
    version: str
    encoder_fingerprint: str
    eps: float
    alpha: float
    coverage: float = Field(description="Share of reference samples with a dominant discriminative feature.")
    coverage_warning: str | None = None
    selection_warning: str | None = Field(
        None, description="Set when a selection by size got fewer features than asked for."
    )
    n_discriminative: int
    reference_median: float | None = Field(None, description="Median Q-Score of the reference set.")
    calibrated: bool = Field(description="Whether an evaluation fitted the calibrated risk model.")
    risk_signals: list[str] | None = Field(None, description="Label-free signals the risk model uses.")
    typicality_threshold: float | None = Field(
        None,
        description="The reference's 99th percentile of the raw combined typicality score (the largest component). "
        "Each image's typicality is its raw score over this, so atypical means typicality > 1.",
    )
    reference_atypical_share: float | None = Field(None, description="Share of the reference above the threshold.")
    bank_vectors: int | None = Field(None, description="Reference representations in the bank.")
    created_at: str
    negative_share: float | None = Field(None, description="Share of negative entries of h on the reference set.")
    signed_warning: str | None = Field(None, description="Set when h is signed and Q-Scores mean less.")

    @classmethod
    def of(cls, version: str, fs: FeatureSet) -> FeatureSetInfo:
        return cls(
            version=version,
            encoder_fingerprint=fs.encoder.fingerprint,
            eps=fs.eps,
            alpha=fs.alpha,
            coverage=fs.coverage,
            coverage_warning=fs.coverage_warning,
            selection_warning=fs.selection_warning,
            n_discriminative=len(fs.discriminative),
            reference_median=fs.reference_median,
            calibrated=fs.calibrated,
            risk_signals=None if fs.risk_model is None else fs.risk_model.signals,
            typicality_threshold=None if fs.typicality is None else fs.typicality.threshold,
            reference_atypical_share=None if fs.typicality is None else fs.typicality.reference_atypical_share,
            bank_vectors=None if fs.typicality is None else fs.typicality.n_bank,
            created_at=fs.created_at,
            negative_share=fs.negative_share,
            signed_warning=fs.signed_warning,
        )


class FeatureValueOut(BaseModel):
    index: int
    value: float


#: JSON types of the verdict fields whose Python types are not JSON's (tuples, dataclasses).
_JSON_TYPES: dict[str, Any] = {
    "reasons": list[str],
    "dominant": list[FeatureValueOut],
    "discriminative_active": list[FeatureValueOut],
}


def _verdict_fields() -> dict[str, Any]:
    """The fields of :class:`ImageScore` as nullable response fields (null on an ``error`` entry)."""
    hints = get_type_hints(ImageScore)
    docs = {f.name: f.metadata["doc"] for f in dataclasses.fields(ImageScore)}
    return {
        name: (_JSON_TYPES.get(name, hints[name]) | None, Field(None, description=docs[name])) for name in SCORE_FIELDS
    }


#: One uploaded file: its verdict (the fields of :class:`ImageScore`, see ``ImageScore.row``), or
#: ``error`` when it is not a usable image.
ScoreResult = create_model(
    "ScoreResult",
    __doc__="One uploaded file: its scores, or ``error`` when it is not a usable image.",
    filename=(str, ...),
    **_verdict_fields(),
    error=(ErrorBody | None, None),
)


class ScoreResponse(BaseModel):
    model: ModelInfo
    feature_set: FeatureSetInfo
    results: list[ScoreResult]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    model_version: str | None = None
    feature_set_version: str | None = None
    queue_depth: int
    queue_capacity: int
    reason: str | None = None


class ServingInfo(BaseModel):
    model: ModelInfo
    feature_set: FeatureSetInfo
    loaded_at: str
    device: str
    precision: str
    runtime: str = Field("torch", description="What runs the encoder: torch or onnxruntime (QSCORE_RUNTIME).")
    providers: list[str] = Field(
        default_factory=list, description="ONNX Runtime's execution providers in use, best first (empty for torch)."
    )
    bank_bytes: int = Field(0, description="Memory of the reference bank on the serving device.")
    signal_graph: bool = Field(
        False,
        description="The scorer's arithmetic after the forward pass (Q-Score, typicality signals, k-NN, head) runs "
        "as one ONNX Runtime session (onnxruntime on the CPU, where it traces and matches torch).",
    )


class ActiveInfo(BaseModel):
    serving: ServingInfo
    registry_active: dict[str, str] | None = Field(None, description="The registry's active pair on disk.")
    auto_switch: bool


class SwitchRequest(BaseModel):
    model: str = Field(pattern=VERSION_REGEX, max_length=80)
    feature_set: str = Field(pattern=VERSION_REGEX, max_length=80)
    persist: bool = Field(True, description="Also make this pair the registry's active pair.")


# -- the traffic monitor (GET /monitor) -----------------------------------------------------
class ModelMonitor(BaseModel):
    """The window of one served model's recent images (fields of ``models.monitoring.ModelSnapshot``)."""

    model_config = ConfigDict(extra="forbid")

    model_version: str
    feature_set_version: str
    window_size: int = Field(ge=1, description="Images the window holds when full (QSCORE_MONITOR_WINDOW).")
    count: int = Field(ge=0, description="Images in the window now.")
    images_seen: int = Field(ge=0, description="Images scored since this pair was served.")
    estimator_method: Literal["mean_risk", "atc", "cott"] = Field(
        description="How the feature set estimates the error: mean calibrated risk, ATC on the head's confidence, "
        "or COTT (optimal transport of the head's softmax onto the held-out class mix)."
    )
    estimated_error: float | None = Field(
        None, ge=0.0, le=1.0, description="Estimated error rate of the head over the window; null without its input."
    )
    estimated_error_method: Literal["mean_risk", "atc", "cott"] | None = Field(
        None,
        description="What estimated_error was computed with: estimator_method, except mean_risk while a COTT window "
        f"holds fewer than {COTT_MIN_IMAGES} images; null while estimated_error is.",
    )
    estimated_error_correction: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="What the feature set's set-level correction added to estimated_error, from the last drift "
        "test's MMD^2 (the evaluation keeps a correction only where it helps with each shift family left out); null "
        "when none was applied (no correction, no drift test yet, or COTT's small-window fallback).",
    )
    estimated_error_last_batch: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="The same estimate over the last encoder batch alone (the mean risk where the estimator is "
        f"COTT: a batch is under its {COTT_MIN_IMAGES}-image minimum).",
    )
    last_batch_images: int = Field(ge=0, description="Images in that batch.")
    reference_error: float | None = Field(
        None, ge=0.0, le=1.0, description="The head's error on the feature set's labelled held-out sample."
    )
    drift_p_value: float | None = Field(
        None,
        ge=0.0,  # the typicality test's p can underflow to 0
        le=1.0,
        description="p-value of the drift test: the MMD permutation test of the window's representations against "
        "the reference bank, combined (Bonferroni) with Kolmogorov-Smirnov tests of the window's typicality and "
        "image properties against the evaluation's held-out images where the feature set has them; null until the "
        "first test (or without a bank).",
    )
    drift_mmd_p_value: float | None = Field(
        None, gt=0.0, le=1.0, description="The MMD permutation test's own p-value (the representations' directions)."
    )
    drift_typicality_p_value: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="The typicality test's own p-value; null where the feature set has no held-out typicality.",
    )
    drift_property_p_value: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="The image property test's own p-value (Bonferroni over the properties); null where the feature "
        "set has no held-out image properties.",
    )
    drift_property_p_values: dict[str, float] | None = Field(
        None,
        description="Per image property (brightness, rms_contrast, red_intensity, green_intensity, blue_intensity, "
        "texture), its own Kolmogorov-Smirnov p-value against the evaluation's held-out images: the lowest says "
        "what changed in the inputs.",
    )
    drift_mmd2: float | None = Field(None, description="The test's unbiased MMD^2 (can be slightly negative).")
    drift_computed_at: int | None = Field(None, ge=0, description="images_seen when the tested window was taken.")
    drift_window_count: int | None = Field(None, ge=0, description="Images in the tested window.")
    atypical_share: float | None = Field(None, ge=0.0, le=1.0, description="Share of atypical images in the window.")
    low_quality_share: float | None = Field(
        None, ge=0.0, le=1.0, description="Share of images below alpha in the window."
    )
    mean_risk: float | None = Field(None, ge=0.0, le=1.0, description="Mean calibrated risk over the window.")
    mean_confidence: float | None = Field(
        None, ge=0.0, le=1.0, description="Mean maximum softmax of the head over the window."
    )


class MonitorResponse(BaseModel):
    enabled: bool = Field(description="Whether the monitor runs (QSCORE_MONITOR).")
    models: list[ModelMonitor] = Field(description="One entry per served model; empty when disabled.")


# -- explanations (POST /explain) and the feature atlas (GET /atlas) -------------------------
FeatureGroup = Literal["discriminative", "upper_tail", "lower_tail", "never_dominant"]

#: One image's verdict, the fields of a /score result (``ImageScore.row``).
Verdict = create_model(
    "Verdict",
    __doc__="The verdict on the image: the fields of a /score result.",
    **_verdict_fields(),
)


class Contribution(BaseModel):
    index: int
    value: float = Field(description="h_j, the feature's value in the image's representation.")
    group: FeatureGroup = Field(description="The feature's group in the feature set (D, or which tail).")
    dominant: bool = Field(description="h_j > mu + eps * sigma for this image (eq. 2).")
    share: float | None = Field(None, description="Share of eq. 3's numerator; dominant discriminative features only.")


class DecompositionOut(BaseModel):
    """The Q-Score taken apart: q_score = numerator / (n_active * l1_norm)."""

    q_score: float
    numerator: float = Field(description="Sum of the dominant discriminative features.")
    n_active: int = Field(description="How many features are dominant and discriminative.")
    mean_active: float
    l1_norm: float
    discriminative_mass: float = Field(description="Part of the L1 norm on D.")
    noisy_mass: float = Field(description="Part of the L1 norm outside D.")
    noisy_share: float = Field(description="noisy_mass / l1_norm.")
    noisy_mass_by_group: dict[str, float] = Field(
        description="noisy_mass split by upper tail, lower tail, never dominant."
    )
    active: list[Contribution] = Field(description="Dominant discriminative features, strongest first.")
    noisy_dominant: list[Contribution] = Field(description="Dominant features outside D, strongest first.")


class FeatureHeatmapOut(Contribution):
    map_shape: list[int] = Field(description="Shape of the map before upsampling.")
    map_max: float
    png: str | None = Field(None, description="Base64 PNG: the map over the image the encoder saw.")
    map: list[list[float]] | None = Field(None, description="The map before upsampling (?arrays=true).")


class HeatmapsOut(BaseModel):
    method: Literal["channel_map", "gradient_x_input", "occlusion"] = Field(
        description="channel_map: channel j of the final feature map whose mean is h (exact); occlusion (ONNX "
        "encoders): the drop in h_j when each of 8x8 blocks is hidden; else gradient x input."
    )
    image_size: int
    png_size: int
    image_png: str | None = Field(None, description="Base64 PNG of the image as the encoder saw it.")
    features: list[FeatureHeatmapOut]


class TypicalityComponentOut(BaseModel):
    name: str = Field(description="A typicality component (a signal: knn, log_l1, hoyer, pix_* ...).")
    typicality: float = Field(description="Its score over the threshold; the image's typicality is the largest.")
    atypical: bool = Field(description="Above 1: this component alone makes the image atypical.")


class TypicalityWhyOut(BaseModel):
    driver: str = Field(description="The component that sets the typicality (the largest).")
    components: list[TypicalityComponentOut] = Field(description="Every component, largest first.")


class RiskTermOut(BaseModel):
    name: str = Field(description="A signal the risk model reads.")
    value: float = Field(description="The signal's value for this image.")
    z: float = Field(
        description="As the model reads it: clipped to its fitted range (not the monotone ones), standardised."
    )
    of_a_class: float = Field(description="Its term of the decision value (coef x z): positive raises the risk.")
    no_class: float = Field(description="Its term of P(no class)'s log-odds; 0 without a no-class term.")


class RiskWhyOut(BaseModel):
    of_a_class: float = Field(description="P(mis-classified) of an image of one of the head's classes.")
    no_class: float = Field(description="P(of none of the head's classes); risk = 1 - (1 - of_a_class)(1 - no_class).")
    intercept: float = Field(description="The decision value's intercept: it plus the terms is the decision.")
    no_class_intercept: float | None = Field(None, description="P(no class)'s intercept; null without that term.")
    signals: list[RiskTermOut] = Field(description="Every signal, the largest |terms| first.")


class WhyOut(BaseModel):
    typicality: TypicalityWhyOut | None = Field(None, description="Null when the feature set has no typicality.")
    risk: RiskWhyOut | None = Field(None, description="Null when the feature set has no risk model.")


class ExplainResponse(BaseModel):
    model: ModelInfo
    feature_set: FeatureSetInfo
    filename: str
    score: Verdict  # type: ignore[valid-type]
    decomposition: DecompositionOut
    why: WhyOut = Field(description="Why the typicality and the risk are what they are.")
    heatmaps: HeatmapsOut


class AtlasImage(BaseModel):
    rank: int
    image: str = Field(description="Path of the image inside the data set's folder.")
    label: str | None = Field(None, description="Its class folder, when the data set has labels.")
    value: float


class AtlasFeatureSummary(BaseModel):
    index: int
    group: FeatureGroup
    n_dominant: int = Field(description="Images of the atlas sample this feature is dominant for.")
    purity: float | None = Field(None, description="Share of the most common class among them (with labels).")
    top_class: str | None = None
    classes_for_80: int | None = Field(None, description="Classes covering 80% of them.")


class AtlasFeature(AtlasFeatureSummary):
    count_reference: int = Field(description="Dominance count in the feature set's own reference sample.")
    dominant_share: float
    classes: dict[str, int] | None = Field(None, description="Class distribution of the images it is dominant for.")
    top: list[AtlasImage] = Field(description="The images where it is dominant, strongest first.")
    map_shape: list[int]
    sheet_url: str = Field(description="The contact sheet PNG: each top image above its heatmap.")
    feature_set: str
    atlas: str


class AtlasIndex(BaseModel):
    feature_set: str
    atlas: str
    created_at: str
    n_images: int
    method: Literal["channel_map", "gradient_x_input", "occlusion"]
    eps: float
    classes: list[str] | None = Field(None, description="Class names; null when the data set has no labels.")
    dataset: str | None = None
    top_k: int
    features: list[AtlasFeatureSummary]
