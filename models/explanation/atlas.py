"""The feature atlas: for each feature, the reference images it is dominant for (paper figures 1 and 2).

For every discriminative feature, and a seeded sample of upper-tail and lower-tail features for
contrast, over a sample of reference images:

- the ``top_k`` images where the feature is dominant (eq. 2), strongest first, with their
  heatmaps (:mod:`models.explanation.heatmaps`) and one contact sheet PNG (image above overlay);
- when the data set has labels (two or more class folders), the class distribution of *all* the
  images the feature is dominant for, its *purity* (share of the most common class) and how many
  classes cover 80% of them: the paper's claim that discriminative features "correspond to unique
  physical attributes" says purity should be high for ``D`` and lower for random features.

Purity depends on how many images a feature is dominant for (a feature dominant for 3 images is
pure by chance more often than one dominant for 300), so :func:`chance_purity` gives the purity
of random image sets of the same size, to compare against.

The atlas is written as one folder (:func:`write_atlas`, atomically): ``atlas.json`` (the index
and every feature's entry), ``heatmaps.safetensors`` (each feature's (k, h', w') maps before
upsampling, key ``"<index>"``) and ``sheets/<index>.png``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from models.data.datasets import image_folder, make_loader, subset
from models.data.transforms import ResizeCentreCrop, eval_transform
from models.encoders.spec import Encoder
from models.explanation.decompose import feature_groups
from models.explanation.heatmaps import Method, feature_maps, for_display, heatmap_method
from models.explanation.render import Tile, contact_sheet, png_bytes
from models.scoring.feature_set import FeatureSet
from models.scoring.qscore import dominant_mask
from models.storage.atomic import atomic_directory

ATLAS_FORMAT = "qscore.atlas/v1"
ATLAS_FILE = "atlas.json"
HEATMAPS_FILE = "heatmaps.safetensors"
SHEETS_DIR = "sheets"
#: Share of a feature's images that the "classes covering" count reaches (the issue's 80%).
COVER = 0.8

#: (fraction 0..1, phase); may raise to stop the computation (a cancelled job).
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class AtlasConfig:
    top_k: int = 8
    tail_sample: int = 16  # upper-tail and lower-tail features each, drawn at random (seeded)
    seed: int = 0
    batch_size: int = 256
    sheet_tile: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= 64:
            raise ValueError(f"top_k must be between 1 and 64, got {self.top_k}")
        if self.tail_sample < 0:
            raise ValueError(f"tail_sample must be 0 or more, got {self.tail_sample}")


def choose_features(groups: np.ndarray, tail_sample: int, seed: int = 0) -> dict[int, str]:
    """Every discriminative feature and up to ``tail_sample`` of each tail (seeded), index -> group."""
    rng = np.random.default_rng(seed)
    chosen = {int(j): "discriminative" for j in np.flatnonzero(groups == "discriminative")}
    for tail in ("upper_tail", "lower_tail"):
        members = np.flatnonzero(groups == tail)
        take = min(tail_sample, members.size)
        for j in sorted(rng.choice(members, size=take, replace=False).tolist()) if take else []:
            chosen[int(j)] = tail
    return dict(sorted(chosen.items()))


def class_purity(labels: np.ndarray, n_classes: int) -> tuple[float | None, int | None, int | None]:
    """(purity, top class, classes covering :data:`COVER` of them) of images with these labels.

    ``purity`` is the share of the most common class (ties: the lowest class index); all None
    for an empty set.
    """
    if labels.size == 0:
        return None, None, None
    counts = np.bincount(labels, minlength=n_classes)
    ordered = np.sort(counts)[::-1]
    covering = int(np.searchsorted(np.cumsum(ordered), COVER * labels.size - 1e-9) + 1)
    return float(counts.max() / labels.size), int(np.argmax(counts)), covering


def chance_purity(labels: np.ndarray, n: int, n_classes: int, draws: int = 200, seed: int = 0) -> float:
    """Mean purity of ``draws`` random sets of ``n`` images drawn from ``labels`` (no replacement)."""
    if n <= 0 or labels.size == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    n = min(n, labels.size)
    values = [class_purity(rng.choice(labels, size=n, replace=False), n_classes)[0] for _ in range(draws)]
    return float(np.mean(values))


@dataclass
class AtlasFeature:
    index: int
    group: str
    count_reference: int  # the feature set's dominance count (discovery's reference sample)
    n_dominant: int  # images of this atlas's sample it is dominant for
    top: list[dict[str, Any]]  # rank order: image (path relative to the data set), label, value
    maps: torch.Tensor  # (len(top), h', w') float32, before upsampling
    classes: dict[str, int] | None = None
    purity: float | None = None
    top_class: str | None = None
    classes_for_80: int | None = None
    sheet: bytes = b""

    def row(self, n_images: int) -> dict[str, Any]:
        return {
            "index": self.index,
            "group": self.group,
            "count_reference": self.count_reference,
            "n_dominant": self.n_dominant,
            "dominant_share": self.n_dominant / n_images if n_images else 0.0,
            "purity": self.purity,
            "top_class": self.top_class,
            "classes_for_80": self.classes_for_80,
            "classes": self.classes,
            "top": self.top,
            "map_shape": list(self.maps.shape[1:]),
        }


@dataclass
class Atlas:
    features: dict[int, AtlasFeature]
    n_images: int
    method: Method
    eps: float
    classes: list[str] | None  # None: the data set has no labels (one class folder)
    meta: dict[str, Any] = field(default_factory=dict)
    #: The sample's (N, r) representations and (N,) class indices, for callers (not written).
    h: torch.Tensor | None = field(default=None, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)

    def index_row(self) -> dict[str, Any]:
        return {
            "format": ATLAS_FORMAT,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "n_images": self.n_images,
            "method": self.method,
            "eps": self.eps,
            "classes": self.classes,
            **self.meta,
            "features": {str(j): f.row(self.n_images) for j, f in self.features.items()},
        }


def compute_atlas(
    encoder: Encoder,
    feature_set: FeatureSet,
    folder: str | Path,
    indices: Sequence[int] | None = None,
    config: AtlasConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    on_progress: Progress | None = None,
) -> Atlas:
    """The atlas of ``feature_set`` over the images ``indices`` of the image folder ``folder``.

    Two passes: the representations of every image (eval transform, batched), then, for the
    images that made some feature's top-k only, their pixels and heatmaps. Progress: 0-0.7 the
    first pass, 0.7-0.9 the heatmaps, 0.9-1 the contact sheets.
    """
    config = config or AtlasConfig()
    report = on_progress or (lambda fraction, phase: None)
    device = torch.device(device)
    spec = encoder.spec
    encoder = encoder.to(device).eval()
    dataset = image_folder(folder, eval_transform(spec))
    indices = list(range(len(dataset))) if indices is None else list(indices)
    if not indices:
        raise ValueError(f"no images to build an atlas from in {folder}")
    labelled = len(dataset.classes) >= 2
    labels = np.array([dataset.samples[i][1] for i in indices], dtype=np.int64)
    groups = feature_groups(feature_set.counts, feature_set.discriminative)
    chosen = choose_features(groups, config.tail_sample, config.seed)

    # 1. representations and dominance over the whole sample
    loader = make_loader(subset(dataset, indices), config.batch_size)
    h_parts, dom_parts = [], []
    with torch.inference_mode():
        for step, (x, _) in enumerate(loader, 1):
            h = encoder(x.to(device)).float()
            h_parts.append(h.cpu())
            dom_parts.append(dominant_mask(h, feature_set.eps).cpu())
            report(0.7 * step / len(loader), "representations")
    h_all, dominant = torch.cat(h_parts), torch.cat(dom_parts)

    # 2. each chosen feature's top-k dominant images, then their heatmaps
    top_rows: dict[int, np.ndarray] = {}
    for j in chosen:
        rows = torch.nonzero(dominant[:, j]).flatten()
        order = torch.argsort(h_all[rows, j], descending=True, stable=True)
        top_rows[j] = rows[order[: config.top_k]].numpy()
    unique = sorted({int(i) for rows in top_rows.values() for i in rows})
    pixels = _pixels(folder, [indices[i] for i in unique], spec.image_size)
    position = {row: n for n, row in enumerate(unique)}
    method = heatmap_method(encoder)
    maps = _maps(encoder, pixels, spec, top_rows, position, method, config, device, report)
    report(0.9, "contact sheets")

    # 3. per-feature entries and contact sheets
    names = dataset.classes
    features: dict[int, AtlasFeature] = {}
    for n, (j, group) in enumerate(chosen.items()):
        rows = top_rows[j]
        dom_labels = labels[dominant[:, j].numpy()]
        entry = AtlasFeature(
            index=j,
            group=group,
            count_reference=int(feature_set.counts[j]),
            n_dominant=int(dom_labels.size),
            top=[
                {
                    "rank": rank,
                    "image": _relative(dataset.samples[indices[int(i)]][0], folder),
                    "label": names[labels[int(i)]] if labelled else None,
                    "value": float(h_all[int(i), j]),
                }
                for rank, i in enumerate(rows)
            ],
            maps=maps[j],
        )
        if labelled:
            purity, top_class, covering = class_purity(dom_labels, len(names))
            counts = np.bincount(dom_labels, minlength=len(names))
            entry.classes = {names[c]: int(counts[c]) for c in np.argsort(-counts, kind="stable") if counts[c]}
            entry.purity, entry.classes_for_80 = purity, covering
            entry.top_class = None if top_class is None else names[top_class]
        title = f"feature {j} ({group.replace('_', ' ')}): dominant for {entry.n_dominant} of {len(indices)} images" + (
            f"; {entry.top_class} {entry.purity:.0%}" if entry.purity is not None else ""
        )
        tiles = [
            Tile(pixels[position[int(i)]], for_display(maps[j][rank], method), f"{t['label'] or ''}\n{t['value']:.2f}")
            for rank, (i, t) in enumerate(zip(rows, entry.top, strict=True))
        ]
        entry.sheet = png_bytes(contact_sheet(title, tiles, columns=config.top_k, tile=config.sheet_tile), 6)
        features[j] = entry
        report(0.9 + 0.1 * (n + 1) / len(chosen), "contact sheets")
    return Atlas(
        features=features,
        n_images=len(indices),
        method=method,
        eps=feature_set.eps,
        classes=list(names) if labelled else None,
        meta={"top_k": config.top_k, "tail_sample": config.tail_sample, "seed": config.seed},
        h=h_all,
        labels=labels,
    )


def write_atlas(atlas: Atlas, target: str | Path) -> Path:
    """Write the atlas folder at ``target`` (which must not exist) atomically: whole or not at all."""
    target = Path(target)
    with atomic_directory(target) as tmp:
        (tmp / SHEETS_DIR).mkdir()
        for j, feature in atlas.features.items():
            (tmp / SHEETS_DIR / f"{j}.png").write_bytes(feature.sheet)
        tensors = {str(j): f.maps.contiguous() for j, f in atlas.features.items() if f.maps.numel()}
        save_file(tensors, str(tmp / HEATMAPS_FILE))
        (tmp / ATLAS_FILE).write_text(json.dumps(atlas.index_row(), indent=1) + "\n")
    return target


def read_atlas(folder: str | Path) -> dict[str, Any]:
    """The ``atlas.json`` of an atlas folder."""
    path = Path(folder) / ATLAS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no atlas at {folder} (expected {ATLAS_FILE})")
    data = json.loads(path.read_text())
    if data.get("format") != ATLAS_FORMAT:
        raise ValueError(f"{path} is not a {ATLAS_FORMAT} file (format {data.get('format')!r})")
    return data


def _relative(path: str, folder: str | Path) -> str:
    return Path(path).resolve().relative_to(Path(folder).resolve()).as_posix()


def _pixels(folder: str | Path, indices: list[int], size: int) -> list[np.ndarray]:
    """(S, S, 3) uint8 of the images ``indices``: resized and centre-cropped as the encoder sees them."""
    geometry = ResizeCentreCrop(size)
    dataset = image_folder(folder, lambda image: np.asarray(geometry(image), dtype=np.uint8))
    return [dataset[i][0] for i in indices]


def _maps(
    encoder: Encoder,
    pixels: list[np.ndarray],
    spec: Any,
    top_rows: dict[int, np.ndarray],
    position: dict[int, int],
    method: Method,
    config: AtlasConfig,
    device: torch.device,
    report: Progress,
) -> dict[int, torch.Tensor]:
    """Each feature's (k, h', w') maps over its top images."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)

    def inputs(rows: Sequence[int]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack([pixels[r] for r in rows])).permute(0, 3, 1, 2).float().div(255)
        return ((batch - mean) / std).to(device)

    pairs = [(position[int(i)], j, rank) for j, rows in top_rows.items() for rank, i in enumerate(rows)]
    out: dict[int, list[torch.Tensor | None]] = {j: [None] * len(rows) for j, rows in top_rows.items()}
    if method in ("channel_map", "occlusion"):
        # one forward per image (B^2 + 1 for occlusion), every feature it is needed for from the same pass
        wanted: dict[int, list[tuple[int, int]]] = {}
        for image, j, rank in pairs:
            wanted.setdefault(image, []).append((j, rank))
        images = sorted(wanted)
        step = config.batch_size
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            width = max(len(wanted[i]) for i in chunk)
            index = torch.tensor(
                [[j for j, _ in wanted[i]] + [wanted[i][0][0]] * (width - len(wanted[i])) for i in chunk]
            )
            fm = feature_maps(encoder, inputs(chunk), index)
            for n, image in enumerate(chunk):
                for k, (j, rank) in enumerate(wanted[image]):
                    out[j][rank] = fm.maps[n, k]
            report(0.7 + 0.2 * min(1.0, (start + step) / max(len(images), 1)), "heatmaps")
    else:
        step = max(1, config.batch_size // 4)  # a backward pass holds the activations of the batch
        for start in range(0, len(pairs), step):
            chunk = pairs[start : start + step]
            fm = feature_maps(encoder, inputs([p[0] for p in chunk]), torch.tensor([[p[1]] for p in chunk]))
            for n, (_, j, rank) in enumerate(chunk):
                out[j][rank] = fm.maps[n, 0]
            report(0.7 + 0.2 * min(1.0, (start + step) / max(len(pairs), 1)), "heatmaps")
    shape = _map_shape(encoder, spec, method, device)
    return {j: torch.stack(m) if m else torch.zeros(0, *shape) for j, m in out.items()}  # type: ignore[misc]


def _map_shape(encoder: Encoder, spec: Any, method: Method, device: torch.device) -> tuple[int, int]:
    if method == "gradient_x_input":
        return spec.image_size, spec.image_size
    x = torch.zeros(1, 3, spec.image_size, spec.image_size, device=device)
    return tuple(feature_maps(encoder, x, torch.zeros(1, 1, dtype=torch.int64)).maps.shape[-2:])  # type: ignore[return-value]
