"""Feature discovery: from an encoder and unlabelled images to a :class:`FeatureSet`.

Two passes over a seeded random reference sample (SPEC sections 2, 3, 3b):
1. dominance counts for every eps of the grid (additive: shards count apart and are summed);
2. with ``D`` fixed per eps, the reference Q-Scores (percentiles, alpha, coverage).

The steps are separate functions so that Celery workers can run each pass as shard tasks; the
one-process :func:`discover` keeps the sample's representations in memory between the passes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from models.data.datasets import ProgressFn, image_folder, random_sample, subset
from models.data.transforms import eval_transform
from models.encoders.loading import ImportedEncoder
from models.encoders.resnet import ResNetEncoder
from models.scoring.dominance import (
    AUTO_COVERAGE_TARGET,
    AUTO_EPS_GRID,
    DominanceCounts,
    choose_auto_eps,
    default_alpha,
    percentiles,
    select_discriminative,
)
from models.scoring.feature_set import DataProvenance, EncoderRef, FeatureSet, Preprocessing, Selection
from models.scoring.qscore import DEFAULT_EPS, q_score
from models.scoring.representations import extract_with_pixels
from models.scoring.typicality import DEFAULT_COMPONENTS, DEFAULT_K, PIXEL_COMPONENTS, fit_typicality

log = logging.getLogger(__name__)


EpsChoice = float | Literal["auto"]


DEFAULT_SAMPLE_SIZE = 5000  # the paper's reference population (section 4)


def eps_grid(eps: EpsChoice) -> tuple[float, ...]:
    if eps == "auto":
        return AUTO_EPS_GRID
    value = float(eps)
    if not value > 0:
        raise ValueError(f"eps must be positive or 'auto', got {eps}")
    return (value,)


def parse_eps(text: str | float) -> EpsChoice:
    """``"auto"`` or a positive number, from a command line or a job request."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"eps must be a positive number or 'auto', got {text!r}") from None
    eps_grid(value)
    return value


def count_pass(batches: Iterable[torch.Tensor], grid: tuple[float, ...]) -> DominanceCounts:
    """Dominance counts over representation batches (each (B, r))."""
    total: DominanceCounts | None = None
    for h in batches:
        counts = DominanceCounts.of(h, grid)
        total = counts if total is None else total + counts
    if total is None:
        raise ValueError("no representations to count")
    return total


def select_per_eps(counts: DominanceCounts, selection: Selection) -> dict[float, torch.Tensor]:
    """``D`` for every counted eps; an empty band for an eps where too few features dominate."""
    out = {}
    for eps in counts.eps:
        c = counts.for_eps(eps)
        if selection.method == "size":
            available = int((c > 0).sum())
            size = min(int(selection.size or 0), available)
            out[eps] = select_discriminative(c, size=size) if size > 0 else torch.empty(0, dtype=torch.int64)
        else:
            out[eps] = select_discriminative(c, lo=selection.lo or 0.0, hi=selection.hi or 1.0)
    return out


def q_pass(batches: Iterable[torch.Tensor], selections: dict[float, torch.Tensor]) -> dict[float, np.ndarray]:
    """Reference Q-Scores per eps, each (N,)."""
    parts: dict[float, list[np.ndarray]] = {eps: [] for eps in selections}
    for h in batches:
        for eps, d in selections.items():
            parts[eps].append(q_score(h, d, eps).numpy())
    return {eps: np.concatenate(chunks) if chunks else np.empty(0) for eps, chunks in parts.items()}


def build_feature_set(
    *,
    counts: DominanceCounts,
    selections: dict[float, torch.Tensor],
    q_by_eps: dict[float, np.ndarray],
    eps: EpsChoice,
    selection: Selection,
    encoder: EncoderRef,
    data: DataProvenance,
    coverage_target: float = AUTO_COVERAGE_TARGET,
) -> FeatureSet:
    """Assemble the artifact; for ``eps="auto"`` pick the largest eps reaching the coverage target."""
    coverages = {e: float((q > 0).mean()) if q.size else 0.0 for e, q in q_by_eps.items()}
    chosen = choose_auto_eps(coverages, coverage_target) if eps == "auto" else float(eps)
    q = q_by_eps[chosen]
    feature_set = FeatureSet(
        encoder=encoder,
        eps=chosen,
        eps_mode="auto" if eps == "auto" else "fixed",
        coverage_by_eps={f"{e:g}": c for e, c in coverages.items()},
        selection=selection,
        counts=counts.for_eps(chosen).tolist(),
        discriminative=selections[chosen].tolist(),
        coverage=coverages[chosen],
        reference_q_percentiles=percentiles(q),
        reference_q_nonzero_percentiles=percentiles(q[q > 0]),
        alpha=default_alpha(q),
        data=data,
        negative_share=counts.negative_share,
    )
    for warning in (feature_set.coverage_warning, feature_set.selection_warning, feature_set.signed_warning):
        if warning:
            log.warning(warning)
    return feature_set


