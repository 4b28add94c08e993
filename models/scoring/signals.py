"""Every label-free signal of a batch: what typicality and the risk model read."""

from __future__ import annotations

import numpy as np
import torch

from models.scoring.bank import ReferenceBank
from models.scoring.qscore import QScoreParts
from models.scoring.typicality import DEFAULT_K, TypicalityModel
from models.scoring.typicality import signals as typicality_signals


def label_free_signals(
    h: torch.Tensor,
    pixels: torch.Tensor | dict[str, torch.Tensor] | None,
    parts: QScoreParts,
    typicality: TypicalityModel | None,
    bank: ReferenceBank | None,
) -> dict[str, np.ndarray]:
    """Every label-free signal of a batch, as (B,) arrays: what the risk model may use.

    The Q-Score and its mean of dominant discriminative features (``parts``), the
    representation's norm and sparsity signals, the k-NN distance and prototype confidences
    (with a bank), the pixel statistics (with ``pixels`` in [0, 1]) and ``typicality`` (when
    its model and all its inputs are there).
    """
    k = typicality.k if typicality is not None else DEFAULT_K
    usable_bank = bank if bank is not None and bank.size > k else None
    sig = typicality_signals(h, usable_bank, k, pixels=pixels)
    out = {name: t.cpu().numpy() for name, t in sig.items()}
    out["q_score"] = parts.q_score.cpu().numpy()
    out["mean_active"] = parts.mean_active.cpu().numpy()
    if typicality is not None and set(typicality.components) <= set(out):
        out["typicality"] = typicality.typicality(out)
        # The risk model reads it on a log scale: gross inputs reach typicalities of thousands.
        out["log_typicality"] = np.log1p(np.maximum(out["typicality"], 0.0))
    return out
