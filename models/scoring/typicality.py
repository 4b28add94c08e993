"""Typicality: how unlike the reference sample an image's representation is (issue 10, item 1).

Label-free signals of one representation ``h`` (all (N,) tensors, see :func:`signals`):

- ``knn``: mean cosine distance to the ``k`` nearest reference representations after L2
  normalisation (deep k-NN, Sun et al., ICML 2022); large = unlike the reference;
- ``log_l1``: ``log ||h||_1``; ``hoyer``: Hoyer sparsity ``(sqrt(r) - ||h||_1/||h||_2) /
  (sqrt(r) - 1)``; ``log_max``: ``log max_j h_j``. These are checked on *both* sides: on a
  weak encoder, images unlike any photograph (digits, solid colours) are not far from the
  reference after normalisation, but their norm or sparsity is off, and which way depends on
  the encoder (larger norms on the demo, smaller on the supervised ResNet-20);
- ``pix_*``: low-level statistics of the input image in [0, 1] (log pixel standard deviation,
  log mean neighbour difference, fine-to-coarse gradient ratio, gradient sparsity). The
  pooled representation of a weak encoder has learned to ignore colour and texture (Lee et
  al., NeurIPS 2018, use early-layer statistics for the same reason); measured on the demo, the
  representation's own signals flag under 40% of solid colours, uniform noise and glyphs,
  these flag all of them. They are cheap (one pass over the pixels) and encoder-agnostic.

Each component is put on the reference's own scale: ``(s - p50) / (p_hi - p50)`` above the
median and ``(p50 - s) / (p50 - p_lo)`` below it (two-sided components only), with p_hi / p_lo
the reference's 99.5th / 0.5th percentiles, so 1 means "as far out as the reference's most
extreme 0.5%". The combined score is the largest component. Its threshold is the 99th
percentile of the reference's own combined scores, the k-NN part measured leave-one-out (an
image is never its own neighbour). ``typicality`` is the combined score divided by that
threshold: above 1 is ``atypical``; about 1% of reference images are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.scoring.bank import ReferenceBank, normalise

PIXEL_COMPONENTS = ("pix_std", "pix_grad", "pix_fine", "pix_gsparse")


COMPONENTS = ("knn", "log_l1", "hoyer", "log_max", *PIXEL_COMPONENTS)


DEFAULT_COMPONENTS: tuple[str, ...] = ("knn", "log_l1", "hoyer", *PIXEL_COMPONENTS)


TWO_SIDED: frozenset[str] = frozenset(COMPONENTS) - {"knn"}


DEFAULT_K = 10


THRESHOLD_PERCENTILE = 99.0


TAIL_PERCENTILE = 99.5


_TINY = 1e-12


def hoyer_sparsity(h: torch.Tensor) -> torch.Tensor:
    """(N,) Hoyer sparsity of the rows of ``h`` (N, r): 0 for a constant row, 1 for one-hot."""
    r = h.shape[1]
    l1 = h.abs().sum(dim=1)
    l2 = h.norm(dim=1)
    ratio = torch.where(l2 > 0, l1 / l2.clamp_min(_TINY), torch.full_like(l1, math.sqrt(r)))
    return (math.sqrt(r) - ratio) / (math.sqrt(r) - 1)


def norm_signals(h: torch.Tensor) -> dict[str, torch.Tensor]:
    """The signals that need no bank: ``log_l1``, ``hoyer``, ``log_max``, ``l1_norm``, ``max_activation``."""
    h = h.float()
    l1 = h.abs().sum(dim=1)
    mx = h.max(dim=1).values
    return {
        "l1_norm": l1,
        "max_activation": mx,
        "log_l1": torch.log(l1.clamp_min(_TINY)),
        "hoyer": hoyer_sparsity(h),
        "log_max": torch.log(mx.clamp_min(_TINY)),
    }


def _difference_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and mean square (N,) of the absolute horizontal and vertical neighbour differences,
    averaged over channels first; ``x`` (N, C, H, W)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=1)
    n = dx[0].numel() + dy[0].numel()
    total = dx.sum(dim=(1, 2)) + dy.sum(dim=(1, 2))
    squares = dx.square().sum(dim=(1, 2)) + dy.square().sum(dim=(1, 2))
    return total / n, squares / n


def _std(rows: torch.Tensor) -> torch.Tensor:
    """(N,) sample standard deviation of the rows of ``rows`` (N, P), two-pass: on the CPU about
    ten times as fast as ``Tensor.std`` for these sizes, equal to it within float32 rounding."""
    centred = rows - rows.mean(dim=1, keepdim=True)
    return (centred.square().sum(dim=1) / (rows.shape[1] - 1)).sqrt()


def _half(x: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling of (N, C, H, W) (odd edges dropped), as ``avg_pool2d(x, 2)``, faster."""
    x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
    return (x[..., ::2, ::2] + x[..., 1::2, ::2] + x[..., ::2, 1::2] + x[..., 1::2, 1::2]) * 0.25


