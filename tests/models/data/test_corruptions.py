"""Graded corruptions: seeded, the right size and kind, and worse with every severity."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from models.data import shifts
from models.data.corruptions import (
    _ALL,
    CORRUPTIONS,
    DESIGN_FAMILIES,
    EXTRA_SHIFTS,
    FAMILY_GROUP,
    HELD_OUT_FAMILIES,
    LATER_FAMILIES,
    SEVERITIES,
    apply_corruption,
    corrupt_array,
)

ALL_NAMES = list(CORRUPTIONS) + list(EXTRA_SHIFTS)

#: Families that draw from the generator (the others are fixed functions of the image).
RANDOM_FAMILIES = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "motion_blur",
    "glass_blur",
    "fog",
    "snow",
    "frost",
    "elastic",
    "spatter",
    "hue_shift",
}

BLUR_FAMILIES = ("defocus_blur", "motion_blur", "zoom_blur")


def _photo_like(n: int, size: tuple[int, int] = (32, 32), seed: int = 0) -> list[Image.Image]:
    """Seeded stand-ins for photographs: a smooth colour field with a few flat shapes on it (edges)
    and a little sensor noise (texture)."""
    rng = np.random.default_rng(seed)
    width, height = size
    images = []
    for _ in range(n):
        coarse = Image.fromarray(rng.integers(40, 216, (4, 4, 3), dtype=np.uint8))
        canvas = coarse.resize(size, Image.BICUBIC)
        draw = ImageDraw.Draw(canvas)
        for _ in range(3):
            x0, y0 = rng.integers(0, width - 4), rng.integers(0, height - 4)
            x1, y1 = x0 + rng.integers(4, width // 2 + 4), y0 + rng.integers(4, height // 2 + 4)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        pixels = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 3, (height, width, 3))
        images.append(Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8)))
    return images


def _array(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def _high_frequency_energy(pixels: np.ndarray) -> float:
    """Mean squared Laplacian of the grey image, over an (N, H, W, 3) batch."""
    grey = pixels.astype(np.float64).mean(axis=-1)
    return float(np.mean([ndimage.laplace(g) ** 2 for g in grey]))


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return _array(_photo_like(50))


@pytest.fixture(scope="module")
def corrupted(clean: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Every family at every severity on the 50 clean images."""
    return {name: [corrupt_array(name, clean, s, seed=0) for s in SEVERITIES] for name in CORRUPTIONS}


def test_families_are_split_sixteen_design_four_held_out_three_later() -> None:
    assert len(DESIGN_FAMILIES) == 16 and len(HELD_OUT_FAMILIES) == 4 and len(LATER_FAMILIES) == 3
    assert set(DESIGN_FAMILIES) | set(HELD_OUT_FAMILIES) | set(LATER_FAMILIES) == set(CORRUPTIONS)
    assert not set(DESIGN_FAMILIES) & set(HELD_OUT_FAMILIES) and not set(LATER_FAMILIES) & set(HELD_OUT_FAMILIES)
    # appended, so the design families keep their index and so their seeds
    assert list(CORRUPTIONS)[-7:] == [*HELD_OUT_FAMILIES, *LATER_FAMILIES]
    assert set(FAMILY_GROUP) == set(CORRUPTIONS)
    assert set(FAMILY_GROUP.values()) == {"noise", "blur", "weather", "digital", "colour", "optics"}
    assert {FAMILY_GROUP[n] for n in DESIGN_FAMILIES} == set(FAMILY_GROUP.values()) - {"optics"}
    assert len({FAMILY_GROUP[n] for n in HELD_OUT_FAMILIES}) == 4  # each of a different kind
    assert list(EXTRA_SHIFTS) == ["invert", "grayscale", "rotate_180", "channel_swap"]
    assert not set(EXTRA_SHIFTS) & set(CORRUPTIONS)


def test_families_added_later_leave_the_earlier_sets_pixels_alone() -> None:
    """Seeds come from a family's index: the later families and channel_swap come last."""
    assert list(_ALL)[: len(DESIGN_FAMILIES) + 4 + 3] == [
        *DESIGN_FAMILIES, *HELD_OUT_FAMILIES, "invert", "grayscale", "rotate_180"
    ]  # fmt: skip
    assert list(_ALL)[-4:] == [*LATER_FAMILIES, "channel_swap"]


def test_gamma_vignette_and_channel_swap_by_hand() -> None:
    pixels = np.array([[[0, 255, 128], [64, 32, 16]]], np.uint8)
    out = np.asarray(next(apply_corruption("gamma", [Image.fromarray(pixels)], 3)))  # x ** 2.2
    want = np.rint(255 * (pixels / 255.0) ** 2.2)
    assert out.tolist() == want.tolist() and out[0, 0].tolist() == [0, 255, 56]
    swapped = np.asarray(next(apply_corruption("channel_swap", [Image.fromarray(pixels)], 1)))
    assert swapped.tolist() == [[[128, 255, 0], [16, 32, 64]]]
    grey = Image.fromarray(np.full((5, 5, 3), 200, np.uint8))
    vignetted = np.asarray(next(apply_corruption("vignette", [grey], 5)))[..., 0]  # 1 - 0.85 r^2 / max r^2
    assert vignetted[2, 2] == 200 and vignetted[0, 0] == round(200 * 0.15) == vignetted[4, 4]
    assert vignetted[0, 2] == round(200 * (1 - 0.85 * 0.5))  # r^2 of an edge's middle: half a corner's


