"""Labelled held-out images and their shifted copies, as the risk model's training data (issue 15).

A risk model fitted on clean held-out images only extrapolates under shift, and often
downwards (Ovadia et al., NeurIPS 2019): corrupted images look "safe" exactly where the
classifier fails. So the fit also sees shifted copies of its held-out images: every design
corruption family (models/data/corruptions.py) at several severities, the inversion and
grayscale shifts, each labelled by the head's own errors on it; and images of no class at all
(the gross sets of models/data/shifts.py: solid colours, noise, glyphs), which count as
mis-classified whatever the head says.

Signals come from :meth:`models.scoring.scorer.Scorer.signals`, the serving path itself, so the
risk model is fitted on exactly what ``/score`` computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from models.data.corruptions import DESIGN_FAMILIES, apply_corruption
from models.data.shifts import GROSS_SHIFTS, apply_shift
from models.monitoring.drift import DriftReference
from models.monitoring.image_properties import property_signals
from models.scoring.bank import normalise
from models.scoring.probe import Head, head_outputs, head_probabilities
from models.scoring.scorer import Inference, Scorer

#: The severities the fit sees (all five: the traffic's are unknown).
FIT_SEVERITIES = (1, 2, 3, 4, 5)

#: Shifts of models/data/shifts.py the fit sees too (one severity each).
FIT_EXTRA_SHIFTS = ("invert", "grayscale")

#: The clean images' and the gross images' shares of the fit's total weight (the shifted copies
#: have the rest): shifted copies outnumber the clean images many times, gross ones are few.
CLEAN_WEIGHT = 0.5
GROSS_WEIGHT = 0.05  # chosen on the fit's own cross-validation (experiments/shift_report.py)

#: The clean shares the evaluation tries, keeping the one whose own cross-validation best meets
#: the calibration and estimation targets (models/evaluation/linear_eval.py): more clean weight
#: calibrates the clean images better and the shifted ones worse.
CLEAN_WEIGHTS = (0.5, 0.6, 0.7)


@dataclass(frozen=True)
class Measured:
    """What :func:`measure` gives: signals (each (n,)), whether the head got each image wrong, and
    the representations and the head's probabilities when asked for and available."""

    signals: dict[str, np.ndarray]
    misclassified: np.ndarray
    h: np.ndarray | None
    probabilities: np.ndarray | None


@dataclass
class SignalSet:
    """One set of images (clean, one family at one severity, or a gross set) and what was measured on it."""

    name: str
    kind: str  # "clean", "corruption", "extra" or "gross"
    family: str | None
    severity: int | None
    signals: dict[str, np.ndarray]  # each (n,)
    misclassified: np.ndarray  # (n,) bool
    source: np.ndarray  # (n,) int: the held-out image it was made from (the fit's groups)
    h: np.ndarray | None = None  # (n, r) float32, when kept (the drift test reads it)
    probabilities: np.ndarray | None = None  # (n, C) float32: the head's softmax (COTT reads it), with a head
    labels: np.ndarray | None = None  # (n,) int: the true classes, where known (COTT's class prior)
    mmd2: float | None = None  # the set's MMD^2 against the reference bank (the set-level correction reads it)

    @property
    def error(self) -> float:
        return float(self.misclassified.mean())

    @property
    def shift_group(self) -> str:
        """The set's group when families are left out in turn: its family; each gross set its own."""
        if self.kind == "clean":
            return "clean"
        return f"gross/{self.family}" if self.kind == "gross" else str(self.family)


def measure(
    scorer: Scorer,
    images: Sequence[Image.Image],
    labels: np.ndarray | None,
    *,
    batch_size: int = 250,
    keep_h: bool = False,
) -> Measured:
    """Signals of ``images`` on the serving path and their image properties (``image_<name>``),
    whether the head got each wrong, (optionally) h, and, with a head, its class probabilities.

    ``labels`` None means the images are of no class: all mis-classified. With labels the
    scorer needs a head.
    """
    parts: list[dict[str, np.ndarray]] = []
    hs, probabilities = [], []
    for start in range(0, len(images), batch_size):
        batch = [scorer.preprocess(im.convert("RGB")) for im in images[start : start + batch_size]]
        inference: Inference = scorer.infer(batch)
        parts.append(scorer.signals(inference)[1] | property_signals(batch))  # the drift test's image properties
        if keep_h:
            hs.append(inference.h.cpu().numpy())
        if scorer.head is not None:
            probabilities.append(head_probabilities(scorer.head, inference.h))
    sig = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if labels is None:
        miss = np.ones(len(images), dtype=bool)
    else:
        if "probe_prediction" not in sig:
            raise ValueError("labelled sets need a scorer with a head (the feature set's classifier)")
        miss = sig["probe_prediction"] != np.asarray(labels)
    return Measured(
        sig, miss, np.concatenate(hs) if keep_h else None, np.concatenate(probabilities) if probabilities else None
    )


