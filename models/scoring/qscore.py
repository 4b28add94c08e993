"""The Q-Score of a representation (paper eq. 2 and 3; SPEC sections 1 and 3).

Every function here is batched over samples and differentiable in the representation values:
the dominant-feature *selection* is a comparison and carries no gradient, the values
``h_ij`` and the L1 norm do (SPEC section 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_EPS = 4.0


def _check_representations(h: torch.Tensor) -> None:
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"h must be a torch.Tensor of shape (N, r), got {type(h).__name__}")
    if h.dim() != 2:
        raise ValueError(f"h must have shape (N, r), got a tensor of shape {tuple(h.shape)}")
    if not h.is_floating_point():
        raise TypeError(f"h must be a floating-point tensor, got dtype {h.dtype}")


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not math.isfinite(eps):
        raise ValueError(f"eps must be a finite number, got {eps}")
    return eps


def dominant_mask(h: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Dominant features ``L_i = {j : h_ij > mu_i + eps * sigma_i}`` (paper eq. 2).

    ``h``: (N, r) float tensor. Returns an (N, r) bool tensor. ``sigma_i`` is the population
    standard deviation of the entries of ``h_i`` (SPEC, notation).
    """
    _check_representations(h)
    eps = _check_eps(eps)
    with torch.no_grad():
        # Half precisions are upcast for the statistics; float32 and float64 are used as they
        # are (``.float()`` would round float64 to float32 and move features across the threshold).
        values = h.detach()
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        mu = values.mean(dim=1, keepdim=True)
        sigma = values.std(dim=1, unbiased=False, keepdim=True)
        return values > mu + eps * sigma


def discriminative_mask(discriminative: torch.Tensor, r: int) -> torch.Tensor:
    """Turn feature indices, or a boolean mask of length ``r``, into an (r,) bool mask."""
    if not isinstance(discriminative, torch.Tensor):
        discriminative = torch.as_tensor(discriminative)
    if discriminative.dtype == torch.bool:
        if discriminative.shape != (r,):
            raise ValueError(f"a boolean discriminative mask must have shape ({r},), got {tuple(discriminative.shape)}")
        return discriminative
    if discriminative.is_floating_point() or discriminative.dim() != 1:
        raise ValueError(
            "discriminative must be a 1-D integer tensor of feature indices or a boolean mask, "
            f"got dtype {discriminative.dtype} and shape {tuple(discriminative.shape)}"
        )
    indices = discriminative.long().cpu()
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= r):
        raise ValueError(
            f"discriminative feature indices must lie in [0, {r}), "
            f"got min {int(indices.min())} and max {int(indices.max())}"
        )
    mask = torch.zeros(r, dtype=torch.bool)
    mask[indices] = True
    return mask


@dataclass(frozen=True)
class QScoreParts:
    """The pieces of eq. 3 for a batch, all of shape (N,) except the (N, r) masks."""

    q_score: torch.Tensor
    dominant: torch.Tensor  # (N, r) bool: L_i
    active: torch.Tensor  # (N, r) bool: L_i ∩ D
    mean_active: torch.Tensor  # mean of h_ij over L_i ∩ D (0 where empty)
    l1_norm: torch.Tensor


def q_score_parts(h: torch.Tensor, discriminative: torch.Tensor, eps: float = DEFAULT_EPS) -> QScoreParts:
    """Q-Score with its components (paper eq. 3, SPEC section 3).

    ``Q_i = sum_{j in L_i ∩ D} h_ij / (|L_i ∩ D| * ||h_i||_1)``; ``Q_i = 0`` when ``L_i ∩ D``
    is empty or ``||h_i||_1 = 0`` (SPEC's decision: no discriminative evidence is the lowest
    quality).
    """
    _check_representations(h)
    dominant = dominant_mask(h, eps)
    d_mask = discriminative_mask(discriminative, h.shape[1]).to(h.device)
    active = dominant & d_mask
    n_active = active.sum(dim=1).to(h.dtype)
    active_sum = (h * active.to(h.dtype)).sum(dim=1)
    l1_norm = h.abs().sum(dim=1)
    has_active = n_active > 0
    valid = has_active & (l1_norm > 0)
    # torch.where on safe denominators keeps the gradient finite where Q is defined as 0.
    ones = torch.ones_like(l1_norm)
    mean_active = torch.where(has_active, active_sum / torch.where(has_active, n_active, ones), 0.0)
    q = torch.where(valid, mean_active / torch.where(valid, l1_norm, ones), 0.0)
    return QScoreParts(q, dominant, active, mean_active, l1_norm)


def q_score(h: torch.Tensor, discriminative: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Per-sample Q-Score: ``h`` (N, r) float, ``discriminative`` indices or (r,) bool mask.

    Returns an (N,) tensor of the dtype of ``h``, in [0, 1] for non-negative ``h``,
    differentiable in ``h``. See :func:`q_score_parts` for the definition.
    """
    return q_score_parts(h, discriminative, eps).q_score


def regularizer_term(q: torch.Tensor, alpha: float) -> torch.Tensor:
    """``-mean_{i : Q_i < alpha} Q_i`` for Q-Scores ``q`` (N,): the term of paper eq. 4.

    Zero, with a zero gradient, when no sample is below ``alpha``.
    """
    low = (q < alpha).detach()
    if not bool(low.any()):
        return q.sum() * 0.0
    return -q[low].mean()


def q_score_regularizer(
    h: torch.Tensor, discriminative: torch.Tensor, alpha: float, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """The regularisation term of paper eq. 4 on representations ``h`` (N, r); a scalar.

    Added to the self-supervised loss with weight ``lambda`` (SPEC section 4).
    """
    return regularizer_term(q_score(h, discriminative, eps), alpha)


def coverage(h: torch.Tensor, discriminative: torch.Tensor, eps: float = DEFAULT_EPS) -> float:
    """Share of samples with a non-empty ``L_i ∩ D`` (SPEC section 3b)."""
    _check_representations(h)
    if h.shape[0] == 0:
        raise ValueError("coverage needs at least one sample")
    d_mask = discriminative_mask(discriminative, h.shape[1]).to(h.device)
    active = dominant_mask(h, eps) & d_mask
    return float(active.any(dim=1).float().mean())
