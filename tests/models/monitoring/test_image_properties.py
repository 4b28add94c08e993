"""Image properties for the drift test of the inputs: exact values by hand, layouts, invariants, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from models.monitoring.image_properties import (
    PROPERTIES,
    SIGNAL_PREFIX,
    held_out_properties,
    image_properties,
    property_signals,
)


def _named(rows: np.ndarray, i: int = 0) -> dict[str, float]:
    return {name: float(rows[k, i]) for k, name in enumerate(PROPERTIES)}


def test_one_white_pixel_on_black_by_hand() -> None:
    x = np.zeros((1, 3, 4, 3), np.uint8)
    x[0, 1, 1] = 255  # grey 1 at row 1, column 1 (the weights sum to 1)
    got = _named(image_properties(x))
    assert got["brightness"] == pytest.approx(1 / 12)
    assert got["rms_contrast"] == pytest.approx(np.sqrt(11) / 12)  # sqrt(1/12 - 1/144)
    # grey and black pixels: a third each
    for c in ("red_intensity", "green_intensity", "blue_intensity"):
        assert got[c] == pytest.approx(1 / 3)
    # interior pixels (1, 1) and (1, 2): Laplacians -4 and 1, variance 6.25
    assert got["texture"] == pytest.approx(6.25)


def test_a_solid_red_image_by_hand() -> None:
    x = np.zeros((1, 5, 5, 3), np.uint8)
    x[..., 0] = 255
    got = _named(image_properties(x))
    assert got == pytest.approx(
        {
            "brightness": 0.2125,
            "rms_contrast": 0.0,
            "red_intensity": 1.0,
            "green_intensity": 0.0,
            "blue_intensity": 0.0,
            "texture": 0.0,
        }  # fmt: skip
    )


def test_every_layout_the_scorer_takes_gives_the_same_rows() -> None:
    x = np.random.default_rng(0).integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    want = image_properties(x)
    assert want.shape == (len(PROPERTIES), 5) and want.dtype == np.float32
    np.testing.assert_array_equal(image_properties(list(x)), want)  # the scorer's preprocessed arrays
    np.testing.assert_array_equal(image_properties(torch.from_numpy(x).permute(0, 3, 1, 2)), want)  # device decode
    np.testing.assert_allclose(image_properties(x.astype(np.float32) / 255), want, rtol=1e-5, atol=1e-7)
    signals = property_signals(x)
    assert list(signals) == [SIGNAL_PREFIX + n for n in PROPERTIES]
    np.testing.assert_array_equal(signals["image_texture"], want[-1])


@given(arrays(np.uint8, st.tuples(st.integers(1, 4), st.integers(3, 9), st.integers(3, 9), st.just(3))))
@settings(max_examples=60, deadline=None)
def test_properties_over_random_images(x: np.ndarray) -> None:
    rows = image_properties(x)
    assert np.isfinite(rows).all()
    np.testing.assert_allclose(rows[2:5].sum(axis=0), 1.0, rtol=1e-5)  # the shares of each pixel sum to 1
    assert ((rows[0] >= 0) & (rows[0] <= 1 + 1e-6)).all() and (rows[1] >= 0).all() and (rows[5] >= 0).all()
    swapped = image_properties(x[..., ::-1])  # red and blue swapped: their intensities swap
    np.testing.assert_allclose(swapped[2], rows[4], rtol=1e-6)
    np.testing.assert_allclose(swapped[4], rows[2], rtol=1e-6)
    flipped = image_properties(x[:, ::-1, ::-1])  # upside down: no property moves
    np.testing.assert_allclose(flipped, rows, rtol=1e-4, atol=1e-6)


def test_held_out_properties_are_sorted_and_only_the_ones_measured() -> None:
    signals = {"image_brightness": np.array([0.5, 0.123456789, 0.3]), "typicality": np.array([1.0, 2.0, 3.0])}
    assert held_out_properties(signals) == {"brightness": [0.12346, 0.3, 0.5]}
    assert held_out_properties({"typicality": np.ones(3)}) is None


@pytest.mark.parametrize("shape", [(2, 8, 8), (2, 8, 8, 4), (2, 2, 8, 3), (8, 8, 3)])
def test_bad_shapes_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"image properties need \(B, H, W, 3\) RGB images with H, W >= 3, got shape"):
        image_properties(np.zeros(shape, np.uint8))


def test_large_images_are_read_on_a_grid_of_at_most_32_pixels_a_side() -> None:
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (2, 224, 100, 3), dtype=np.uint8)  # strides 7 and 4: a 32 x 25 grid
    np.testing.assert_array_equal(image_properties(big), image_properties(np.ascontiguousarray(big[:, ::7, ::4])))
    odd = rng.integers(0, 256, (1, 33, 32, 3), dtype=np.uint8)  # 33 rows: every other one, 17 of them
    np.testing.assert_array_equal(image_properties(odd), image_properties(np.ascontiguousarray(odd[:, ::2])))
