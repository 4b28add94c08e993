"""Shift sets: seeded, of the right kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.shifts import SHIFTS, apply_shift, write_shift_set


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
