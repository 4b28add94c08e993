"""Image folders, transforms, seeded reference samples and batched representation extraction."""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from tqdm.auto import tqdm

from models.encoders import Encoder, EncoderSpec

log = logging.getLogger(__name__)

ProgressFn = Callable[[float], None]
REPO_ROOT = Path(__file__).resolve().parent.parent
CIFAR10_ARCHIVE = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_CACHE = REPO_ROOT / ".cache" / "data"


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is the first GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available")
    return resolved


def eval_transform(spec: EncoderSpec) -> transforms.Compose:
    """Resize (short side), centre-crop to the encoder's input size, normalise."""
    return transforms.Compose(
        [
            transforms.Resize(spec.image_size),
            transforms.CenterCrop(spec.image_size),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )


def image_folder(root: str | Path, transform: Callable | None = None) -> datasets.ImageFolder:
    """A torchvision ImageFolder (``root/<class>/<image>``), with a clear error when absent."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no image folder at {root} (expected {root}/<class>/<image files>)")
    return datasets.ImageFolder(str(root), transform=transform)


@dataclass(frozen=True)
class Sample:
    """A seeded uniform sample of a data set, and how it was drawn (for provenance)."""

    indices: list[int]
    n_available: int
    seed: int | None

    @property
    def description(self) -> str:
        if len(self.indices) == self.n_available:
            return "all samples"
        return f"uniform random sample without replacement (numpy default_rng seed {self.seed})"


def random_sample(n_available: int, n: int | None, seed: int = 0) -> Sample:
    """``n`` indices drawn uniformly (image folders are sorted by class; SPEC section 2)."""
    if n is None or n >= n_available:
        return Sample(list(range(n_available)), n_available, seed)
    if n <= 0:
        raise ValueError(f"the sample size must be positive, got {n}")
    rng = np.random.default_rng(seed)
    return Sample(sorted(rng.choice(n_available, size=n, replace=False).tolist()), n_available, seed)


def shard(indices: Sequence[int], n_shards: int) -> list[list[int]]:
    """Split indices into ``n_shards`` contiguous, near-equal, non-empty parts."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be at least 1, got {n_shards}")
    parts = np.array_split(np.asarray(indices, dtype=np.int64), min(n_shards, max(len(indices), 1)))
    return [part.tolist() for part in parts if len(part)]


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool = False, workers: int = 0, drop_last: bool = False
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        drop_last=drop_last,
        persistent_workers=workers > 0,
    )


def iter_representations(
    encoder: Encoder,
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


def extract_representations(encoder: Encoder, dataset: Dataset, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """All representations of ``dataset``: h (N, r) float32 and targets (N,)."""
    hs, ts = [], []
    for h, t in iter_representations(encoder, dataset, **kwargs):  # type: ignore[arg-type]
        hs.append(h)
        ts.append(t)
    if not hs:
        raise ValueError("the data set is empty")
    return torch.cat(hs), torch.cat(ts)


def extract_with_pixels(
    encoder: Encoder, dataset: Dataset, *, batch_size: int = 256, device: str | torch.device = "cpu", **kwargs: object
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Representations (N, r), targets (N,) and the pixel statistics of typicality, each (N,).

    ``dataset`` yields inputs made by :func:`eval_transform` of ``encoder.spec``: the
    normalisation is undone to measure the pixels in [0, 1] (an encoder without a ``spec``
    gets its inputs measured as they are). Inputs that are not images (N, C, H, W) get no pixel
    statistics (an empty dict).
    """
    from models.typicality import pixel_signals

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


def subset(dataset: Dataset, indices: Sequence[int]) -> Subset:
    return Subset(dataset, list(indices))


def ensure_cifar10(cache: str | Path = DEFAULT_CACHE, archive: str | Path = CIFAR10_ARCHIVE) -> Path:
    """Extract the shared CIFAR-10 JPEG archive once; return the folder holding train/ and test/."""
    target = Path(cache) / "cifar10"
    if (target / "train").is_dir() and (target / "test").is_dir():
        return target
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f"CIFAR-10 archive not found at {archive}")
    partial = target.with_name("cifar10.partial")
    partial.mkdir(parents=True, exist_ok=True)
    log.info("extracting %s into %s", archive, target)
    with tarfile.open(archive) as tar:
        tar.extractall(partial, filter="data")
    partial.rename(target)
    return target


def class_slice(root: str | Path, out: str | Path, per_class: int, seed: int = 0) -> Path:
    """Copy ``per_class`` random images of each class into a new image folder (for small runs)."""
    root, out = Path(root), Path(out)
    rng = np.random.default_rng(seed)
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(class_dir.iterdir())
        chosen = rng.choice(len(files), size=min(per_class, len(files)), replace=False)
        (out / class_dir.name).mkdir(parents=True, exist_ok=True)
        for i in sorted(chosen):
            target = out / class_dir.name / files[i].name
            if not target.exists():
                target.write_bytes(files[i].read_bytes())
    return out
