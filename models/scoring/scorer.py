"""Scoring images with an encoder and its feature set: what ``/score`` and ``qscore score`` return."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from models.data.transforms import eval_transform
from models.encoders.device import resolve_device
from models.encoders.resnet import ResNetEncoder
from models.encoders.runtime import Runtime
from models.scoring.feature_set import FeatureSet, preprocessing_mismatch
from models.scoring.qscore import QScoreParts, discriminative_mask, q_score_parts
from models.scoring.result import FeatureValue, ImageScore, reasons_of
from models.scoring.signals import label_free_signals

PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class FeatureSetMismatch(ValueError):
    """A feature set found on other weights than the encoder's."""


class Scorer:
    """An encoder on a device with its discriminative feature set, ready to score batches.

    ``precision`` other than float32 runs the encoder under autocast on a GPU only; the
    Q-Score itself is always computed in float32. ``runtime`` says what runs the encoder
    (torch by default; ONNX Runtime: ``models/encoders/runtime.py``).
    """

    def __init__(
        self,
        encoder: ResNetEncoder,
        encoder_fingerprint: str,
        feature_set: FeatureSet,
        device: str = "auto",
        precision: str = "float32",
        runtime: Runtime | None = None,
    ) -> None:
        if feature_set.encoder.fingerprint != encoder_fingerprint:
            raise FeatureSetMismatch(
                f"the feature set was found on encoder {feature_set.encoder.fingerprint[:12]}, "
                f"not on this one ({encoder_fingerprint[:12]})"
            )
        mismatch = preprocessing_mismatch(encoder.spec, feature_set)
        if mismatch is not None:
            raise FeatureSetMismatch(mismatch)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.device = resolve_device(device)
        if precision != "float32" and self.device.type != "cuda":
            raise ValueError(f"precision {precision} is only supported on a CUDA device")
        self.precision = precision
        self.encoder = encoder.to(self.device).eval()
        self.engine = (runtime or Runtime()).engine(self.encoder, encoder_fingerprint, self.device, precision)
        self.fingerprint = encoder_fingerprint
        self.feature_set = feature_set
        self.transform = eval_transform(encoder.spec)
        # eval_transform split in two for batches: the geometry per image (Pillow), then
        # ToTensor and Normalize for a whole batch at once, the same elementwise operations.
        size = encoder.spec.image_size
        self.geometry = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])
        self._mean = torch.tensor(encoder.spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(encoder.spec.std, dtype=torch.float32).view(1, 3, 1, 1)
        # A boolean mask built once on the device: indices would be range-checked on the host
        # (a GPU sync) on every batch.
        self.discriminative = discriminative_mask(feature_set.discriminative_indices, encoder.feature_dim).to(
            self.device
        )
        # Typicality: the bank on the serving device; pixel statistics need the inputs in [0, 1].
        self.typicality = feature_set.typicality
        self.bank = None
        if feature_set.bank is not None:
            self.bank = feature_set.bank.to(self.device)
        elif self.typicality is not None and self.typicality.needs_bank:
            raise ValueError("the feature set's typicality needs its reference bank, which was not loaded")
        spec = getattr(encoder, "spec", None)
        mean, std = getattr(spec, "mean", None), getattr(spec, "std", None)
        self._unnormalise = None
        if mean is not None and std is not None:
            self._unnormalise = (
                torch.tensor(std, device=self.device).view(1, -1, 1, 1),
                torch.tensor(mean, device=self.device).view(1, -1, 1, 1),
            )

    @property
    def bank_bytes(self) -> int:
        """Bytes of the reference bank on the serving device (0 without one)."""
        return 0 if self.bank is None else self.bank.nbytes

    def pixels(self, batch: torch.Tensor) -> torch.Tensor:
        """The encoder's inputs (B, 3, H, W) back in [0, 1] (normalisation undone)."""
        x = batch.to(self.device, torch.float32)
        if self._unnormalise is None:
            return x
        std, mean = self._unnormalise
        return x * std + mean

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image to the encoder's (3, H, W) input."""
        return self.transform(image)

    def prepare(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image resized and cropped: (H, W, 3) uint8, for :meth:`inputs`."""
        return np.asarray(self.geometry(image), dtype=np.uint8)

    def inputs(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """:meth:`prepare` outputs to the encoder's (B, 3, H, W) input, bit for bit what
        :meth:`preprocess` gives image by image (ToTensor, then Normalize), on the device.

        On a GPU the uint8 batch crosses from pinned memory (a quarter of the float bytes).
        """
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        x = batch.contiguous().to(dtype=torch.float32).div(255)
        return x.sub_(self._mean.to(x.device)).div_(self._std.to(x.device))

    def score_prepared(self, images: Sequence[np.ndarray], features: bool | Sequence[bool] = True) -> list[ImageScore]:
        """Score :meth:`prepare` outputs as one batch."""
        return self.score_batch(self.inputs(images), features)

    def representations(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) inputs to (B, r) float32 representations."""
        with torch.inference_mode():
            x = batch.to(self.device, non_blocking=True)
            if self.precision == "float32":
                return self.engine(x).float()
            with torch.autocast("cuda", dtype=PRECISIONS[self.precision]):
                return self.engine(x).float()

    def signals(self, h: torch.Tensor, pixels: torch.Tensor | None, parts: QScoreParts) -> dict[str, np.ndarray]:
        if self.typicality is None and self.feature_set.risk_model is None:
            # Nothing uses the other signals: the Q-Score's alone, as before typicality existed.
            return {"q_score": parts.q_score.cpu().numpy(), "mean_active": parts.mean_active.cpu().numpy()}
        return label_free_signals(h, pixels, parts, self.typicality, self.bank)

    def score_representations(
        self, h: torch.Tensor, features: bool | Sequence[bool] = True, pixels: torch.Tensor | None = None
    ) -> list[ImageScore]:
        """(B, r) representations to one :class:`ImageScore` each.

        ``features``: list the dominant and active discriminative features of every image
        (True), of none (False), or of the images flagged in a sequence of B booleans.
        ``pixels``: the inputs (B, 3, H, W) in [0, 1], for typicality's pixel statistics.
        """
        fs = self.feature_set
        wanted = [features] * h.shape[0] if isinstance(features, bool) else list(features)
        parts = q_score_parts(h, self.discriminative, fs.eps)
        sig = self.signals(h, pixels, parts)
        q = sig["q_score"]
        risk = fs.risk(sig)
        if risk is not None:
            risk = np.clip(risk, 0.0, 1.0)  # once for the batch: per image it costs more than the forward
        typ = sig.get("typicality")
        l1 = parts.l1_norm.cpu().numpy()
        if any(wanted):
            h_cpu, dominant, active = h.cpu(), parts.dominant.cpu(), parts.active.cpu()
        out = []
        for i in range(h.shape[0]):
            low = bool(q[i] < fs.alpha)
            atypical = None if typ is None else bool(typ[i] > 1.0)
            out.append(
                ImageScore(
                    q_score=float(q[i]),
                    low_quality=low,
                    risk=None if risk is None else float(risk[i]),
                    l1_norm=float(l1[i]),
                    dominant=_values(h_cpu[i], dominant[i]) if wanted[i] else None,
                    discriminative_active=_values(h_cpu[i], active[i]) if wanted[i] else None,
                    typicality=None if typ is None else float(typ[i]),
                    atypical=atypical,
                    reasons=reasons_of(low, atypical),
                )
            )
        return out

    def score_batch(self, batch: torch.Tensor, features: bool | Sequence[bool] = True) -> list[ImageScore]:
        """Scores of a batch of encoder inputs (B, 3, H, W), as ``preprocess``/``inputs`` make them."""
        return self.score_representations(self.representations(batch), features, self.pixels(batch))


def _values(h: torch.Tensor, mask: torch.Tensor) -> list[FeatureValue]:
    idx = torch.nonzero(mask).flatten().tolist()
    return [FeatureValue(j, float(h[j])) for j in idx]