def make_selection(lo: float = 0.25, hi: float = 0.75, size: int | None = None) -> Selection:
    if size is not None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        return Selection(method="size", size=size)
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"the band needs 0 <= lo < hi <= 1, got lo={lo}, hi={hi}")
    return Selection(method="quantile_band", lo=lo, hi=hi)


def discover(
    encoder: ResNetEncoder,
    dataset: Dataset,
    *,
    dataset_name: str,
    encoder_ref: EncoderRef,
    eps: EpsChoice = DEFAULT_EPS,
    selection: Selection | None = None,
    sample_size: int | None = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    workers: int = 0,
    progress: bool = False,
    on_progress: ProgressFn | None = None,
    typicality: bool = True,
) -> FeatureSet:
    """Discover the discriminative features of ``encoder`` on a random sample of ``dataset``.

    With ``typicality`` (default) the sample's representations also become the reference bank
    and typicality is calibrated on them (models/scoring/typicality.py); the feature set carries both
    and writes the bank beside its JSON.
    """
    selection = selection or make_selection()
    spec = getattr(encoder, "spec", None)  # any module mapping images to h may be passed
    if encoder_ref.preprocessing is None and spec is not None:
        encoder_ref = encoder_ref.model_copy(update={"preprocessing": Preprocessing.of(spec)})
    grid = eps_grid(eps)
    sample = random_sample(len(dataset), sample_size, seed)  # type: ignore[arg-type]
    h, _, pixels = extract_with_pixels(
        encoder,
        subset(dataset, sample.indices),
        batch_size=batch_size,
        device=device,
        workers=workers,
        on_progress=on_progress,
    )
    batches = list(torch.split(h, batch_size))
    counts = count_pass(batches, grid)
    selections = select_per_eps(counts, selection)
    q_by_eps = q_pass(batches, selections)
    provenance = DataProvenance(
        dataset=dataset_name,
        n_available=sample.n_available,
        n_reference=len(sample.indices),
        sampling=sample.description,
        seed=seed,
    )
    feature_set = build_feature_set(
        counts=counts,
        selections=selections,
        q_by_eps=q_by_eps,
        eps=eps,
        selection=selection,
        encoder=encoder_ref,
        data=provenance,
    )
    return with_typicality(feature_set, h, pixels) if typicality else feature_set


def discover_folder(
    imported: ImportedEncoder,
    folder: str | Path,
    *,
    dataset_name: str,
    model_version: str | None = None,
    eps: EpsChoice = DEFAULT_EPS,
    lo: float = 0.25,
    hi: float = 0.75,
    size: int | None = None,
    sample_size: int | None = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
    on_progress: ProgressFn | None = None,
) -> FeatureSet:
    """:func:`discover` on the image folder ``folder``, preprocessed as the encoder's spec says.

    The set-up ``qscore discover`` and the jobs share: the data set, the encoder's reference
    (``model_version``: its registry version, if any) and the band ``lo``..``hi`` (or ``size``
    features) of :func:`make_selection`.
    """
    encoder = imported.encoder
    spec = encoder.spec
    return discover(
        encoder,
        image_folder(folder, transform=eval_transform(spec)),
        dataset_name=dataset_name,
        encoder_ref=EncoderRef(
            fingerprint=imported.fingerprint,
            arch=spec.arch,
            feature_dim=spec.feature_dim,
            model_version=model_version,
        ),
        eps=eps,
        selection=make_selection(lo, hi, size),
        sample_size=sample_size,
        seed=seed,
        batch_size=batch_size,
        device=device,
        progress=progress,
        on_progress=on_progress,
    )


def with_typicality(feature_set: FeatureSet, h: torch.Tensor, pixels: dict[str, torch.Tensor]) -> FeatureSet:
    """``feature_set`` plus typicality fitted on the reference sample ``h`` (N, r) and its bank.

    Too small a sample for the k-NN part (k + 1 = 11 images or fewer) gets no typicality.
    """

    if h.shape[0] <= DEFAULT_K:
        log.warning("a reference sample of %d images is too small for typicality; none calibrated", h.shape[0])
        return feature_set
    # Inputs that are not images have no pixel statistics: typicality from the representation only.
    components = DEFAULT_COMPONENTS if pixels else tuple(c for c in DEFAULT_COMPONENTS if c not in PIXEL_COMPONENTS)
    model, bank = fit_typicality(h, pixels, components=components, fingerprint=feature_set.encoder.fingerprint)
    return feature_set.with_typicality(model, bank)
