"""The Prometheus alert rules pass promtool's checks and their unit tests (fire and silence)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (scripts/test.sh installs it)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL or "promtool", *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120)


def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_alert_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_alert_rules_cover_every_required_alert() -> None:
    import yaml

    rules = yaml.safe_load((RULES_DIR / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {
        "QScoreHighLowQualityShare",
        "QScoreMedianShift",
        "QScoreErrorBurst",
        "QScoreQueueSaturated",
        "QScoreInputShift",
        "QScoreEstimatedAccuracyDrop",
        "QScoreRepresentationDrift",
    }
    tested = (RULES_DIR / "alerts_test.yml").read_text()
    for alert in alerts:
        assert tested.count(f"alertname: {alert}") >= 2, f"{alert} needs a fire and a silence case"
