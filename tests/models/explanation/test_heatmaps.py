"""Heatmaps: channel maps are exact (their mean before upsampling is h_j), occlusion for ONNX
encoders (exact on a linear one), gradient x input elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from models.encoders.loading import load_encoder
from models.encoders.resnet import build_encoder
from models.encoders.spec import EncoderSpec
from models.encoders.timm_encoder import build_timm_encoder
from models.encoders.torchscript_encoder import load_torchscript
from models.explanation.heatmaps import OCCLUSION_BLOCKS, feature_maps, for_display, heatmap_method, upsample
from models.registry.versions import DEMO_DIR


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _bn_resnet(width: int = 8) -> nn.Module:
    """A seeded CIFAR ResNet-18 whose BatchNorm statistics are not the defaults, in eval mode."""
    torch.manual_seed(0)
    encoder = build_encoder(EncoderSpec(arch="resnet18", cifar_stem=True, width=width, image_size=32)).train()
    with torch.no_grad():
        for _ in range(2):
            encoder(torch.randn(4, 3, 32, 32) * 2 + 0.5)
    return encoder.eval()


def _assert_exact(encoder: nn.Module, x: torch.Tensor, features: torch.Tensor) -> None:
    maps = feature_maps(encoder, x, features)
    assert maps.method == "channel_map"
    with torch.inference_mode():
        h = encoder(x)  # the representation the scorer uses
    means = maps.maps.mean(dim=(-2, -1))  # before upsampling
    torch.testing.assert_close(means, h.gather(1, features), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps.h, h, rtol=1e-5, atol=1e-6)


def test_resnet_channel_maps_average_to_the_feature_value() -> None:
    encoder = _bn_resnet()
    x = _images(3, 32)
    features = torch.tensor([[0, 5, 63, 17], [1, 1, 2, 3], [60, 61, 62, 63]])
    _assert_exact(encoder, x, features)
    maps = feature_maps(encoder, x, features)
    assert maps.maps.shape == (3, 4, 4, 4)  # CIFAR stem: 32 -> 4x4 after layer4
    assert bool((maps.maps >= 0).all())  # layer4 ends in a ReLU


def test_demo_encoder_heatmaps_are_exact() -> None:
    encoder = load_encoder(DEMO_DIR / "demo-encoder.safetensors").encoder.eval()
    features = torch.arange(8).repeat(2, 1) * 16
    _assert_exact(encoder, _images(2, 32, seed=1), features)


def test_timm_cnn_with_mean_pooled_head_gets_exact_maps() -> None:
    torch.manual_seed(0)
    encoder = build_timm_encoder("test_resnet", None, source="random", image_size=32)
    assert heatmap_method(encoder) == "channel_map"
    _assert_exact(encoder, _images(2, 32), torch.tensor([[0, 95], [7, 40]]))


@pytest.mark.parametrize("name", ["test_convnext", "test_vit"])
def test_timm_models_whose_head_is_not_a_plain_mean_get_gradient_maps(name: str) -> None:
    torch.manual_seed(0)
    encoder = build_timm_encoder(name, None, source="random", image_size=32)
    assert heatmap_method(encoder) == "gradient_x_input"
    maps = feature_maps(encoder, _images(2, 32), torch.tensor([[0, 1], [2, 3]]))
    assert maps.method == "gradient_x_input" and maps.maps.shape == (2, 2, 32, 32)
    assert bool(torch.isfinite(maps.maps).all()) and float(maps.maps.abs().sum()) > 0


class _HomogeneousNet(nn.Module):
    """Bias-free convolutions, ReLU and a mean pool: positively homogeneous of degree 1 in x."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.b = nn.Conv2d(6, 5, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(torch.relu(self.a(x)))).mean(dim=(2, 3))


def test_gradient_x_input_sums_to_h_for_a_homogeneous_torchscript_encoder(tmp_path: Path) -> None:
    # Euler's theorem: for f(t x) = t f(x), sum_pixels x * df_j/dx = f_j(x): an exact check of the gradient path.
    torch.manual_seed(0)
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(_HomogeneousNet().eval()), str(path))
    encoder, _ = load_torchscript(path, image_size=16, mean=(0, 0, 0), std=(1, 1, 1))
    assert heatmap_method(encoder) == "gradient_x_input"
    x = _images(2, 16).abs()
    before = {k: v.clone() for k, v in encoder.module.state_dict().items()}
    maps = feature_maps(encoder, x, torch.tensor([[0, 4, 2], [1, 1, 3]]))
    with torch.inference_mode():
        h = encoder(x)
    torch.testing.assert_close(maps.maps.sum(dim=(-2, -1)), h.gather(1, torch.tensor([[0, 4, 2], [1, 1, 3]])))
    torch.testing.assert_close(maps.h, h)
    for name, value in encoder.module.state_dict().items():
        assert torch.equal(value, before[name])
    assert all(p.grad is None for p in encoder.module.parameters())


