"""The evaluation geometry (models/data/transforms.py): torchvision's resize and centre crop, at a bounded cost."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from models.data.transforms import MAX_TWO_STEP_ASPECT, ResizeCentreCrop, eval_transform
from models.encoders.spec import EncoderSpec


def _two_steps(image: Image.Image, size: int) -> np.ndarray:
    return np.asarray(transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])(image), dtype=int)


def _random_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_near_square_images_take_torchvisions_two_steps_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    for _ in range(60):
        size = int(rng.choice([8, 32, 64]))
        short = int(rng.integers(1, 80))
        long_ = int(rng.integers(short, int(short * MAX_TWO_STEP_ASPECT) + 1))
        w, h = (short, long_) if rng.random() < 0.5 else (long_, short)
        image = _random_image(rng, w, h)
        got = np.asarray(ResizeCentreCrop(size)(image), dtype=int)
        np.testing.assert_array_equal(got, _two_steps(image, size), err_msg=f"{w}x{h} to {size}")


def test_far_from_square_images_are_within_one_grey_level_of_the_two_steps() -> None:
    rng = np.random.default_rng(1)
    for _ in range(60):
        size = int(rng.choice([8, 32, 64]))
        short = int(rng.integers(1, 12))
        long_ = int(short * rng.uniform(MAX_TWO_STEP_ASPECT + 0.1, 60))
        w, h = (short, long_) if rng.random() < 0.5 else (long_, short)
        image = _random_image(rng, w, h)
        got = np.asarray(ResizeCentreCrop(size)(image), dtype=int)
        want = _two_steps(image, size)
        assert got.shape == want.shape == (size, size, 3)
        assert np.abs(got - want).max() <= 1, f"{w}x{h} to {size}"


def test_a_long_strip_costs_only_the_crop() -> None:
    """A 1 x 200,000 strip (667 bytes as a PNG) was resized to 32 x 6,400,000 pixels before the crop."""
    sizes: list[tuple[int, int]] = []
    original = Image.Image.resize

    def recording(self: Image.Image, size: tuple[int, int], *args: object, **kwargs: object) -> Image.Image:
        sizes.append(tuple(size))
        return original(self, size, *args, **kwargs)

    strip = Image.new("RGB", (200_000, 1), (200, 10, 30))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Image.Image, "resize", recording)
        out = ResizeCentreCrop(32)(strip)
    assert out.size == (32, 32)
    assert np.all(np.asarray(out) == (200, 10, 30))
    assert max(w * h for w, h in sizes) <= 32 * 32


def test_the_evaluation_transform_uses_it() -> None:
    spec = EncoderSpec(arch="resnet18", cifar_stem=True, image_size=32, dim=128)
    x = eval_transform(spec)(Image.new("RGB", (1, 100_000), (255, 255, 255)))
    assert tuple(x.shape) == (3, 32, 32)
