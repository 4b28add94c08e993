"""Every label-free signal of a batch: what typicality and the risk model read.

Two steps: :func:`signal_tensors`, the arithmetic on the representations and pixels (torch; the
same function the ONNX signal graph is traced from, ``models/scoring/signal_graph.py``), then
:func:`finish_signals`, what the feature set's fitted models add on the host (numpy).
"""

from __future__ import annotations

import numpy as np
import torch

from models.scoring.bank import ReferenceBank
from models.scoring.qscore import QScoreParts
from models.scoring.typicality import DEFAULT_K, TypicalityModel
from models.scoring.typicality import signals as typicality_signals


def signal_tensors(
    h: torch.Tensor,
    pixels: torch.Tensor | dict[str, torch.Tensor] | None,
    parts: QScoreParts,
    typicality: TypicalityModel | None,
    bank: ReferenceBank | None,
) -> dict[str, torch.Tensor]:
    """The label-free signals that are arithmetic on ``h`` and the pixels, each a (B,) tensor.

    The Q-Score and its mean of dominant discriminative features (``parts``), the
    representation's norm and sparsity signals, the k-NN distance and prototype confidences
    (with a bank) and the pixel statistics (with ``pixels`` in [0, 1]).
    """
    k = typicality.k if typicality is not None else DEFAULT_K
    usable_bank = bank if bank is not None and bank.size > k else None
    out = typicality_signals(h, usable_bank, k, pixels=pixels)
    out["q_score"] = parts.q_score
    out["mean_active"] = parts.mean_active
    return out


def finish_signals(signals: dict[str, np.ndarray], typicality: TypicalityModel | None) -> dict[str, np.ndarray]:
    """``signals`` plus ``typicality`` and ``log_typicality`` when its model and all its inputs are there."""
    if typicality is not None and set(typicality.components) <= set(signals):
        signals["typicality"] = typicality.typicality(signals)
        # The risk model reads it on a log scale: gross inputs reach typicalities of thousands.
        signals["log_typicality"] = np.log1p(np.maximum(signals["typicality"], 0.0))
    return signals
