"""Self-supervised objectives: SimCLR, MoCo v2, BYOL and SwAV on lightly's heads and losses.

One small class per method on :class:`SSLMethod`, found through :data:`METHODS`. Each takes
the two augmented views of a batch and returns its loss and the representations ``h`` of both
views, (2B, r), on which the Q-Score regulariser (paper eq. 4) acts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import ClassVar

import torch
from lightly.loss import NegativeCosineSimilarity, NTXentLoss, SwaVLoss
from lightly.models.modules import (
    BYOLPredictionHead,
    BYOLProjectionHead,
    MoCoProjectionHead,
    SimCLRProjectionHead,
    SwaVProjectionHead,
    SwaVPrototypes,
)
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
    MoCoV2Transform,
    SimCLRTransform,
    SwaVTransform,
)
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from models.encoders.resnet import ResNetEncoder
from models.encoders.spec import EncoderSpec


def _normalize(spec: EncoderSpec) -> dict[str, list[float]]:
    return {"mean": list(spec.mean), "std": list(spec.std)}


def _blur(spec: EncoderSpec) -> float:
    # Blur hurts at 32x32 (SimCLR paper, CIFAR appendix); keep lightly's default otherwise.
    return 0.0 if spec.image_size <= 64 else 0.5


class SSLMethod(nn.Module):
    """A self-supervised method: an encoder, its heads, its loss and its two-view transform."""

    name: ClassVar[str]

    def __init__(self, encoder: ResNetEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    @staticmethod
    def view_transform(spec: EncoderSpec) -> Callable:
        raise NotImplementedError

    def forward_views(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and ``h`` (2B, r) for the two views ``views[0]``, ``views[1]`` (B, 3, H, W)."""
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Momentum updates and the like, with training ``progress`` in [0, 1]."""


class SimCLR(SSLMethod):
    name = "simclr"

    def __init__(self, encoder: ResNetEncoder, temperature: float = 0.5, projection_dim: int = 128) -> None:
        super().__init__(encoder)
        r = encoder.feature_dim
        self.projection_head = SimCLRProjectionHead(r, r, projection_dim)
        self.criterion = NTXentLoss(temperature=temperature)

    @staticmethod
    def view_transform(spec: EncoderSpec) -> Callable:
        return SimCLRTransform(input_size=spec.image_size, gaussian_blur=_blur(spec), normalize=_normalize(spec))

    def forward_views(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(torch.cat(views[:2]))
        z0, z1 = self.projection_head(h).chunk(2)
        return self.criterion(z0, z1), h


class MoCoV2(SSLMethod):
    name = "moco_v2"

    def __init__(
        self,
        encoder: ResNetEncoder,
        temperature: float = 0.2,
        queue_size: int = 4096,
        projection_dim: int = 128,
        momentum: tuple[float, float] = (0.99, 1.0),
    ) -> None:
        super().__init__(encoder)
        r = encoder.feature_dim
        self.projection_head = MoCoProjectionHead(r, r, projection_dim)
        self.encoder_momentum = copy.deepcopy(encoder)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.encoder_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NTXentLoss(temperature=temperature, memory_bank_size=(queue_size, projection_dim))
        self.momentum = momentum

    @staticmethod
    def view_transform(spec: EncoderSpec) -> Callable:
        return MoCoV2Transform(input_size=spec.image_size, gaussian_blur=_blur(spec), normalize=_normalize(spec))

    def forward_views(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h_query = self.encoder(views[0])
        query = self.projection_head(h_query)
        with torch.no_grad():
            key = self.projection_head_momentum(self.encoder_momentum(views[1]))
        # The key view's h comes from the momentum encoder, so only the query's h is regularised.
        return self.criterion(query, key), h_query

    def after_step(self, progress: float) -> None:
        m = cosine_schedule(int(progress * 1000), 1000, *self.momentum)
        update_momentum(self.encoder, self.encoder_momentum, m)
        update_momentum(self.projection_head, self.projection_head_momentum, m)


class BYOL(SSLMethod):
    name = "byol"

    def __init__(
        self,
        encoder: ResNetEncoder,
        projection_dim: int = 256,
        hidden_dim: int = 1024,
        momentum: tuple[float, float] = (0.99, 1.0),
    ) -> None:
        super().__init__(encoder)
        r = encoder.feature_dim
        self.projection_head = BYOLProjectionHead(r, hidden_dim, projection_dim)
        self.prediction_head = BYOLPredictionHead(projection_dim, hidden_dim, projection_dim)
        self.encoder_momentum = copy.deepcopy(encoder)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.encoder_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()
        self.momentum = momentum

    @staticmethod
    def view_transform(spec: EncoderSpec) -> Callable:
        blur = _blur(spec)
        return BYOLTransform(
            view_1_transform=BYOLView1Transform(
                input_size=spec.image_size, gaussian_blur=blur, normalize=_normalize(spec)
            ),
            view_2_transform=BYOLView2Transform(
                input_size=spec.image_size, gaussian_blur=blur * 0.1, normalize=_normalize(spec)
            ),
        )

    def forward_views(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(torch.cat(views[:2]))
        p0, p1 = self.prediction_head(self.projection_head(h)).chunk(2)
        with torch.no_grad():
            t0, t1 = self.projection_head_momentum(self.encoder_momentum(torch.cat(views[:2]))).chunk(2)
        loss = 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))
        return loss, h

    def after_step(self, progress: float) -> None:
        m = cosine_schedule(int(progress * 1000), 1000, *self.momentum)
        update_momentum(self.encoder, self.encoder_momentum, m)
        update_momentum(self.projection_head, self.projection_head_momentum, m)


class SwAV(SSLMethod):
    name = "swav"

    def __init__(
        self, encoder: ResNetEncoder, n_prototypes: int = 512, projection_dim: int = 128, temperature: float = 0.1
    ) -> None:
        super().__init__(encoder)
        r = encoder.feature_dim
        self.projection_head = SwaVProjectionHead(r, r, projection_dim)
        self.prototypes = SwaVPrototypes(projection_dim, n_prototypes=n_prototypes)
        self.criterion = SwaVLoss(temperature=temperature)

    @staticmethod
    def view_transform(spec: EncoderSpec) -> Callable:
        # Two global crops only: multi-crop's small crops make little sense at 32x32.
        return SwaVTransform(
            crop_sizes=(spec.image_size,),
            crop_counts=(2,),
            crop_min_scales=(0.14,),
            crop_max_scales=(1.0,),
            gaussian_blur=_blur(spec),
            normalize=_normalize(spec),
        )

    def forward_views(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        self.prototypes.normalize()
        h = self.encoder(torch.cat(views[:2]))
        z = nn.functional.normalize(self.projection_head(h), dim=1)
        p0, p1 = self.prototypes(z).chunk(2)
        # lightly's SwaVLoss returns shape (1,); the other objectives return a scalar.
        return self.criterion([p0, p1], []).reshape(()), h


METHODS: dict[str, type[SSLMethod]] = {cls.name: cls for cls in (SimCLR, MoCoV2, BYOL, SwAV)}


def build_method(name: str, encoder: ResNetEncoder) -> SSLMethod:
    try:
        return METHODS[name](encoder)
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None
