"""ResNet encoders: output shapes, width scaling, fingerprints (SPEC notation)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from models.encoders.resnet import build_encoder
from models.encoders.spec import EncoderSpec, fingerprint


@pytest.mark.parametrize(
    ("overrides", "size", "r"),
    [
        ({"arch": "resnet18", "cifar_stem": True, "width": 8}, 32, 64),
        ({"arch": "resnet18", "cifar_stem": False, "width": 8}, 64, 64),
        ({"arch": "resnet18", "cifar_stem": True, "width": 64}, 32, 512),
        ({"arch": "resnet18", "cifar_stem": False, "width": 64}, 64, 512),
        ({"arch": "resnet50", "cifar_stem": True}, 32, 2048),
        ({"arch": "resnet50", "cifar_stem": False}, 64, 2048),
    ],
)
def test_encoder_outputs_pooled_representation(overrides, size, r):
    torch.manual_seed(0)
    encoder = build_encoder(**overrides).eval()
    assert encoder.feature_dim == r
    with torch.inference_mode():
        h = encoder(torch.randn(2, 3, size, size))
    assert h.shape == (2, r)
    assert h.dtype == torch.float32
    assert bool(torch.isfinite(h).all())
    # after the ReLU and average pool, h is non-negative
    assert bool((h >= 0).all())
    # no classifier: the state dict is torchvision's layout without fc
    keys = encoder.backbone_state_dict().keys()
    assert "conv1.weight" in keys and not any(k.startswith("fc.") for k in keys)


@pytest.mark.parametrize("width", [4, 8, 16])
def test_width_scales_channels(width):
    encoder = build_encoder(arch="resnet18", width=width).eval()
    sd = encoder.backbone_state_dict()
    assert sd["conv1.weight"].shape == (width, 3, 3, 3)
    assert sd["layer1.0.conv1.weight"].shape == (width, width, 3, 3)
    assert sd["layer4.1.conv2.weight"].shape == (8 * width, 8 * width, 3, 3)
    with torch.inference_mode():
        assert encoder(torch.randn(1, 3, 32, 32)).shape == (1, 8 * width)


def test_imagenet_stem_is_torchvision_resnet18():
    import torchvision

    encoder = build_encoder(arch="resnet18", cifar_stem=False, width=64)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    ours = encoder.backbone_state_dict()
    assert set(ours) == {k for k in reference if not k.startswith("fc.")}
    assert all(ours[k].shape == reference[k].shape for k in ours)


def test_spec_validation():
    with pytest.raises(ValidationError, match="width is only adjustable for resnet18"):
        EncoderSpec(arch="resnet50", width=32)
    with pytest.raises(ValidationError, match="greater than or equal to 4"):
        EncoderSpec(width=2)
    with pytest.raises(ValidationError):
        EncoderSpec(arch="vit")  # type: ignore[arg-type]
    assert EncoderSpec(arch="resnet50").feature_dim == 2048
    assert EncoderSpec(width=8).feature_dim == 64


def test_fingerprint_stable_and_sensitive(tiny_spec):
    torch.manual_seed(0)
    a = build_encoder(tiny_spec)
    torch.manual_seed(0)
    b = build_encoder(tiny_spec)
    fa = fingerprint(a.backbone_state_dict())
    assert len(fa) == 64
    assert fingerprint(b.backbone_state_dict()) == fa  # same seed, same weights
    assert fingerprint(a.backbone_state_dict()) == fa  # stable across calls
    # a copy loaded into another encoder has the same fingerprint
    c = build_encoder(tiny_spec)
    assert fingerprint(c.backbone_state_dict()) != fa
    c.load_backbone_state_dict(a.backbone_state_dict())
    assert fingerprint(c.backbone_state_dict()) == fa
    # one weight changes -> a different fingerprint
    with torch.no_grad():
        b.resnet.layer3[1].conv2.weight[0, 0, 0, 0] += 1e-6
    assert fingerprint(b.backbone_state_dict()) != fa
    # a running statistic counts too (it changes h in eval mode)
    with torch.no_grad():
        c.resnet.bn1.running_mean[0] += 1.0
    assert fingerprint(c.backbone_state_dict()) != fa


def test_fingerprint_sees_dtype_and_names():
    w = {"a": torch.zeros(2)}
    assert fingerprint(w) != fingerprint({"a": torch.zeros(2, dtype=torch.float64)})
    assert fingerprint(w) != fingerprint({"b": torch.zeros(2)})
    assert fingerprint(w) != fingerprint({"a": torch.zeros(1, 2)})
    # key order does not matter
    assert fingerprint({"a": torch.ones(1), "b": torch.zeros(1)}) == fingerprint(
        {"b": torch.zeros(1), "a": torch.ones(1)}
    )
