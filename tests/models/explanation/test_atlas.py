"""The feature atlas on the tiny encoder and the CIFAR-10 slice: its numbers recomputed independently."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.data.datasets import image_folder
from models.data.transforms import eval_transform
from models.explanation.atlas import (
    ATLAS_FILE,
    AtlasConfig,
    chance_purity,
    choose_features,
    class_purity,
    compute_atlas,
    read_atlas,
    write_atlas,
)
from models.explanation.decompose import feature_groups
from models.scoring.qscore import dominant_mask


def test_class_purity_by_hand() -> None:
    # counts 3, 1, 1: the top class has 60%; 80% of 5 images needs the two largest classes
    assert class_purity(np.array([0, 0, 0, 1, 2]), 3) == (0.6, 0, 2)
    assert class_purity(np.array([2, 2, 2, 2]), 3) == (1.0, 2, 1)
    assert class_purity(np.array([0, 1, 2, 3, 4]), 5) == (0.2, 0, 4)
    assert class_purity(np.array([], dtype=np.int64), 3) == (None, None, None)


def test_chance_purity() -> None:
    assert chance_purity(np.zeros(50, dtype=np.int64), 10, 2) == 1.0
    balanced = np.repeat(np.arange(10), 100)
    assert chance_purity(balanced, 1000, 10) == pytest.approx(0.1)  # every image: exactly 10% each
    assert 0.1 < chance_purity(balanced, 20, 10, seed=1) < 0.35  # small sets are purer by chance


def test_choose_features_takes_all_of_d_and_seeded_tails() -> None:
    groups = np.array(["lower_tail"] * 5 + ["discriminative"] * 4 + ["upper_tail"] * 5 + ["never_dominant"] * 2)
    chosen = choose_features(groups, 2, seed=3)
    assert [j for j, g in chosen.items() if g == "discriminative"] == [5, 6, 7, 8]
    assert sum(g == "lower_tail" for g in chosen.values()) == 2 and sum(g == "upper_tail" for g in chosen.values()) == 2
    assert chosen == choose_features(groups, 2, seed=3)
    assert list(chosen) == sorted(chosen)
    assert len(choose_features(groups, 100)) == 4 + 5 + 5


@pytest.fixture(scope="module")
def atlas(tiny_model: tuple, cifar_slice: Path):
    encoder, _, feature_set = tiny_model
    progress: list[tuple[float, str]] = []
    result = compute_atlas(
        encoder,
        feature_set,
        cifar_slice / "train",
        config=AtlasConfig(top_k=4, tail_sample=3, batch_size=64),
        on_progress=lambda f, phase: progress.append((f, phase)),
    )
    return result, progress


def test_atlas_entries_are_the_dominant_images_strongest_first(atlas, tiny_model: tuple, cifar_slice: Path) -> None:
    result, progress = atlas
    encoder, _, feature_set = tiny_model
    dataset = image_folder(cifar_slice / "train", eval_transform(encoder.spec))
    with torch.inference_mode():
        h = torch.cat(
            [
                encoder(torch.stack([dataset[i][0] for i in range(s, min(s + 100, len(dataset)))]))
                for s in range(0, len(dataset), 100)
            ]
        )
    dominant = dominant_mask(h, feature_set.eps)
    labels = np.array([t for _, t in dataset.samples])
    groups = feature_groups(feature_set.counts, feature_set.discriminative)

    assert result.n_images == 300 and result.method == "channel_map" and result.classes == dataset.classes
    assert {j for j, f in result.features.items() if f.group == "discriminative"} == set(feature_set.discriminative)
    assert sum(f.group == "upper_tail" for f in result.features.values()) == min(3, int((groups == "upper_tail").sum()))
    for j, feature in result.features.items():
        assert feature.group == groups[j]
        rows = torch.nonzero(dominant[:, j]).flatten()
        assert feature.n_dominant == rows.numel()
        expected = sorted(rows.tolist(), key=lambda i: -float(h[i, j]))[:4]
        assert [t["image"] for t in feature.top] == [
            Path(dataset.samples[i][0]).relative_to(cifar_slice / "train").as_posix() for i in expected
        ]
        values = [t["value"] for t in feature.top]
        assert values == pytest.approx([float(h[i, j]) for i in expected], rel=1e-5)
        # the maps are exact channel maps: each averages to the image's value of the feature
        if feature.top:
            assert feature.maps.mean(dim=(-2, -1)).tolist() == pytest.approx(values, rel=1e-4)
        if feature.n_dominant:
            assert sum(feature.classes.values()) == feature.n_dominant
            counts = np.bincount(labels[rows.numpy()], minlength=10)
            assert feature.purity == pytest.approx(counts.max() / rows.numel())
            assert feature.top_class == dataset.classes[int(np.argmax(counts))]
        else:
            assert feature.purity is None and feature.top == []
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert [p for _, p in progress][0] == "representations"


def test_atlas_is_written_whole_and_read_back(atlas, tmp_path: Path) -> None:
    result, _ = atlas
    target = write_atlas(result, tmp_path / "atlas")
    data = read_atlas(target)
    assert data["n_images"] == 300 and set(data["features"]) == {str(j) for j in result.features}
    some = next(j for j, f in result.features.items() if f.top)
    assert data["features"][str(some)]["top"] == result.features[some].top
    tensors = load_file(str(target / "heatmaps.safetensors"))
    assert torch.equal(tensors[str(some)], result.features[some].maps)
    assert (target / "sheets" / f"{some}.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_atlas(result, target)
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="no atlas at"):
        read_atlas(tmp_path / "other")
    (tmp_path / "other" / ATLAS_FILE).write_text(json.dumps({"format": "x"}))
    with pytest.raises(ValueError, match="is not a qscore.atlas/v1 file"):
        read_atlas(tmp_path / "other")


def test_atlas_config_is_checked() -> None:
    with pytest.raises(ValueError, match="top_k must be between 1 and 64"):
        AtlasConfig(top_k=0)
    with pytest.raises(ValueError, match="tail_sample must be 0 or more"):
        AtlasConfig(tail_sample=-1)
