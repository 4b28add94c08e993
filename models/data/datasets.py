"""Image folders, transforms, seeded reference samples and batched representation extraction."""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets

from qscore_config.settings import get_settings

log = logging.getLogger(__name__)


ProgressFn = Callable[[float], None]


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


def subset(dataset: Dataset, indices: Sequence[int]) -> Subset:
    return Subset(dataset, list(indices))


def ensure_cifar10(cache: str | Path | None = None, archive: str | Path | None = None) -> Path:
    """Extract the shared CIFAR-10 JPEG archive once; return the folder holding train/ and test/.

    ``cache`` and ``archive`` default to the settings ``QSCORE_DATA_CACHE`` and
    ``QSCORE_CIFAR10_ARCHIVE``.
    """
    settings = get_settings()
    target = Path(cache or settings.data_cache) / "cifar10"
    archive = archive or settings.cifar10_archive
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
