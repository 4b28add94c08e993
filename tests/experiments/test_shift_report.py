"""The shift report's goal arithmetic on a hand-made result (the measuring itself is an experiment)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.shift_report import goals


def _row(name, kind, error, risk, estimate, p, added=False, severity=None, mmd_p=0.5, cott=None, before=None,
         later=False):  # fmt: skip
    miss = np.array([True] * int(error * 10) + [False] * (10 - int(error * 10)))
    return {"set": name, "kind": kind, "severity": severity, "added_after": added or later, "error": error,
            "added_after_properties": later, "mean_risk": risk, "mean_risk_today": 0.1, "estimate": estimate,
            "atc": error, "cott": cott, "drift_p": p, "drift_mmd_p": mmd_p,
            "drift_p_without_properties": p if before is None else before,
            "_risk": np.full(10, risk), "_today": np.full(10, 0.1), "_miss": miss}  # fmt: skip


def test_goals_hand_case() -> None:
    rows = [
        _row("clean", "clean", 0.2, 0.2, 0.2, 0.5),
        _row("noise/s3", "corruption", 0.6, 0.5, 0.5, 0.001, severity=3, cott=0.7),  # the typicality test saw it
        _row("invert", "extra", 0.5, 0.4, 0.5, 0.004, mmd_p=0.002),  # the MMD saw it
        _row("blur/s3", "corruption", 0.4, 0.15, 0.3, 0.2, severity=3),  # risk below clean, error higher
        _row("tint/s3", "corruption", 0.2, 0.2, 0.2, 0.006, severity=3, before=0.3),  # only the image properties saw it
        _row("gamma/s3", "corruption", 0.3, 0.3, 0.3, 0.002, severity=3, later=True, before=0.02),  # made after them
        _row("swap", "extra", 0.3, 0.3, 0.3, 0.02, later=True),
        _row("hue/s1", "corruption", 0.2, 0.25, 0.2, 0.3, added=True, severity=1),
        _row("gross/digits", "gross", 1.0, 0.9, 0.9, 0.001, added=True),
    ]
    windows = {"p_values": [0.5, 0.005], "resampled_p_values": [0.2, 0.3, 0.009],
               "_risk": np.full(10, 0.2), "_miss": rows[0]["_miss"]}  # fmt: skip
    g = goals({"rows": rows, "clean_windows": windows})
    assert g["window_mae_all_shifted"] == pytest.approx((0.1 + 0.0 + 0.1 + 0.0 + 0.0 + 0.0 + 0.0) / 7)
    assert g["window_mae_design_left_out"] == pytest.approx(0.2 / 4)
    assert g["window_mae_added_after"] == pytest.approx(0.0)
    assert g["sets_below_clean_risk_with_higher_error"] == ["blur/s3"]
    # 4 of 10 wrong against 2 of 10: z = 0.2 / sqrt(0.3 * 0.7 * 0.2) = 0.98 < 1.645, within the noise
    assert g["sets_below_clean_risk_with_significantly_higher_error"] == []
    assert g["window_mae_atc"] == 0.0
    assert g["window_mae_cott"] == pytest.approx(0.1)  # the one set with a COTT figure: |0.7 - 0.6|
    assert g["drift_detected_sev3_and_extras"] == "3/4" and g["drift_missed"] == ["blur/s3"]
    assert g["drift_detected_by_mmd_alone"] == "1/4" and g["drift_detected_without_properties"] == "2/4"
    # the sets made after the image properties, apart
    assert g["drift_detected_later_sets"] == "1/2" and g["drift_missed_later_sets"] == ["swap"]
    assert g["drift_detected_later_sets_without_properties"] == "0/2"
    assert g["clean_window_false_alarms"] == "1/2" and g["resampled_clean_window_false_alarms"] == "1/3"
    assert g["no_class_mean_risk"] == {"gross/digits": 0.9}
    assert g["ece_clean"] == pytest.approx(0.0)  # risk 0.2 on sets whose error is 0.2
    # a set whose error is far above clean's while its risk is below: beyond the noise
    fog = _row("fog/s5", "corruption", 0.9, 0.15, 0.9, 0.001)
    g = goals({"rows": [*rows, fog], "clean_windows": windows})
    # 9 of 10 against 2 of 10: z = 0.7 / sqrt(0.55 * 0.45 * 0.2) = 3.15
    assert g["sets_below_clean_risk_with_higher_error"] == ["blur/s3", "fog/s5"]
    assert g["sets_below_clean_risk_with_significantly_higher_error"] == ["fog/s5"]
    assert g["window_mae_all_shifted"] == pytest.approx(0.2 / 8)
