"""The ring buffer of recent images: exact contents after wrap-around, bounded, shape errors."""

from __future__ import annotations

import numpy as np
import pytest

from models.monitoring.image_properties import PROPERTIES
from models.monitoring.window import SIGNALS, RingWindow


def _batch(first: int, b: int, dim: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Image i has vector (i, -i, ...) and signals risk i/10, confidence NaN, atypical i % 2, low 0,
    typicality 2 i."""
    ids = np.arange(first, first + b, dtype=np.float32)
    vectors = np.stack([ids * (-1) ** j for j in range(dim)], axis=1)
    signals = np.stack([ids / 10, np.full(b, np.nan), ids % 2, np.zeros(b), 2 * ids]).astype(np.float32)
    return vectors, signals


def test_window_wraps_around_keeping_the_last_images_oldest_first() -> None:
    window = RingWindow(capacity=4, dim=2)
    window.append(*_batch(0, 3))
    assert window.count == 3 and window.seen == 3
    np.testing.assert_array_equal(window.contents().vectors[:, 0], [0, 1, 2])
    window.append(*_batch(3, 3))  # images 3, 4, 5: 0 and 1 fall out
    contents = window.contents()
    assert window.count == 4 and window.seen == 6
    np.testing.assert_array_equal(contents.vectors, [[2, -2], [3, -3], [4, -4], [5, -5]])
    np.testing.assert_allclose(contents.risk, [0.2, 0.3, 0.4, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(contents.atypical, [0, 1, 0, 1])
    np.testing.assert_array_equal(contents.typicality, [4, 6, 8, 10])
    assert np.isnan(contents.confidence).all()
    # slots 0 and 1 now hold images 4 and 5
    np.testing.assert_array_equal(window.vectors[:, 0], [4, 5, 2, 3])


def test_window_keeps_the_tail_of_a_batch_larger_than_itself() -> None:
    window = RingWindow(capacity=3, dim=2)
    window.append(*_batch(0, 1))
    window.append(*_batch(1, 7))  # images 1..7: only 5, 6, 7 stay
    assert window.count == 3 and window.seen == 8
    np.testing.assert_array_equal(window.contents().vectors[:, 0], [5, 6, 7])


def test_window_values_skip_unknown_signals() -> None:
    window = RingWindow(capacity=8, dim=2)
    window.append(*_batch(0, 5))
    np.testing.assert_allclose(np.sort(window.values("risk")), [0.0, 0.1, 0.2, 0.3, 0.4], rtol=1e-6)
    assert window.values("confidence").size == 0
    assert window.values("atypical").mean() == pytest.approx(2 / 5)
    assert SIGNALS == ("risk", "confidence", "atypical", "low_quality", "typicality")


def test_window_contents_are_a_copy() -> None:
    window = RingWindow(capacity=2, dim=2)
    window.append(*_batch(0, 2))
    contents = window.contents()
    window.append(*_batch(2, 2))
    np.testing.assert_array_equal(contents.vectors[:, 0], [0, 1])


def test_window_rejects_mismatched_shapes() -> None:
    window = RingWindow(capacity=4, dim=3)
    with pytest.raises(ValueError, match=r"expected vectors \(2, 3\) and signals \(5, 2\)"):
        window.append(*_batch(0, 2, dim=2))
    with pytest.raises(ValueError, match="capacity >= 1"):
        RingWindow(capacity=0, dim=3)


def _probabilities(first: int, b: int) -> np.ndarray:
    """Image i's class probabilities: (i, 1 - i) / 10 over two classes (images 0..10)."""
    ids = np.arange(first, first + b, dtype=np.float32)
    return np.stack([ids / 10, 1 - ids / 10], axis=1)


def test_window_keeps_class_probabilities_through_wrap_around() -> None:
    window = RingWindow(capacity=4, dim=2, classes=2)
    window.append(*_batch(0, 3), _probabilities(0, 3))
    window.append(*_batch(3, 3), _probabilities(3, 3))  # slots 0, 1 now hold images 4, 5
    np.testing.assert_allclose(window.contents().probabilities[:, 0], [0.2, 0.3, 0.4, 0.5], rtol=1e-6)  # type: ignore[index]
    np.testing.assert_allclose(window.probability_rows()[:, 0], [0.4, 0.5, 0.2, 0.3], rtol=1e-6)  # type: ignore[index]
    window.append(*_batch(6, 9), _probabilities(6, 9) / 2)  # larger than the window: its last four
    np.testing.assert_allclose(window.contents().probabilities[:, 0], [0.55, 0.6, 0.65, 0.7], rtol=1e-6)  # type: ignore[index]
    copy = window.probability_rows()
    window.append(*_batch(0, 4), _probabilities(0, 4))
    assert copy is not None and copy[:, 0].min() > 0.5  # a copy, not a view


def test_window_probabilities_are_required_where_kept_and_refused_elsewhere() -> None:
    with_classes, without = RingWindow(capacity=4, dim=2, classes=2), RingWindow(capacity=4, dim=2)
    with pytest.raises(ValueError, match=r"expected probabilities \(2, 2\), got None"):
        with_classes.append(*_batch(0, 2))
    with pytest.raises(ValueError, match=r"expected probabilities \(2, 2\), got \(2, 3\)"):
        with_classes.append(*_batch(0, 2), np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"expected probabilities None, got \(2, 2\)"):
        without.append(*_batch(0, 2), _probabilities(0, 2))
    assert without.probability_rows() is None and without.contents().probabilities is None
    with pytest.raises(ValueError, match="classes >= 0"):
        RingWindow(capacity=4, dim=2, classes=-1)


def _properties(first: int, b: int) -> np.ndarray:
    """Image i's properties: row k holds i + k / 10."""
    ids = np.arange(first, first + b, dtype=np.float32)
    return np.stack([ids + k / 10 for k in range(len(PROPERTIES))])


def test_window_keeps_image_properties_through_wrap_around_nan_where_not_given() -> None:
    window = RingWindow(capacity=4, dim=2)
    window.append(*_batch(0, 3), properties=_properties(0, 3))
    window.append(*_batch(3, 1))  # recorded without its pixels: NaN
    window.append(*_batch(4, 2), properties=_properties(4, 2))  # images 2..5 stay
    got = window.contents().properties
    assert got is not None and got.shape == (len(PROPERTIES), 4)
    np.testing.assert_allclose(got[0], [2, np.nan, 4, 5])
    np.testing.assert_allclose(got[-1], [2.5, np.nan, 4.5, 5.5], rtol=1e-6)
    window.append(*_batch(6, 9), properties=_properties(6, 9))  # larger than the window: its last four
    np.testing.assert_allclose(window.contents().properties[0], [11, 12, 13, 14])  # type: ignore[index]
    with pytest.raises(ValueError, match=r"expected properties \(6, 2\), got \(5, 2\)"):
        window.append(*_batch(0, 2), properties=np.zeros((5, 2), np.float32))
