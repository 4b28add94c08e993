"""The window-correction arithmetic of experiments/shift_tradeoffs.py on hand-made sets."""

from __future__ import annotations

import pytest

from experiments.shift_tradeoffs import corrected_lofo_mae


def _rows(residual_per_unit: float) -> list[dict]:
    """Three families, two sets each; the estimate misses the error by ``residual_per_unit * mmd2``."""
    rows = []
    for i, family in enumerate(("blur", "noise", "snow")):
        for j, mmd2 in enumerate((0.1 * (i + 1), 0.1 * (i + 1) + 0.05)):
            estimate = 0.2 + 0.1 * j
            rows.append({"family": family, "mmd2": mmd2, "estimate": estimate, "added_after": family == "snow",
                         "error": estimate + residual_per_unit * mmd2})  # fmt: skip
    return rows


def test_a_residual_linear_in_the_statistic_is_corrected_on_unseen_families() -> None:
    rows = _rows(0.8)
    uncorrected = sum(abs(r["estimate"] - r["error"]) for r in rows) / len(rows)
    assert uncorrected == pytest.approx(0.8 * (0.125 + 0.225 + 0.325) / 3)  # the mean mmd2 of each family
    mae = corrected_lofo_mae(rows, ["mmd2"])
    assert mae["all"] < 0.01 * uncorrected
    assert set(mae) == {"all", "design", "added_after"}


def test_corrected_estimates_are_clipped_to_one() -> None:
    rows = _rows(0.8)
    for r in rows:
        r["estimate"], r["error"] = r["estimate"] + 0.7, 1.0  # residuals pull the estimate above 1
    mae = corrected_lofo_mae(rows, ["mmd2"])
    assert all(0.0 <= v <= 0.3 for v in mae.values())
