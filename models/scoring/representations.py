"""Batched representation extraction over a data set (with typicality's pixel statistics)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from models.data.datasets import ProgressFn, make_loader
from models.encoders.resnet import ResNetEncoder
from models.scoring.typicality import pixel_signals

log = logging.getLogger(__name__)


def iter_representations(
    encoder: ResNetEncoder,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    workers: int = 0,
    progress: bool = False,
    on_progress: ProgressFn | None = None,
    desc: str = "representations",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(h, targets)`` per batch: h (B, r) float32 on the CPU, targets (B,)."""
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    loader = make_loader(dataset, batch_size, workers=workers)
    total = len(loader)
    with torch.inference_mode():
        for step, (images, targets) in enumerate(tqdm(loader, desc=desc, disable=not progress), 1):
            h = encoder(images.to(device, non_blocking=True)).float().cpu()
            yield h, targets
            if on_progress is not None:
                on_progress(step / total)


def extract_representations(
    encoder: ResNetEncoder, dataset: Dataset, **kwargs: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """All representations of ``dataset``: h (N, r) float32 and targets (N,)."""
    hs, ts = [], []
    for h, t in iter_representations(encoder, dataset, **kwargs):  # type: ignore[arg-type]
        hs.append(h)
        ts.append(t)
    if not hs:
        raise ValueError("the data set is empty")
    return torch.cat(hs), torch.cat(ts)


def extract_with_pixels(
    encoder: ResNetEncoder,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Representations (N, r), targets (N,) and the pixel statistics of typicality, each (N,).

    ``dataset`` yields inputs made by :func:`eval_transform` of ``encoder.spec``: the
    normalisation is undone to measure the pixels in [0, 1] (an encoder without a ``spec``
    gets its inputs measured as they are). Inputs that are not images (N, C, H, W) get no pixel
    statistics (an empty dict).
    """

    device = torch.device(device)
    spec = getattr(encoder, "spec", None)
    std = torch.tensor(getattr(spec, "std", (1.0, 1.0, 1.0))).view(1, 3, 1, 1)
    mean = torch.tensor(getattr(spec, "mean", (0.0, 0.0, 0.0))).view(1, 3, 1, 1)
    encoder = encoder.to(device).eval()
    hs, ts, pix = [], [], []
    on_progress = kwargs.get("on_progress")
    loader = make_loader(dataset, batch_size, workers=int(kwargs.get("workers", 0) or 0))  # type: ignore[call-overload]
    with torch.inference_mode():
        for step, (images, targets) in enumerate(loader, 1):
            hs.append(encoder(images.to(device, non_blocking=True)).float().cpu())
            ts.append(targets)
            if images.dim() == 4 and images.shape[1] == 3 and min(images.shape[-2:]) >= 4:
                pix.append(pixel_signals(images * std + mean))
            if callable(on_progress):
                on_progress(step / len(loader))
    if not hs:
        raise ValueError("the data set is empty")
    pixels = {k: torch.cat([p[k] for p in pix]) for k in pix[0]} if len(pix) == len(hs) else {}
    return torch.cat(hs), torch.cat(ts), pixels