def test_sharpen_adds_high_frequencies_with_severity(clean: np.ndarray, corrupted: dict) -> None:
    energy = [_high_frequency_energy(clean)] + [_high_frequency_energy(out) for out in corrupted["sharpen"]]
    assert np.all(np.diff(energy) > 0), energy


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_mean_change_grows_with_severity(name: str, clean: np.ndarray, corrupted: dict) -> None:
    change = [np.abs(out.astype(np.float64) - clean).mean() for out in corrupted[name]]
    assert np.all(np.diff(change) >= 0), change
    assert change[-1] > 1.5 * change[0] and change[0] > 0.5, change  # graded, and severity 1 does something


def test_contrast_lowers_the_spread_with_severity(clean: np.ndarray, corrupted: dict) -> None:
    spread = [clean.std()] + [out.std() for out in corrupted["contrast"]]
    assert np.all(np.diff(spread) < 0), spread


@pytest.mark.parametrize("name", BLUR_FAMILIES)
def test_blur_removes_more_high_frequencies_with_severity(name: str, clean: np.ndarray, corrupted: dict) -> None:
    energy = [_high_frequency_energy(clean)] + [_high_frequency_energy(out) for out in corrupted[name]]
    assert np.all(np.diff(energy) < 0), energy


@pytest.mark.parametrize("name", ALL_NAMES)
def test_output_is_rgb_uint8_of_the_input_size(name: str) -> None:
    for size in ((32, 32), (40, 24), (8, 8)):
        image = _photo_like(1, size)[0]
        for severity in (1, 5):
            out = next(apply_corruption(name, [image], severity))
            assert out.mode == "RGB" and out.size == size
            assert np.asarray(out).dtype == np.uint8


@pytest.mark.parametrize("name", ALL_NAMES)
def test_same_seed_same_pixels_and_only_random_families_depend_on_it(name: str) -> None:
    images = _array(_photo_like(8))
    a, b = corrupt_array(name, images, 3, seed=7), corrupt_array(name, images, 3, seed=7)
    assert np.array_equal(a, b)
    other_seed = corrupt_array(name, images, 3, seed=8)
    assert np.array_equal(a, other_seed) is (name not in RANDOM_FAMILIES)


def test_corrupt_array_gives_apply_corruption_pixels() -> None:
    images = _photo_like(4)
    from_images = _array(list(apply_corruption("snow", images, 4, seed=2)))
    assert np.array_equal(corrupt_array("snow", _array(images), 4, seed=2), from_images)
    assert corrupt_array("fog", np.zeros((0, 32, 32, 3), np.uint8), 1).shape == (0, 32, 32, 3)


def test_brightness_adds_grey_levels_clipped_at_white() -> None:
    image = Image.fromarray(np.array([[[0, 100, 250], [10, 20, 30]], [[200, 215, 216], [255, 0, 128]]], np.uint8))
    out = np.asarray(next(apply_corruption("brightness", [image], 2)))  # + 40
    assert out.tolist() == [[[40, 140, 255], [50, 60, 70]], [[240, 255, 255], [255, 40, 168]]]


def test_contrast_halves_the_distance_to_the_mean_grey_at_severity_two() -> None:
    red = np.array([[0, 40], [80, 120]])
    pixels = np.stack([red, np.full((2, 2), 10), np.full((2, 2), 200)], axis=-1).astype(np.uint8)  # mean 90
    out = np.asarray(next(apply_corruption("contrast", [Image.fromarray(pixels)], 2)))  # 90 + 0.5 (x - 90)
    assert out[..., 0].tolist() == [[45, 65], [85, 105]]
    assert (out[..., 1] == 50).all() and (out[..., 2] == 145).all()


def test_posterize_keeps_the_top_bits() -> None:
    pixels = np.array([[[55, 200, 255], [15, 16, 17]]], np.uint8)
    out = np.asarray(next(apply_corruption("posterize", [Image.fromarray(pixels)], 3)))  # 4 bits
    assert out.tolist() == [[[48, 192, 240], [0, 16, 16]]]


def test_relations_to_the_one_severity_shifts() -> None:
    image = _photo_like(1)[0]
    pixelated = np.asarray(next(apply_corruption("pixelate", [image], 5)))
    assert np.array_equal(pixelated, np.asarray(shifts.pixelate(image, None)))  # 8x8 blocks at 32x32
    for name in EXTRA_SHIFTS:
        expected = np.asarray(shifts.SHIFTS[name](image, None))
        for severity in SEVERITIES:
            assert np.array_equal(np.asarray(next(apply_corruption(name, [image], severity))), expected)


def test_unknown_family_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown corruption 'blurr'; known families: gaussian_noise, shot_noise"):
        apply_corruption("blurr", _photo_like(1), 1)
    with pytest.raises(ValueError, match=r"extra shifts: invert, grayscale, rotate_180"):
        corrupt_array("blurr", _array(_photo_like(1)), 1)


@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, True, "3"])
def test_bad_severity_is_refused(severity: object) -> None:
    message = r"severity must be one of 1, 2, 3, 4, 5 \(1 mild, 5 severe\), got "
    with pytest.raises(ValueError, match=message):
        apply_corruption("fog", _photo_like(1), severity)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        CORRUPTIONS["fog"](_photo_like(1)[0], np.random.default_rng(0), severity)  # type: ignore[arg-type]


def test_bad_array_is_refused() -> None:
    with pytest.raises(ValueError, match=r"images must be a \(N, H, W, 3\) uint8 array, got float32 array of shape"):
        corrupt_array("fog", np.zeros((2, 32, 32, 3), np.float32), 1)
    with pytest.raises(ValueError, match=r"got uint8 array of shape \(32, 32, 3\)"):
        corrupt_array("fog", np.zeros((32, 32, 3), np.uint8), 1)
    with pytest.raises(TypeError, match=r"images must be a \(N, H, W, 3\) uint8 numpy array, got list"):
        corrupt_array("fog", _photo_like(2), 1)  # type: ignore[arg-type]
