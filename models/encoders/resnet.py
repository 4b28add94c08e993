"""The built-in encoders: torchvision ResNets (CIFAR stem and width options) as :class:`ResNetEncoder`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from models.encoders.spec import Encoder, EncoderSpec


class ResNetEncoder(Encoder):
    """A torchvision ResNet without its classifier: ``forward(x)`` is ``h``, (N, r)."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        if spec.source != "torchvision":
            raise ValueError(f"ResNetEncoder builds torchvision ResNets; {spec.arch} is loaded by models.encoders.loading")
        self.spec = spec
        self.resnet = _build_resnet(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet(x)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in torchvision's key layout (no ``resnet.`` prefix, no ``fc``)."""
        return dict(self.resnet.state_dict())

    def load_backbone_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.resnet.load_state_dict(state_dict, strict=True)


def build_encoder(spec: EncoderSpec | None = None, **overrides: object) -> ResNetEncoder:
    """A freshly initialised encoder, e.g. ``build_encoder(arch="resnet50", cifar_stem=False)``."""
    spec = spec or EncoderSpec()
    if overrides:
        spec = EncoderSpec.model_validate({**spec.model_dump(), **overrides})
    return ResNetEncoder(spec)


def _build_resnet(spec: EncoderSpec) -> torchvision.models.ResNet:
    if spec.arch == "resnet50":
        net = torchvision.models.resnet50(weights=None)
    elif spec.width == 64:
        net = torchvision.models.resnet18(weights=None)
    else:
        net = _narrow_resnet18(spec.width)
    if spec.cifar_stem:
        # CIFAR variant (SimCLR paper, solo-learn): 32x32 inputs keep their resolution.
        net.conv1 = nn.Conv2d(3, spec.width, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def _narrow_resnet18(width: int) -> torchvision.models.ResNet:
    """torchvision's ResNet-18 with channels ``width, 2w, 4w, 8w`` instead of 64..512.

    torchvision hard-codes 64 channels for BasicBlock ResNets, so this re-runs its own layer
    factory with other widths; blocks, initialisation and forward stay torchvision's.
    """
    net = torchvision.models.resnet18(weights=None)
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(BasicBlock, width, 2)
    net.layer2 = net._make_layer(BasicBlock, width * 2, 2, stride=2)
    net.layer3 = net._make_layer(BasicBlock, width * 4, 2, stride=2)
    net.layer4 = net._make_layer(BasicBlock, width * 8, 2, stride=2)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return net
