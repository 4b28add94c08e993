"""Simpler per-sample scores to hold Q-Score against (issue 5, item 4).

Every score is oriented so that higher means "more likely correctly classified", the
orientation :func:`models.evaluation.metrics.score_power` scores (positive class = correct). All but
the last are label-free: they need only the encoder's representations.
"""

from __future__ import annotations

import numpy as np
import torch

from models.scoring.qscore import q_score_parts


def hoyer_sparsity(h: torch.Tensor) -> torch.Tensor:
    """Hoyer's sparsity ``(sqrt(r) - L1/L2) / (sqrt(r) - 1)`` of each row of ``h`` (N, r); in [0, 1].

    1 for a one-hot row, 0 for a constant one; 0 for an all-zero row.
    """
    r = h.shape[1]
    l1 = h.abs().sum(dim=1)
    l2 = h.norm(dim=1)
    ratio = torch.where(l2 > 0, l1 / torch.where(l2 > 0, l2, torch.ones_like(l2)), torch.full_like(l2, r**0.5))
    return (r**0.5 - ratio) / (r**0.5 - 1)


def knn_distance(h: torch.Tensor, reference: torch.Tensor, k: int = 10, chunk: int = 2048) -> torch.Tensor:
    """Mean cosine distance of each row of ``h`` (N, r) to its ``k`` nearest ``reference`` rows (M, r)."""
    k = min(k, reference.shape[0])
    ref = torch.nn.functional.normalize(reference.float(), dim=1)
    out = []
    for part in torch.split(h.float(), chunk):
        sims = torch.nn.functional.normalize(part, dim=1) @ ref.T
        out.append(1.0 - sims.topk(k, dim=1).values.mean(dim=1))
    return torch.cat(out)


def label_free_scores(
    h: torch.Tensor, discriminative: torch.Tensor, eps: float, reference: torch.Tensor, k: int = 10
) -> dict[str, np.ndarray]:
    """Q-Score and the simpler scores for test representations ``h`` (N, r); each (N,).

    ``reference``: unlabelled train representations for the k-nearest-neighbour distance.
    """
    parts = q_score_parts(h, discriminative, eps)
    l1 = parts.l1_norm
    return {
        "q_score": parts.q_score.numpy(),
        # The Q-Score's denominator alone: a small norm (a sparse representation) scores high.
        "inverse_l1": torch.where(l1 > 0, 1.0 / torch.where(l1 > 0, l1, torch.ones_like(l1)), 0.0).numpy(),
        # The Q-Score's numerator alone: the mean of the dominant discriminative features.
        "mean_discriminative": parts.mean_active.numpy(),
        "max_activation": h.max(dim=1).values.numpy(),
        "hoyer_sparsity": hoyer_sparsity(h).numpy(),
        # Far from every reference representation = unusual = likely wrong: negate the distance.
        "neg_knn_distance": (-knn_distance(h, reference, k)).numpy(),
    }


#: Display names, in report order; ``max_softmax`` is the label-using reference point.
SCORE_NAMES: dict[str, str] = {
    "q_score": "Q-Score",
    "inverse_l1": "1 / L1 norm (Q's denominator alone)",
    "mean_discriminative": "mean of dominant discriminative features (Q's numerator alone)",
    "max_activation": "maximum activation",
    "hoyer_sparsity": "Hoyer sparsity",
    "neg_knn_distance": "minus mean cosine distance to k nearest train representations",
    "max_softmax": "probe's maximum softmax probability (uses labels)",
}
