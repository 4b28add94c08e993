"""One image explained: its verdict, its Q-Score decomposed and heatmaps of its top features.

What ``POST /explain`` and ``qscore explain`` return. The verdict is the scorer's own
(:meth:`Scorer.infer` then :meth:`Scorer.postprocess`: the numbers ``/score`` gives), the
decomposition is computed from the same representation, and the heatmaps come from a second
forward pass (``channel_map``) or a forward and backward pass (``gradient_x_input``) of the
same input, at most :data:`MAX_TOP` features an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.explanation.decompose import Contribution, Decomposition, decompose, feature_groups, ranked_features
from models.explanation.heatmaps import FeatureMaps, Method, feature_maps, for_display, heatmap_method
from models.explanation.render import enlarged, overlay, png_base64
from models.explanation.why import VerdictWhy, why
from models.scoring.result import ImageScore
from models.scoring.scorer import Scorer

#: Most heatmaps one explanation draws: each costs a backward pass on gradient encoders.
MAX_TOP = 8
DEFAULT_TOP = 3


@dataclass(frozen=True)
class FeatureHeatmap:
    """A feature of the image and its map before upsampling, (h', w') float32."""

    feature: Contribution
    map: torch.Tensor


@dataclass(frozen=True)
class Explanation:
    score: ImageScore
    decomposition: Decomposition
    method: Method
    image: np.ndarray  # (S, S, 3) uint8: what the encoder saw (resized, centre-cropped)
    heatmaps: tuple[FeatureHeatmap, ...]
    why: VerdictWhy  # why the typicality and the risk are what they are

    def overlays(self, size: int | None = None) -> list[Any]:
        """One PIL overlay per heatmap, ``size`` pixels wide (default: the encoder's input size)."""
        size = size or self.image.shape[0]
        return [overlay(self.image, for_display(hm.map, self.method), size) for hm in self.heatmaps]

    def row(self, *, arrays: bool = False, pictures: bool = True, size: int | None = None) -> dict[str, Any]:
        """The JSON form: ``score`` (the fields of a /score result), ``decomposition``, ``why``
        (the typicality's components and the risk's terms), ``heatmaps``.

        ``pictures``: PNGs as base64 (the input as the encoder saw it, and each overlay, ``size``
        pixels wide, default the input size: a browser scales them); ``arrays``: each map
        before upsampling as nested lists (``map``), e.g. to check that a ``channel_map``
        averages to the feature's value.
        """
        image_size = self.image.shape[0]
        size = size or image_size
        pictures_of = self.overlays(size) if pictures else [None] * len(self.heatmaps)
        features = []
        for hm, picture in zip(self.heatmaps, pictures_of, strict=True):
            entry: dict[str, Any] = hm.feature.row()
            entry["map_shape"] = list(hm.map.shape)
            entry["map_max"] = float(hm.map.max()) if hm.map.numel() else 0.0
            entry["png"] = None if picture is None else png_base64(picture)
            entry["map"] = hm.map.tolist() if arrays else None
            features.append(entry)
        return {
            "score": self.score.row(),
            "decomposition": self.decomposition.row(),
            "why": self.why.row(),
            "heatmaps": {
                "method": self.method,
                "image_size": image_size,
                "png_size": size,
                "image_png": png_base64(enlarged(self.image, size)) if pictures else None,
                "features": features,
            },
        }


class Explainer:
    """Explanations with a :class:`Scorer`'s encoder and feature set (thread-safe: no state per call)."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        fs = scorer.feature_set
        self.groups = feature_groups(fs.counts, fs.discriminative)
        self.method = heatmap_method(scorer.encoder)
        spec = scorer.encoder.spec
        self._mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)

    def maps_of(self, pixels: np.ndarray, features: list[int]) -> FeatureMaps:
        """The heatmaps of ``features`` in one image (``pixels``: (S, S, 3) uint8), whatever their rank."""
        x = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0).float().div(255)
        x = ((x - self._mean) / self._std).to(self.scorer.device)
        return feature_maps(self.scorer.encoder, x, torch.tensor([features], dtype=torch.int64))

    def explain(self, pixels: np.ndarray, top: int = DEFAULT_TOP) -> Explanation:
        """``pixels``: (S, S, 3) uint8 from :meth:`Scorer.preprocess`; ``top``: 1..MAX_TOP heatmaps."""
        if not 1 <= top <= MAX_TOP:
            raise ValueError(f"top must be between 1 and {MAX_TOP}, got {top}")
        scorer = self.scorer
        inference = scorer.infer([pixels])
        verdict = scorer.postprocess(inference, features=True)[0]
        reasons = why(scorer.feature_set, scorer.signals(inference)[1])
        fs = scorer.feature_set
        h = inference.h.detach().float().cpu()
        decomposition = decompose(h, fs.discriminative_indices, self.groups, fs.eps)[0]
        chosen = ranked_features(decomposition, h[0].numpy(), self.groups, top)
        maps = self.maps_of(pixels, [c.index for c in chosen])
        heatmaps = tuple(FeatureHeatmap(c, maps.maps[0, k]) for k, c in enumerate(chosen))
        return Explanation(verdict, decomposition, maps.method, np.asarray(pixels, dtype=np.uint8), heatmaps, reasons)
