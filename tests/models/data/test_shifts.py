"""Shift sets: seeded, of the right kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.data.shifts import SHIFTS, apply_shift, write_shift_set


def _images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("name", list(SHIFTS))
def test_every_shift_is_seeded_rgb_and_same_size(name: str) -> None:
    a = [np.asarray(im) for im in apply_shift(name, _images(), seed=3)]
    b = [np.asarray(im) for im in apply_shift(name, _images(), seed=3)]
    assert all(x.shape == (32, 32, 3) and x.dtype == np.uint8 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_gross_shifts_are_what_they_say() -> None:
    solid = np.asarray(next(apply_shift("solid_colour", _images(1))))
    assert solid.reshape(-1, 3).std(axis=0).max() == 0
    glyph = np.asarray(next(apply_shift("glyphs", _images(1)))).reshape(-1, 3)
    _, counts = np.unique(glyph, axis=0, return_counts=True)
    assert counts.max() > 0.5 * len(glyph)  # a plain background
    assert len(counts) > 1  # and something drawn on it
    gray = np.asarray(next(apply_shift("grayscale", _images(1))))
    assert (gray[..., 0] == gray[..., 1]).all()
    inverted = np.asarray(next(apply_shift("invert", _images(1))))
    assert np.array_equal(inverted, 255 - np.asarray(_images(1)[0]))


def test_unknown_shift_and_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown shift 'fog'"):
        list(apply_shift("fog", _images()))
    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    _images(1)[0].save(src / "0001.jpg")
    written = write_shift_set("blur", [src / "0001.jpg"], tmp_path / "out")
    assert [p.name for p in written] == ["cat-0001.png"]
    assert Image.open(written[0]).size == (32, 32)


def test_held_out_shifts_are_what_they_say() -> None:
    image = _images(1)[0]
    board = np.asarray(next(apply_shift("checkerboard", [image]))).reshape(-1, 3)
    assert len(np.unique(board, axis=0)) <= 2  # two colours (one if both draws coincide)
    blocks = np.asarray(next(apply_shift("pixelate", [image])))
    assert (blocks.reshape(8, 4, 8, 4, 3) == blocks[::4, ::4][:, None, :, None]).all()  # 4x4 blocks of one colour
    upside_down = np.asarray(next(apply_shift("rotate_180", [image])))
    assert np.array_equal(upside_down, np.asarray(image)[::-1, ::-1])
    field = np.asarray(next(apply_shift("smooth_field", [image]))).astype(int)
    # smooth: neighbouring pixels differ far less than in the noise image it replaces
    assert np.abs(np.diff(field, axis=1)).mean() < 0.25 * np.abs(np.diff(np.asarray(image).astype(int), axis=1)).mean()


def test_held_out_sets_come_after_the_design_sets() -> None:
    """Appending keeps the seeds (and so the pixels) of the sets the method was chosen on."""
    from models.data.shifts import GROSS_SHIFTS, HELD_OUT_SHIFTS

    names = list(SHIFTS)
    assert names[-len(HELD_OUT_SHIFTS) :] == list(HELD_OUT_SHIFTS)
    assert not set(HELD_OUT_SHIFTS) & set(GROSS_SHIFTS)
