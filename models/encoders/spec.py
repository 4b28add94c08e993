"""ResNet encoders that return the pooled representation ``h`` (SPEC, notation).

The networks are torchvision's own (``torchvision.models.ResNet``); an encoder is a ResNet whose
``fc`` is the identity, so ``encoder(x)`` is ``h``, of shape (N, r), and its state dict keeps
torchvision's key layout (``conv1.weight``, ``layer1.0.conv1.weight``, ...), the layout every
imported checkpoint is converted to.

Beyond the paper's ResNet-18/50: ``width`` scales the channel counts of ResNet-18 (64 is
torchvision's), so the project can ship a demo encoder of a few MB that trains on a CPU.

Encoders people bring are described by the same :class:`EncoderSpec`: ``arch`` is
``"torchscript"`` (a TorchScript module, ``models/encoders/torchscript_encoder.py``), ``"onnx"`` (an ONNX
model run by ONNX Runtime, ``models/encoders/onnx_encoder.py``), ``"torch_export"`` (a ``torch.export``
program, ``models/encoders/export_program.py``) or ``"timm:NAME"`` (a timm architecture,
``models/encoders/timm_encoder.py``); their feature dimension ``dim`` is found by a probe forward
pass (``models/encoders/checks.py``). Every encoder is an :class:`Encoder`: ``forward(x)`` is ``h``
(N, r), ``spec`` says how to feed it, ``backbone_state_dict()`` is what is fingerprinted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

BUILTIN_ARCHS = ("resnet18", "resnet50")


TORCHSCRIPT_ARCH = "torchscript"


ONNX_ARCH = "onnx"


EXPORT_ARCH = "torch_export"


#: Encoders kept as the file they came in (registry: byte for byte), each with its own loader.
FILE_ARCHS = (TORCHSCRIPT_ARCH, ONNX_ARCH, EXPORT_ARCH)


TIMM_PREFIX = "timm:"


Source = Literal["torchvision", "torchscript", "onnx", "torch_export", "timm"]


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
        if value in BUILTIN_ARCHS or value in FILE_ARCHS:
            return value
        if value.startswith(TIMM_PREFIX) and len(value) > len(TIMM_PREFIX):
            return value
        raise ValueError(
            f"unknown architecture {value!r}: expected one of {', '.join(BUILTIN_ARCHS)}, "
            f"{', '.join(repr(a) for a in FILE_ARCHS)} or 'timm:NAME' (a timm model name, e.g. "
            "timm:vit_small_patch16_224)"
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
        if self.arch in FILE_ARCHS:
            return self.arch  # type: ignore[return-value]
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


class Encoder(nn.Module):
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
