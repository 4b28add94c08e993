"""Typicality: component scales, the leave-one-out threshold, pixel statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.scoring.typicality import (
    ComponentScale,
    TypicalityModel,
    fit_typicality,
    hoyer_sparsity,
    pixel_signals,
    score_typicality,
)


def test_component_scale_two_sided_hand_case() -> None:
    scale = ComponentScale(center=1.0, upper=2.0, lower=0.5)
    assert scale.score(np.array([1.0, 5.0, 0.0])).tolist() == [0.0, 2.0, 2.0]
    one_sided = ComponentScale(center=1.0, upper=2.0)
    assert one_sided.score(np.array([1.0, 5.0, 0.0])).tolist() == [0.0, 2.0, -0.5]


def test_hoyer_sparsity_bounds() -> None:
    h = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert hoyer_sparsity(h).tolist() == pytest.approx([1.0, 0.0, 0.0])


def test_pixel_signals_of_a_solid_image() -> None:
    x = torch.full((1, 3, 8, 8), 0.5)
    sig = pixel_signals(x)
    assert sig["pix_std"].item() == pytest.approx(math.log(1e-3))
    assert sig["pix_grad"].item() == pytest.approx(math.log(1e-3))
    assert sig["pix_fine"].item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        pixel_signals(torch.zeros(3, 8, 8))


def _reference(n: int = 400, r: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.relu(torch.randn(n, r, generator=g) + 0.5)
    x = torch.rand(n, 3, 8, 8, generator=g) * 0.5 + 0.25
    return h, x


def test_fit_flags_about_one_percent_of_the_reference_and_gross_outliers() -> None:
    h, x = _reference()
    model, bank = fit_typicality(h, x, k=5, prototypes=False)
    assert bank is not None and bank.size == 400
    assert 0.005 <= model.reference_atypical_share <= 0.015
    # a fresh draw of the same distribution: few atypical
    h2, x2 = _reference(seed=1)
    typ, sig = score_typicality(model, h2, bank, x2)
    assert (typ > 1).mean() <= 0.05
    assert set(sig) >= {"knn", "log_l1", "hoyer", "pix_std"}
    # solid images, and representations ten times as large: all atypical
    typ_solid, _ = score_typicality(model, h2[:20], bank, torch.full((20, 3, 8, 8), 0.3))
    assert (typ_solid > 1).all()
    typ_big, _ = score_typicality(model, h2[:20] * 10, bank, x2[:20])
    assert (typ_big > 1).all()


def test_threshold_uses_leave_one_out_distances() -> None:
    h, x = _reference(n=100)
    model, bank = fit_typicality(h, x, k=3, components=("knn",), prototypes=False)
    loo = bank.leave_one_out_distance(3).numpy()
    assert model.threshold == pytest.approx(model.components["knn"].score(np.percentile(loo, 99)), rel=1e-3)
    # scored against a bank that contains them, the reference's own images look closer than that
    typ_in_bank, _ = score_typicality(model, h, bank)
    assert np.median(typ_in_bank) < np.median(model.components["knn"].score(loo) / model.threshold)


def test_json_round_trip_and_errors() -> None:
    h, x = _reference(n=60)
    model, bank = fit_typicality(h, x, k=3, prototypes=False)
    again = TypicalityModel.model_validate_json(model.model_dump_json())
    assert np.allclose(score_typicality(again, h, bank, x)[0], score_typicality(model, h, bank, x)[0])
    with pytest.raises(ValueError, match="reference bank"):
        score_typicality(model, h, None, x)
    with pytest.raises(ValueError, match="pixel statistics"):
        score_typicality(model, h, bank, None)
    with pytest.raises(ValueError, match="unknown or no typicality components"):
        fit_typicality(h, x, components=("mahalanobis",))
    with pytest.raises(ValueError, match="need the reference images"):
        fit_typicality(h, None)
    with pytest.raises(ValueError, match="the bank needs between"):
        fit_typicality(h, x, k=10, bank_size=5)


def test_feature_set_writes_its_bank_beside_and_reads_it_on_first_use(tmp_path, tiny_model) -> None:
    from models.scoring.bank import ReferenceBank
    from models.scoring.feature_set import FeatureSet, bank_path

    _, _, fs = tiny_model
    assert fs.typicality is not None and fs.bank is not None and fs.bank.size == 300
    target = tmp_path / "fs.json"
    fs.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fs.bank.safetensors", "fs.json"]
    loaded = FeatureSet.load(target)
    assert loaded._bank is None  # not read yet
    assert torch.allclose(loaded.bank.vectors, fs.bank.vectors, atol=1e-3)
    # a bank of the wrong size is refused, naming both sizes
    ReferenceBank(fs.bank.vectors[:50]).save(bank_path(target))
    with pytest.raises(ValueError, match="holds 50 x .* expects 300 x"):
        _ = FeatureSet.load(target).bank
    bank_path(target).unlink()
    with pytest.raises(FileNotFoundError, match="reference bank is missing"):
        FeatureSet.load(target)


def test_pixel_std_matches_torch_std() -> None:
    from models.scoring.typicality import _std

    x = torch.rand(5, 300, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_std(x), x.std(dim=1), atol=1e-6)
    assert _std(torch.full((2, 10), 0.5)).tolist() == [0.0, 0.0]


def test_half_resolution_matches_avg_pool() -> None:
    from models.scoring.typicality import _half

    x = torch.rand(2, 3, 9, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(_half(x), torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)