def test_feature_maps_refuse_bad_shapes_and_indices() -> None:
    encoder = _bn_resnet()
    with pytest.raises(ValueError, match=r"x must have shape \(N, 3, S, S\)"):
        feature_maps(encoder, torch.zeros(3, 32, 32), torch.zeros(1, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"features must have shape \(N=2, K\)"):
        feature_maps(encoder, _images(2, 32), torch.zeros(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"must lie in \[0, 64\)"):
        feature_maps(encoder, _images(1, 32), torch.tensor([[64]]))


def test_upsample_keeps_constant_maps_and_shapes() -> None:
    up = upsample(torch.full((2, 3, 4, 4), 2.5), 32)
    assert up.shape == (2, 3, 32, 32)
    torch.testing.assert_close(up, torch.full((2, 3, 32, 32), 2.5))
    same = torch.rand(5, 5)
    assert upsample(same, 5) is same


def test_for_display_pools_the_positive_part_of_gradient_maps_only() -> None:
    maps = torch.arange(2 * 32 * 32, dtype=torch.float32).view(2, 32, 32) - 1000
    shown = for_display(maps, "gradient_x_input")
    assert shown.shape == (2, 8, 8)  # blocks of 32 // DISPLAY_BLOCKS = 4 pixels
    torch.testing.assert_close(shown[1, 2, 3], maps[1, 8:12, 12:16].clamp(min=0).mean())
    assert float(shown[0, 0, 0]) == 0.0  # all negative there
    channel = torch.rand(3, 4, 4)
    assert for_display(channel, "channel_map") is channel


class _ChannelMeans(nn.Module):
    """h = (2 * mean of channel 0, 3 * mean of channel 1, mean of channel 2): linear, so hiding a
    block takes exactly that block's share of each mean away."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * torch.tensor([2.0, 3.0, 1.0])


def _onnx_encoder(module: nn.Module, path: Path, size: int):
    x = torch.rand(2, 3, size, size)
    program = torch.onnx.export(
        module, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False
    )
    program.save(str(path), external_data=False)
    return load_encoder(path, mean=(0, 0, 0), std=(1, 1, 1)).encoder


@pytest.mark.parametrize("size", [16, 20])  # 20: blocks of 2 and 3 pixels, still covering the image
def test_occlusion_maps_of_an_onnx_encoder_are_each_blocks_share_of_h(tmp_path: Path, size: int) -> None:
    encoder = _onnx_encoder(_ChannelMeans().eval(), tmp_path / "means.onnx", size)
    assert heatmap_method(encoder) == "occlusion"  # ONNX Runtime: no autograd
    x = _images(2, size, seed=3)
    features = torch.tensor([[0, 1, 2], [2, 2, 0]])
    maps = feature_maps(encoder, x, features)
    assert maps.method == "occlusion" and maps.maps.shape == (2, 3, OCCLUSION_BLOCKS, OCCLUSION_BLOCKS)
    weights = torch.tensor([2.0, 3.0, 1.0])
    edges = torch.linspace(0, size, OCCLUSION_BLOCKS + 1).round().long().tolist()
    for n in range(2):
        for k, j in enumerate(features[n].tolist()):
            want = (
                torch.tensor(
                    [
                        [float(x[n, j, edges[u] : edges[u + 1], edges[v] : edges[v + 1]].sum()) for v in range(8)]
                        for u in range(8)
                    ]
                )
                * weights[j]
                / size**2
            )
            torch.testing.assert_close(maps.maps[n, k], want, rtol=1e-4, atol=1e-5)
    # the blocks partition the image, so for a linear encoder the map adds up to h_j
    torch.testing.assert_close(maps.maps.sum(dim=(-2, -1)), maps.h.gather(1, features), rtol=1e-4, atol=1e-5)
