"""Where a feature fires in the image: one spatial map per (image, feature) pair.

Three methods (FIELD-NOTES, "Explaining a score per image"):

- ``channel_map`` (exact, one forward pass): for a CNN whose representation is the spatial mean
  of its last feature map, ``h_j = mean_{u,v} A_j[u, v]`` with ``A`` the (r, h', w') map, so
  channel ``j`` of ``A`` *is* feature ``j`` laid out over the image (class activation mapping,
  Zhou et al., CVPR 2016, without the classifier). Used for :class:`ResNetEncoder` (torchvision:
  ``avgpool`` of ``layer4``) and for timm models whose ``forward_head(..., pre_logits=True)`` is
  the plain average of ``forward_features`` (checked once per encoder on a probe input: true for
  timm ResNets, not for ConvNeXt, whose head normalises after pooling, nor for ViTs).
- ``gradient_x_input`` for every other encoder that torch can differentiate (ViTs, TorchScript
  modules, which are opaque): ``G_j[u, v] = sum_c x_c[u, v] * d h_j / d x_c[u, v]`` over the
  encoder's input ``x`` (after normalisation), at input resolution. Signed; for ReLU networks
  without biases its sum is ``h_j`` exactly (Euler's theorem), with biases it is not.
- ``occlusion`` for ONNX encoders, which run in ONNX Runtime, outside torch's autograd (Zeiler
  and Fergus, ECCV 2014): the image cut into :data:`OCCLUSION_BLOCKS` x :data:`OCCLUSION_BLOCKS`
  blocks, each set in turn to 0 (the reference's mean colour, after normalisation), and
  ``O_j[u, v] = h_j(x) - h_j(x with block (u, v) hidden)``: how much of ``h_j`` that block holds
  up. Signed, one map value a block; ``B^2 + 1`` forward passes an image give the maps of all its
  features at once (captum's ``Occlusion`` attributes one target a pass, K times the work).

Maps come back before any upsampling (``maps``), so a client can check the exact method
itself: ``maps.mean((-2, -1))`` is ``h_j``. :func:`upsample` brings them to the image size;
:func:`for_display` is what the overlays draw (gradient maps pooled into blocks).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from models.encoders.onnx_encoder import OnnxEncoder
from models.encoders.resnet import ResNetEncoder
from models.encoders.spec import Encoder
from models.encoders.timm_encoder import TimmEncoder

Method = Literal["channel_map", "gradient_x_input", "occlusion"]

#: Blocks a side of an occlusion map: an overlay as coarse as the gradient maps are shown.
OCCLUSION_BLOCKS = 8

#: Occluded copies per forward pass (ONNX Runtime takes them as one batch).
OCCLUSION_BATCH = 64

#: How close timm's pooled head must be to the plain spatial mean for channel maps to be exact.
_MEAN_RTOL, _MEAN_ATOL = 1e-4, 1e-5

_timm_is_mean: weakref.WeakKeyDictionary[TimmEncoder, bool] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class FeatureMaps:
    """``maps`` (N, K, h', w') float32 on the CPU: map of feature ``features[n, k]`` of image
    ``n``; ``h`` (N, r) the representations of the same forward pass; ``method`` how."""

    maps: torch.Tensor
    h: torch.Tensor
    features: torch.Tensor
    method: Method


def heatmap_method(encoder: Encoder) -> Method:
    """``channel_map`` when ``h`` is the spatial mean of a final feature map, ``occlusion`` for an
    encoder torch cannot differentiate (ONNX), else ``gradient_x_input``."""
    if isinstance(encoder, ResNetEncoder):
        return "channel_map"
    if isinstance(encoder, OnnxEncoder):
        return "occlusion"
    if isinstance(encoder, TimmEncoder):
        known = _timm_is_mean.get(encoder)
        if known is None:
            known = _probe_timm_mean(encoder)
            _timm_is_mean[encoder] = known
        return "channel_map" if known else "gradient_x_input"
    return "gradient_x_input"


def final_map(encoder: Encoder, x: torch.Tensor) -> torch.Tensor:
    """The (N, r, h', w') map whose spatial mean is ``h`` (``channel_map`` encoders only)."""
    if isinstance(encoder, ResNetEncoder):
        net = encoder.resnet
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))
    if isinstance(encoder, TimmEncoder) and heatmap_method(encoder) == "channel_map":
        return encoder.model.forward_features(x)
    raise ValueError(
        f"{type(encoder).__name__} has no final feature map whose mean is h; use gradient_x_input heatmaps"
    )


def feature_maps(encoder: Encoder, x: torch.Tensor, features: torch.Tensor) -> FeatureMaps:
    """Heatmaps of ``features`` (N, K) int64 in images ``x`` (N, 3, S, S), the encoder's input.

    ``channel_map``: one forward pass, no gradient. ``gradient_x_input``: each image repeated K
    times (one forward and one backward pass of N*K images; the encoder in eval mode, so the
    copies do not interact). The encoder's parameters are left as they were (no ``.grad``).
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x must have shape (N, 3, S, S), got {tuple(x.shape)}")
    features = torch.as_tensor(features, dtype=torch.int64)
    if features.dim() != 2 or features.shape[0] != x.shape[0]:
        raise ValueError(f"features must have shape (N={x.shape[0]}, K), got {tuple(features.shape)}")
    r = encoder.feature_dim
    if features.numel() and (int(features.min()) < 0 or int(features.max()) >= r):
        raise ValueError(f"feature indices must lie in [0, {r}), got {features.min()}..{features.max()}")
    method = heatmap_method(encoder)
    features_dev = features.to(x.device)
    if method == "channel_map":
        with torch.inference_mode():
            fmap = final_map(encoder, x).float()
            h = fmap.mean(dim=(2, 3))
            n, k = features.shape
            picked = fmap.gather(1, features_dev.view(n, k, 1, 1).expand(n, k, *fmap.shape[2:]))
        return FeatureMaps(picked.cpu(), h.cpu(), features, method)
    if method == "occlusion":
        return _occlusion_maps(encoder, x, features)
    n, k = features.shape
    if k == 0:
        with torch.inference_mode():
            h = encoder(x).float()
        return FeatureMaps(torch.zeros(n, 0, *x.shape[2:]), h.cpu(), features, method)
    with torch.enable_grad():
        copies = x.detach().repeat_interleave(k, dim=0).requires_grad_(True)
        out = encoder(copies).float()
        chosen = out.gather(1, features_dev.reshape(-1, 1)).sum()
        (grad,) = torch.autograd.grad(chosen, copies)
    maps = (grad * copies.detach()).sum(dim=1).view(n, k, *x.shape[2:])
    h = out.detach()[::k]  # every copy gives the same h; keep the first of each image
    return FeatureMaps(maps.float().cpu(), h.float().cpu(), features, method)


