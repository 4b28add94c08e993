"""Atomic writes (models/storage/atomic.py): a failed or killed write leaves the old file or
nothing, never half of one, and its leftovers are cleaned up."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from models.registry.versions import Registry
from models.storage.atomic import atomic_directory, atomic_path, remove_stale_temporaries, write_json_atomic

REPO = Path(__file__).resolve().parents[3]


# --- atomic writes --------------------------------------------------------------------------


def test_atomic_directory_exception_leaves_no_target(tmp_path):
    target = tmp_path / "models" / "v1"
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(target) as tmp:
        (tmp / "weights").write_bytes(b"half")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_atomic_directory_refuses_existing_target(tmp_path):
    target = tmp_path / "v1"
    target.mkdir()
    (target / "keep").write_text("old")
    with pytest.raises(FileExistsError, match="never overwritten"), atomic_directory(target) as tmp:
        (tmp / "keep").write_text("new")
    assert (target / "keep").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]


def test_atomic_path_exception_keeps_old_content(tmp_path):
    target = tmp_path / "fs.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"v": 2, "trunc')
        raise RuntimeError("crash mid-write")
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"v":1}'
    assert [p.name for p in tmp_path.iterdir()] == ["fs.json"]


def _crash(code: str) -> None:
    """Run ``code`` in a fresh interpreter that dies with os._exit (no cleanup, like a kill)."""
    script = f"import os, sys\nsys.path.insert(0, {str(REPO)!r})\n" + textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 17, result.stderr


def test_hard_crash_leaves_no_target_and_clean_removes_leftovers(tmp_path):
    registry = Registry(tmp_path / "registry")
    models_dir = registry.models_dir
    _crash(f"""
        from pathlib import Path
        from models.storage.atomic import atomic_directory
        with atomic_directory(Path({str(models_dir / "v1")!r})) as tmp:
            (tmp / "encoder.safetensors").write_bytes(b"partial")
            os._exit(17)
    """)
    fs_dir = registry.feature_sets_dir
    fs_dir.mkdir(parents=True)
    (fs_dir / "f1").mkdir()
    (fs_dir / "f1" / "feature_set.json").write_text('{"old": true}')
    _crash(f"""
        from pathlib import Path
        from models.storage.atomic import atomic_path
        with atomic_path(Path({str(fs_dir / "f1" / "feature_set.json")!r})) as tmp:
            tmp.write_text("{{half")
            os._exit(17)
    """)
    # nothing half-written is visible under its real name
    assert not (models_dir / "v1").exists()
    assert registry.list_models() == []
    assert (fs_dir / "f1" / "feature_set.json").read_text() == '{"old": true}'
    leftovers = [p.name for p in models_dir.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-v1-")
    assert any(p.name.startswith(".tmp-") for p in (fs_dir / "f1").iterdir())
    removed = registry.clean()
    assert [p.name for p in removed] == leftovers
    assert list(models_dir.iterdir()) == []
    # leftovers inside a version folder are cleaned with remove_stale_temporaries on that folder
    assert len(remove_stale_temporaries(fs_dir / "f1")) == 1
    assert [p.name for p in (fs_dir / "f1").iterdir()] == ["feature_set.json"]