def pixel_signals(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Low-level statistics of images ``x`` (N, C, H, W) with values in [0, 1], each (N,).

    ``pix_std``: log of the pixel standard deviation (solid colours: very low);
    ``pix_grad``: log of the mean neighbour difference (noise: high; blur: low);
    ``pix_fine``: log of that mean over the same at half resolution (noise: high, as it does
    not survive averaging); ``pix_gsparse``: mean over root-mean-square of the neighbour
    differences (drawn glyphs on a plain background: few, large differences, so low).
    """
    if x.dim() != 4 or min(x.shape[-2:]) < 4:
        raise ValueError(f"images must have shape (N, C, H, W) with H, W >= 4, got {tuple(x.shape)}")
    x = x.float()
    e = 1e-3
    g_mean, g_square = _difference_stats(x)
    g_half, _ = _difference_stats(_half(x))
    return {
        "pix_std": torch.log(_std(x.flatten(1)) + e),
        "pix_grad": torch.log(g_mean + e),
        "pix_fine": torch.log((g_mean + e) / (g_half + e)),
        "pix_gsparse": g_mean / (g_square.sqrt() + e),
    }


def signals(
    h: torch.Tensor,
    bank: ReferenceBank | None,
    k: int = DEFAULT_K,
    *,
    pixels: torch.Tensor | dict[str, torch.Tensor] | None = None,
    exclude: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All label-free typicality signals of ``h`` (N, r), each (N,) float32 on ``h``'s device.

    ``knn`` only with a bank (``exclude`` as in :meth:`ReferenceBank.search`); ``pix_*`` only
    with the images ``pixels`` (N, C, H, W) in [0, 1] (or their :func:`pixel_signals`).
    """
    out = norm_signals(h)
    if bank is not None:
        q = normalise(h.to(bank.device, torch.float32))  # once, for the search and the prototypes
        out["knn"] = bank.knn_distance(q, k, exclude=exclude, normalised=True).to(h.device)
        out.update({name: t.to(h.device) for name, t in bank.prototype_confidence(q, normalised=True).items()})
    if pixels is not None:
        pix = pixels if isinstance(pixels, dict) else pixel_signals(pixels)
        for name, t in pix.items():
            if t.shape[0] != h.shape[0]:
                raise ValueError(f"{t.shape[0]} images for {h.shape[0]} representations")
            out[name] = t.to(h.device)
    return out


class ComponentScale(BaseModel):
    """One component's reference percentiles: the median and the tails it is measured against."""

    model_config = ConfigDict(extra="forbid")

    center: float
    upper: float = Field(gt=0.0)  # p_hi - p50
    lower: float | None = Field(default=None, gt=0.0)  # p50 - p_lo, two-sided components only

    def score(self, values: np.ndarray) -> np.ndarray:
        up = (values - self.center) / self.upper
        if self.lower is None:
            return up
        return np.maximum(up, (self.center - values) / self.lower)


class TypicalityModel(BaseModel):
    """What turns signals into ``typicality``; stored in the feature set (JSON), the bank beside it."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(default=DEFAULT_K, ge=1)
    components: dict[str, ComponentScale]
    threshold: float = Field(gt=0.0)
    threshold_source: str
    reference_atypical_share: float = Field(ge=0.0, le=1.0)
    n_bank: int = Field(ge=0)
    n_calibration: int = Field(ge=1)
    held_out: list[float] | None = Field(
        None,
        description="The typicality of the evaluation's labelled held-out images, sorted: the drift test's "
        "reference for the window's typicality (models/monitoring/drift.py). None before an evaluation.",
    )

    @model_validator(mode="after")
    def _known(self) -> TypicalityModel:
        unknown = set(self.components) - set(COMPONENTS)
        if unknown or not self.components:
            raise ValueError(f"unknown or no typicality components: {sorted(unknown) or 'none given'}")
        if "knn" in self.components and self.n_bank < self.k:
            raise ValueError(f"the k-NN component needs a bank of at least k={self.k} vectors, got {self.n_bank}")
        return self

    @property
    def needs_bank(self) -> bool:
        return "knn" in self.components

    @property
    def needs_pixels(self) -> bool:
        return any(name in self.components for name in PIXEL_COMPONENTS)

    def combined(self, sig: dict[str, np.ndarray]) -> np.ndarray:
        """(N,) the largest component score (unscaled by the threshold)."""
        missing = set(self.components) - set(sig)
        if missing:
            raise ValueError(f"typicality needs the signals {sorted(missing)}")
        scores = [scale.score(np.asarray(sig[name], dtype=np.float64)) for name, scale in self.components.items()]
        return np.max(np.stack(scores), axis=0)

    def typicality(self, sig: dict[str, np.ndarray]) -> np.ndarray:
        """(N,) combined score over the threshold: above 1 is atypical."""
        return self.combined(sig) / self.threshold

    def component_typicality(self, sig: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each component's score over the threshold, (N,) by name: the typicality is their largest,
        so the components above 1 are those that make an image atypical (why it is)."""
        missing = set(self.components) - set(sig)
        if missing:
            raise ValueError(f"typicality needs the signals {sorted(missing)}")
        return {
            name: scale.score(np.asarray(sig[name], dtype=np.float64)) / self.threshold
            for name, scale in self.components.items()
        }


def _scale(values: np.ndarray, two_sided: bool) -> ComponentScale:
    p50 = float(np.percentile(values, 50))
    upper = float(np.percentile(values, TAIL_PERCENTILE)) - p50
    spread = float(np.std(values)) or 1.0
    lower = p50 - float(np.percentile(values, 100 - TAIL_PERCENTILE)) if two_sided else None
    # A degenerate tail (many ties) falls back to the standard deviation, never to 0.
    return ComponentScale(
        center=p50,
        upper=upper if upper > _TINY else spread,
        lower=None if lower is None else (lower if lower > _TINY else spread),
    )


def fit_typicality(
    h: torch.Tensor,
    pixels: torch.Tensor | dict[str, torch.Tensor] | None = None,
    *,
    components: Sequence[str] = DEFAULT_COMPONENTS,
    k: int = DEFAULT_K,
    bank_size: int | None = None,
    percentile: float = THRESHOLD_PERCENTILE,
    fingerprint: str | None = None,
    prototypes: bool = True,
) -> tuple[TypicalityModel, ReferenceBank | None]:
    """Fit typicality on reference representations ``h`` (N, r); return the model and its bank.

    ``pixels``: the reference images (N, C, H, W) in [0, 1], needed by the ``pix_*``
    components (or their signals only: a dict of (N,) tensors from :func:`pixel_signals`).

    The bank holds the first ``bank_size`` rows (all by default; pass a random sample). The
    k-NN distances that set the scales and the threshold are leave-one-out for bank rows and
    plain for the rows left out of the bank, so no image is ever its own neighbour.
    """
    components = tuple(components)
    if h.dim() != 2 or h.shape[0] < 2:
        raise ValueError(f"typicality needs (N, r) reference representations with N >= 2, got {tuple(h.shape)}")
    if not 0 < percentile < 100:
        raise ValueError(f"the threshold percentile must lie in (0, 100), got {percentile}")
    n = h.shape[0]
    bank = None
    unknown = set(components) - set(COMPONENTS)
    if unknown or not components:
        raise ValueError(f"unknown or no typicality components {sorted(unknown)}; known: {', '.join(COMPONENTS)}")
    sig = {name: t.cpu().numpy() for name, t in norm_signals(h).items()}
    if any(name in PIXEL_COMPONENTS for name in components):
        if pixels is None:
            raise ValueError(f"the components {PIXEL_COMPONENTS} need the reference images (pixels)")
        pix = pixels if isinstance(pixels, dict) else pixel_signals(pixels)
        sig.update({name: t.cpu().numpy() for name, t in pix.items()})
    if "knn" in components:
        n_bank = n if bank_size is None else int(bank_size)
        if not k + 1 <= n_bank <= n:
            raise ValueError(f"the bank needs between k+1={k + 1} and {n} vectors, got {n_bank}")
        bank = ReferenceBank.from_representations(h[:n_bank], fingerprint=fingerprint).to("cpu")
        if prototypes:
            bank = bank.with_prototypes()
        knn = bank.leave_one_out_distance(k)
        if n_bank < n:
            knn = torch.cat([knn, bank.knn_distance(h[n_bank:], k)])
        sig["knn"] = knn.cpu().numpy()
    scales = {name: _scale(sig[name], name in TWO_SIDED) for name in components}
    model = TypicalityModel(
        k=k,
        components=scales,
        threshold=1.0,
        threshold_source="",
        reference_atypical_share=0.0,
        n_bank=0 if bank is None else bank.size,
        n_calibration=n,
    )
    combined = model.combined(sig)
    threshold = float(np.percentile(combined, percentile))
    if threshold <= 0:
        raise ValueError("the reference's typicality threshold came out <= 0; is the reference sample degenerate?")
    model = model.model_copy(
        update={
            "threshold": threshold,
            "threshold_source": f"p{percentile:g} of the reference's own combined scores (k-NN leave-one-out), "
            f"{n} images",
            "reference_atypical_share": float((combined > threshold).mean()),
        }
    )
    return model, bank


def score_typicality(
    model: TypicalityModel,
    h: torch.Tensor,
    bank: ReferenceBank | None,
    pixels: torch.Tensor | dict[str, torch.Tensor] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(typicality (N,), signals)`` for representations ``h`` (N, r) and images ``pixels``."""
    if model.needs_bank and bank is None:
        raise ValueError("this typicality model uses the k-NN distance: load its reference bank")
    if model.needs_pixels and pixels is None:
        raise ValueError("this typicality model uses pixel statistics: pass the images in [0, 1]")
    sig = signals(h, bank, model.k, pixels=pixels)
    sig = {name: t.cpu().numpy() for name, t in sig.items()}
    return model.typicality(sig), sig