def occlusion_blocks(size: int) -> int:
    """Blocks a side of the occlusion maps of ``size`` px images (fewer for tiny images)."""
    return min(OCCLUSION_BLOCKS, size)


def _occlusion_maps(encoder: Encoder, x: torch.Tensor, features: torch.Tensor) -> FeatureMaps:
    """``O_j[u, v] = h_j(x) - h_j(x with block (u, v) set to 0)`` (module docstring), (N, K, B, B)."""
    n, k = features.shape
    size = x.shape[-1]
    b = occlusion_blocks(size)
    edges = torch.linspace(0, size, b + 1).round().long().tolist()  # blocks cover the image when B does not divide S
    maps = torch.empty(n, k, b, b)
    with torch.inference_mode():
        h = encoder(x).float().cpu()
        for i in range(n):
            copies = x[i].expand(b * b, *x.shape[1:]).clone()
            for u in range(b):
                for v in range(b):
                    copies[u * b + v, :, edges[u] : edges[u + 1], edges[v] : edges[v + 1]] = 0.0
            hidden = torch.cat([encoder(chunk).float().cpu() for chunk in copies.split(OCCLUSION_BATCH)])
            picked = features[i]
            maps[i] = (h[i, picked].unsqueeze(1) - hidden[:, picked].T).view(k, b, b)
    return FeatureMaps(maps, h, features, "occlusion")


#: Gradient maps are shown pooled to about this many blocks a side: raw gradient x input is
#: speckled at the pixel level (strided convolutions), which hides where a feature fires.
DISPLAY_BLOCKS = 8


def for_display(maps: torch.Tensor, method: Method) -> torch.Tensor:
    """What overlays draw: channel maps as they are; gradient maps' positive part averaged over
    blocks of ``S // DISPLAY_BLOCKS`` pixels (the arrays a client gets stay as computed)."""
    if method == "channel_map" or maps.shape[-1] < 2 * DISPLAY_BLOCKS:
        return maps
    k = max(1, maps.shape[-1] // DISPLAY_BLOCKS)
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float().clamp(min=0)
    pooled = F.avg_pool2d(flat, kernel_size=k, stride=k, ceil_mode=True)
    return pooled.reshape(*lead, *pooled.shape[-2:])


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Maps (..., h', w') bilinearly resized to (..., size, size)."""
    if maps.shape[-1] == size and maps.shape[-2] == size:
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    return F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False).reshape(*lead, size, size)


def _probe_timm_mean(encoder: TimmEncoder) -> bool:
    size = encoder.spec.image_size
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, size, size, generator=generator)
    device = next(encoder.parameters(), torch.empty(0)).device
    with torch.inference_mode():
        fmap = encoder.model.forward_features(x.to(device))
        if fmap.dim() != 4:  # tokens (ViT) or already pooled
            return False
        h = encoder.model.forward_head(fmap, pre_logits=True)
        if h.dim() != 2 or h.shape[1] != fmap.shape[1]:
            return False
        return bool(torch.allclose(h, fmap.mean(dim=(2, 3)), rtol=_MEAN_RTOL, atol=_MEAN_ATOL))
