"""ResNet encoders that return the pooled representation ``h`` (SPEC, notation).

The networks are torchvision's own (``torchvision.models.ResNet``); an encoder is a ResNet whose
``fc`` is the identity, so ``encoder(x)`` is ``h``, of shape (N, r), and its state dict keeps
torchvision's key layout (``conv1.weight``, ``layer1.0.conv1.weight``, ...), the layout every
imported checkpoint is converted to.

Beyond the paper's ResNet-18/50: ``width`` scales the channel counts of ResNet-18 (64 is
torchvision's), so the project can ship a demo encoder of a few MB that trains on a CPU.

Encoders people bring are described by the same :class:`EncoderSpec`: ``arch`` is
``"torchscript"`` (a TorchScript module, ``models/torchscript_encoders.py``) or ``"timm:NAME"``
(a timm architecture, ``models/timm_encoders.py``); their feature dimension ``dim`` is found by a
probe forward pass (``models/probe.py``). Every encoder is an :class:`EncoderBase`: ``forward(x)``
is ``h`` (N, r), ``spec`` says how to feed it, ``backbone_state_dict()`` is what is fingerprinted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Literal

import torch
import torchvision
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

BUILTIN_ARCHS = ("resnet18", "resnet50")
TORCHSCRIPT_ARCH = "torchscript"
TIMM_PREFIX = "timm:"
Source = Literal["torchvision", "torchscript", "timm"]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LAYERS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}


def parse_rgb(text: str | None, name: str) -> tuple[float, float, float] | None:
    """``"0.485,0.456,0.406"`` (a --mean or --std flag) to a triple; None stays None."""
    if text is None:
        return None
    try:
        values = tuple(float(p) for p in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ValueError(f"{name} takes three comma-separated numbers R,G,B (e.g. 0.5,0.5,0.5), got {text!r}")
    return values  # type: ignore[return-value]


def spec_errors(exc: ValueError) -> str:
    """A pydantic validation error of a spec as one short line (its messages, ``; ``-joined)."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors())


class EncoderSpec(BaseModel):
    """What it takes to rebuild an encoder and feed it: saved beside its weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = "resnet18"
    cifar_stem: bool = True
    width: int = Field(default=64, ge=4)
    image_size: int = Field(default=32, ge=8)
    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD
    #: Feature dimension of a TorchScript or timm encoder, found by a probe forward pass.
    dim: int | None = Field(default=None, gt=0)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        if value in BUILTIN_ARCHS or value == TORCHSCRIPT_ARCH:
            return value
        if value.startswith(TIMM_PREFIX) and len(value) > len(TIMM_PREFIX):
            return value
        raise ValueError(
            f"unknown architecture {value!r}: expected one of {', '.join(BUILTIN_ARCHS)}, "
            f"{TORCHSCRIPT_ARCH!r} or 'timm:NAME' (a timm model name, e.g. timm:vit_small_patch16_224)"
        )

    @field_validator("std")
    @classmethod
    def _positive_std(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(v > 0 for v in value):
            raise ValueError(f"std must be positive for every channel, got {value}")
        return value

    @model_validator(mode="after")
    def _width_only_for_resnet18(self) -> EncoderSpec:
        if self.arch != "resnet18" and self.width != 64:
            raise ValueError(f"width is only adjustable for resnet18, got width={self.width} for {self.arch}")
        if self.source != "torchvision" and self.dim is None:
            raise ValueError(f"a {self.arch} encoder needs its feature dimension (dim), found by a probe forward")
        return self

    @property
    def source(self) -> Source:
        if self.arch == TORCHSCRIPT_ARCH:
            return "torchscript"
        if self.arch.startswith(TIMM_PREFIX):
            return "timm"
        return "torchvision"

    @property
    def feature_dim(self) -> int:
        if self.source != "torchvision":
            assert self.dim is not None  # checked by the validator
            return self.dim
        expansion = _LAYERS[self.arch][0].expansion
        return self.width * 8 * expansion


class EncoderBase(nn.Module):
    """What every encoder offers: ``forward(x)`` is ``h`` (N, r); ``spec`` says how to feed it."""

    spec: EncoderSpec

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that define the encoder (what :func:`fingerprint` hashes)."""
        raise NotImplementedError

    def load_backbone_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def not_trainable_reason(self) -> str | None:
        """Why ``regularize`` cannot fine-tune this encoder, or None when it can."""
        return None


class Encoder(EncoderBase):
    """A torchvision ResNet without its classifier: ``forward(x)`` is ``h``, (N, r)."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        if spec.source != "torchvision":
            raise ValueError(f"Encoder builds torchvision ResNets; {spec.arch} is loaded by models.checkpoints")
        self.spec = spec
        self.resnet = _build_resnet(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet(x)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in torchvision's key layout (no ``resnet.`` prefix, no ``fc``)."""
        return dict(self.resnet.state_dict())

    def load_backbone_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.resnet.load_state_dict(state_dict, strict=True)


def build_encoder(spec: EncoderSpec | None = None, **overrides: object) -> Encoder:
    """A freshly initialised encoder, e.g. ``build_encoder(arch="resnet50", cifar_stem=False)``."""
    spec = spec or EncoderSpec()
    if overrides:
        spec = EncoderSpec.model_validate({**spec.model_dump(), **overrides})
    return Encoder(spec)


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


def fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of the weights, in key order.

    Feature sets record it, and the service refuses a feature set found on other weights.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
