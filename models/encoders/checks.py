"""Probe forward passes: what an encoder someone brought really outputs, checked before use.

A TorchScript file or a timm architecture says nothing reliable about its output until it runs.
Before such an encoder is used or registered it gets two seeded random batches of different
sizes, preprocessed as its spec says, and must answer each with a finite (N, r) tensor whose
``r`` does not depend on the batch size and whose rows are not all the same (an encoder that
gives every image the same features, all zeros say, can tell none apart). ``r`` becomes the
encoder's feature dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from models.encoders.errors import OutputCheckError
from models.encoders.spec import EncoderSpec, spec_errors

#: Batch sizes of the probe: two different ones, so a batch-dependent output size shows.
CHECK_BATCHES = (2, 3)


def check_inputs(n: int, image_size: int, mean: Sequence[float], std: Sequence[float], seed: int = 0) -> torch.Tensor:
    """(n, 3, S, S) random images in [0, 1], normalised like the eval transform does."""
    generator = torch.Generator().manual_seed(seed + n)
    x = torch.rand(n, 3, image_size, image_size, generator=generator)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def check_output_dim(
    forward: Callable[[torch.Tensor], object],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    what: str,
) -> int:
    """The feature dimension ``r`` of ``forward``; a :class:`OutputCheckError` saying what is wrong."""
    dims = []
    for n in CHECK_BATCHES:
        x = check_inputs(n, image_size, mean, std)
        try:
            with torch.no_grad():
                out = forward(x)
        except Exception as exc:  # a foreign module raises anything
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OutputCheckError(
                f"{what} fails on a probe batch of shape ({n}, 3, {image_size}, {image_size}): {first}. "
                f"If it expects another image size, pass it with --image-size (the size it was exported or "
                f"trained for, e.g. 224, or 32 for CIFAR encoders)."
            ) from None
        if not isinstance(out, torch.Tensor):
            raise OutputCheckError(
                f"{what} returns a {type(out).__name__}, expected one (N, r) tensor of features; "
                "export a module whose forward returns the pooled representation"
            )
        if out.dim() != 2 or out.shape[0] != n:
            raise OutputCheckError(
                f"{what} maps a ({n}, 3, {image_size}, {image_size}) batch to shape {tuple(out.shape)}, "
                f"expected ({n}, r): export the pooled features (e.g. global average pooling and flatten, "
                "before any classifier)"
            )
        if not out.is_floating_point() or not bool(torch.isfinite(out).all()):
            raise OutputCheckError(
                f"{what} outputs NaN or infinite values (or non-float ones, dtype {out.dtype}) on a probe "
                f"batch of random images; check its weights and its input normalisation (--mean/--std)"
            )
        if bool((out == out[:1]).all()):
            raise OutputCheckError(
                f"{what} gives the same {out.shape[1]} features to {n} different random images (the first: "
                f"{_preview(out[0])}): an encoder must tell images apart; check its weights (a zeroed or "
                "untrained last layer?) and its input normalisation (--mean/--std)"
            )
        dims.append(int(out.shape[1]))
    if len(set(dims)) != 1:
        sizes = ", ".join(f"{d} for a batch of {n}" for n, d in zip(CHECK_BATCHES, dims, strict=True))
        raise OutputCheckError(
            f"{what} outputs a different number of features per batch size ({sizes}); the representation "
            "size must not depend on the batch: export a feature extractor with a fixed output size"
        )
    return dims[0]


def _preview(row: torch.Tensor, n: int = 4) -> str:
    values = ", ".join(f"{v:.3g}" for v in row[:n].tolist())
    return f"[{values}{', ...' if row.numel() > n else ''}]"


def brought_spec(
    arch: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    error: type[Exception],
    subject: str,
) -> EncoderSpec:
    """The spec of a brought encoder before its probe (``dim`` 1, replaced by :func:`probed_spec`);
    bad preprocessing raises ``error`` naming ``subject``."""
    try:
        return EncoderSpec(arch=arch, cifar_stem=False, image_size=image_size, mean=tuple(mean), std=tuple(std), dim=1)
    except ValueError as exc:
        raise error(f"bad preprocessing for {subject}: {spec_errors(exc)}") from None


def probed_spec(
    forward: Callable[[torch.Tensor], object], spec: EncoderSpec, dim: int | None, what: str
) -> EncoderSpec:
    """``spec`` with the feature dimension the probe found (:func:`check_output_dim`), which must be
    ``dim`` where a record gives one."""
    probed = check_output_dim(forward, spec.image_size, spec.mean, spec.std, what=what)
    if dim is not None and probed != dim:
        raise OutputCheckError(f"{what} outputs {probed} features, its record says {dim}")
    return spec.model_copy(update={"dim": probed})