def signal_sets(
    scorer: Scorer,
    images: Sequence[Image.Image],
    labels: np.ndarray,
    *,
    families: Sequence[str] = DESIGN_FAMILIES,
    severities: Sequence[int] = FIT_SEVERITIES,
    extra_shifts: Sequence[str] = FIT_EXTRA_SHIFTS,
    gross: Sequence[str] = GROSS_SHIFTS,
    seed: int = 0,
    batch_size: int = 250,
    keep_h: bool = False,
    clean: bool = True,
    source: np.ndarray | None = None,
    drift_reference: DriftReference | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> list[SignalSet]:
    """The clean set (with ``clean``) and every shifted copy of ``images`` (seeded), measured: the fit's data.

    ``source``: the images' ids (their groups in the fit; default 0..n-1). Gross images are no
    copies of any: each gets a negative id of its own. With ``drift_reference`` each set's MMD^2
    against it is measured as the set is (:func:`with_mmd2`), its representations kept only with
    ``keep_h``: one set's at a time (87 sets of 200 images of a 2048-wide encoder would be 140 MB).
    """
    source = np.arange(len(images)) if source is None else np.asarray(source)
    jobs: list[tuple[str, str, str | None, int | None]] = [("clean", "clean", None, None)] if clean else []
    jobs += [(f"{f}/s{s}", "corruption", f, s) for f in families for s in severities]
    jobs += [(name, "extra", name, None) for name in extra_shifts]
    jobs += [(f"gross/{name}", "gross", name, None) for name in gross]
    out = []
    for i, (name, kind, family, severity) in enumerate(jobs):
        if kind == "clean":
            shifted: Sequence[Image.Image] = images
        elif kind == "corruption":
            shifted = list(apply_corruption(family, images, severity, seed))  # type: ignore[arg-type]
        else:
            shifted = list(apply_shift(family, images, seed))  # type: ignore[arg-type]
        need_h = keep_h or drift_reference is not None
        m = measure(scorer, shifted, None if kind == "gross" else labels, batch_size=batch_size, keep_h=need_h)
        gross_set = kind == "gross"
        src = -(i * len(images) + np.arange(len(images)) + 1) if gross_set else source
        set_labels = None if gross_set else np.asarray(labels)
        measured = SignalSet(
            name, kind, family, severity, m.signals, m.misclassified, src, m.h, m.probabilities, set_labels
        )
        if drift_reference is not None:
            (measured,) = with_mmd2([measured], drift_reference, drop_h=not keep_h)
        out.append(measured)
        if on_progress is not None:
            on_progress((i + 1) / len(jobs))
    return out


@dataclass(frozen=True)
class Pooled:
    """Sets pooled for :func:`models.scoring.risk.fit_risk`."""

    signals: dict[str, np.ndarray]
    misclassified: np.ndarray
    groups: np.ndarray
    weight: np.ndarray
    subsets: dict[str, np.ndarray]  # "clean", "shifted", "gross" and each set by name: (N,) bool masks
    no_class: np.ndarray  # (N,) bool: the gross images


def pool(sets: Sequence[SignalSet], clean_weight: float = CLEAN_WEIGHT, gross_weight: float = GROSS_WEIGHT) -> Pooled:
    """Concatenate ``sets``; clean images carry ``clean_weight`` of the total weight (when there are
    shifted ones), gross images ``gross_weight`` (0: their count's share of the non-clean weight)."""
    names = set.intersection(*(set(s.signals) for s in sets))
    sig = {k: np.concatenate([s.signals[k] for s in sets]) for k in names}
    miss = np.concatenate([s.misclassified for s in sets])
    groups = np.concatenate([s.source for s in sets])
    kinds = np.concatenate([np.full(len(s.misclassified), s.kind) for s in sets])
    clean = kinds == "clean"
    weight = np.ones(len(miss))
    gross = kinds == "gross"
    if clean.any() and (~clean).any():
        weight[clean] = clean_weight / clean.sum()
        weight[~clean] = (1 - clean_weight) / (~clean).sum()
        if gross_weight > 0 and gross.any() and (~clean & ~gross).any():
            weight[gross] = gross_weight / gross.sum()
            weight[~clean & ~gross] = (1 - clean_weight - gross_weight) / (~clean & ~gross).sum()
        weight *= len(miss)  # mean weight 1: the penalty keeps its meaning
    subsets = {"clean": clean, "shifted": ~clean & ~gross, "gross": gross}
    subsets = {k: v for k, v in subsets.items() if v.any()}
    which = np.concatenate([np.full(len(s.misclassified), i) for i, s in enumerate(sets)])
    subsets |= {s.name: which == i for i, s in enumerate(sets)}
    return Pooled(sig, miss, groups, weight, subsets, gross)


def with_mmd2(sets: Sequence[SignalSet], reference: DriftReference, *, drop_h: bool = False) -> list[SignalSet]:
    """``sets`` with each one's MMD^2 against ``reference`` (its unit-norm representations, as the
    monitor's drift test takes the window's; seed 0), optionally dropping the representations."""
    out = []
    for s in sets:
        if s.h is None:
            raise ValueError(f"set {s.name!r} kept no representations: measure it with keep_h=True")
        mmd2 = reference.mmd2(normalise(torch.from_numpy(s.h)).numpy())
        out.append(replace(s, mmd2=mmd2, h=None if drop_h else s.h))
    return out


def labelled_clean_set(signals: dict[str, np.ndarray], h: np.ndarray, head: Head, labels: np.ndarray) -> SignalSet:
    """The clean held-out set from signals measured without a head, the head's outputs added from ``h``."""
    rows = torch.from_numpy(h)
    sig = signals | head_outputs(head, rows)
    labels = np.asarray(labels)
    miss = sig["probe_prediction"] != labels
    return SignalSet(
        "clean", "clean", None, None, sig, miss, np.arange(len(labels)), h, head_probabilities(head, rows), labels
    )
