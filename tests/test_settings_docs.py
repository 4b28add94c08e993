"""The README's settings table against the one settings class: every setting documented, none
invented, and each documented literal default the class's own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic_core import PydanticUndefined

from qscore_config.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
ROW = re.compile(r"^\| `(QSCORE_[A-Z0-9_]+)` \| ([^|]*) \|", re.M)


def documented() -> dict[str, str]:
    return dict(ROW.findall(README.read_text()))


def env_names() -> dict[str, str]:
    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper(): name for name in Settings.model_fields}


def test_every_setting_has_a_row_and_every_row_a_setting() -> None:
    rows, names = documented(), env_names()
    assert sorted(set(names) - set(rows)) == [], "settings missing from the README's table"
    assert sorted(set(rows) - set(names)) == [], "README rows naming no setting"


def literal(cell: str) -> str | None:
    """The cell's first backticked value: the default as the README states it (None: in words)."""
    found = re.match(r"\s*`([^`]*)`", cell)
    return found.group(1) if found else None


@pytest.mark.parametrize("env", sorted(env_names()))
def test_documented_default_is_the_class_default(env: str) -> None:
    field = Settings.model_fields[env_names()[env]]
    stated = literal(documented()[env])
    default = field.default
    if default is None or default is PydanticUndefined or stated is None or stated.startswith("QSCORE_"):
        pytest.skip("default given in words (unset, derived or another setting)")
    if isinstance(default, bool):
        assert stated == str(default).lower()
    elif isinstance(default, int | float):
        assert float(stated) == float(default)
    else:
        assert stated == str(default)


def test_literal_reads_the_first_backticked_value() -> None:
    assert literal("`20` (seconds)") == "20"
    assert literal("unset") is None
