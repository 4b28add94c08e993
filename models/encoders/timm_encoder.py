"""timm architectures as encoders: ``--arch timm:NAME`` plus a state dict in timm's layout.

The network is built by ``timm.create_model(NAME, pretrained=False, num_classes=0)``: nothing is
ever downloaded, and the classifier is dropped (its keys in the state dict are ignored). The
representation ``h`` is timm's pooled pre-logits features,
``forward_head(forward_features(x), pre_logits=True)`` (the CLS token or pooled tokens of a ViT,
the pooled and normalised map of a ConvNeXt, the pooled map of a ResNet). The preprocessing is
timm's data config for the model (``resolve_model_data_config``: input size, mean, std) unless
the caller overrides it; images are resized (short side) and centre-cropped to the input size.

``image_size`` other than the model's default is passed to timm as ``img_size`` where the
architecture takes one (ViTs: the position embedding is sized for it); convolutional networks
take any size as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

from models.encoders.checks import brought_spec, probed_spec
from models.encoders.errors import TimmError
from models.encoders.layouts import describe_key_mismatch, key_differences
from models.encoders.spec import TIMM_PREFIX, Encoder, EncoderSpec

#: Prefixes training frameworks put before a timm model's keys, most specific first.
_PREFIXES = ("module.model.", "module.backbone.", "module.", "model.", "backbone.", "encoder.", "")


class TimmEncoder(Encoder):
    """A timm model without its classifier: ``forward(x)`` is the pooled pre-logits (N, r)."""

    def __init__(self, model: nn.Module, spec: EncoderSpec) -> None:
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    def load_backbone_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(dict(state_dict), strict=True)


def create_timm_model(name: str, image_size: int | None = None) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0)``, at ``image_size`` where it applies."""

    if not timm.is_model(name):
        stem = name.split("_")[0][:8]
        close = timm.list_models(f"*{stem}*")[:6] if stem else []
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise TimmError(
            f"unknown timm architecture {name!r} (timm {timm.__version__}).{hint} List them with "
            f"python -c \"import timm; print(timm.list_models('*{stem or 'vit'}*'))\""
        )
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0}
    if image_size is not None:
        try:
            return timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError:  # the architecture takes no img_size: it runs at any size
            pass
    return timm.create_model(name, **kwargs)


def default_preprocessing(model: nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """timm's data config of ``model``: (input size, mean, std)."""

    config = resolve_model_data_config(model)
    return int(config["input_size"][-1]), tuple(config["mean"]), tuple(config["std"])


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return tuple(f"{n}." for n in names)


def fit_state_dict(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], name: str, source: str
) -> dict[str, torch.Tensor]:
    """``tensors`` renamed to ``model``'s keys; a :class:`TimmError` naming missing, unexpected and
    mis-shaped keys when they do not fit. Classifier keys are dropped (the model has none)."""

    expected = model.state_dict()
    heads = _classifier_prefixes(model)
    best: tuple[int, str, dict[str, torch.Tensor]] = (-1, "", {})
    for prefix in _PREFIXES:
        renamed = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        renamed = {k: v for k, v in renamed.items() if not (heads and k.startswith(heads))}
        score = sum(1 for k in renamed if k in expected)
        if score > best[0]:
            best = (score, prefix, renamed)
    _, prefix, state_dict = best
    missing, unexpected, mismatched = key_differences(state_dict, expected, "model")
    if missing or unexpected or mismatched:
        layout = f"prefix '{prefix}'" if prefix else "timm's layout"
        header = f"the weights in {source} (read with {layout}) do not fit timm architecture {name!r}."
        message = describe_key_mismatch(header, missing, unexpected, mismatched)
        if any("pos_embed" in m for m in mismatched):
            message += (
                "\nA mis-shaped pos_embed means the weights were made for another image size: pass that size "
                "with --image-size (e.g. 32 for a ViT trained on CIFAR images)."
            )
        raise TimmError(message)
    return {k: v.to(expected[k].dtype) for k, v in state_dict.items()}


def build_timm_encoder(
    name: str,
    tensors: Mapping[str, torch.Tensor] | None,
    *,
    source: str,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dim: int | None = None,
) -> TimmEncoder:
    """A timm encoder with ``tensors`` loaded (random when None), checked by a probe forward pass."""

    model = create_timm_model(name, image_size)
    if tensors is not None:
        model.load_state_dict(fit_state_dict(model, tensors, name, source), strict=True)
    model.eval()
    size, default_mean, default_std = default_preprocessing(model)
    spec = brought_spec(f"{TIMM_PREFIX}{name}", image_size or size, mean or default_mean, std or default_std,
                        error=TimmError, subject=f"timm architecture {name!r}")  # fmt: skip
    encoder = TimmEncoder(model, spec)
    encoder.spec = probed_spec(encoder, spec, dim, f"timm architecture {name!r}")
    return encoder
