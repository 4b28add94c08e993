"""The on-disk registry and atomic writes (models/registry/versions.py, models/storage/atomic.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from models.registry.versions import Registry, RegistryError, check_version
from models.storage.atomic import atomic_directory, atomic_path, remove_stale_temporaries, write_json_atomic

REPO = Path(__file__).resolve().parents[2]


def test_versions_are_never_overwritten(tiny_registry, tiny_model):
    encoder, _, feature_set = tiny_model
    record = tiny_registry.model_record("tiny")
    with pytest.raises(RegistryError, match="model version 'tiny' already exists"):
        tiny_registry.add_model(encoder, version="tiny")
    fs = feature_set.model_copy(deep=True)
    fs.encoder.model_version = "tiny"
    with pytest.raises(RegistryError, match="feature set version 'tiny' already exists"):
        tiny_registry.add_feature_set(fs, version="tiny")
    # the stored version is untouched
    assert tiny_registry.model_record("tiny") == record
    assert [r.version for r in tiny_registry.list_models()] == ["tiny"]


def test_new_versions_are_added_beside(tiny_registry, tiny_model):
    encoder, digest, _ = tiny_model
    record = tiny_registry.add_model(encoder)
    assert record.version.startswith("model-") and record.version.endswith(digest[:8])
    assert sorted(r.version for r in tiny_registry.list_models()) == sorted(["tiny", record.version])
    assert tiny_registry.load_model(record.version).fingerprint == digest


@pytest.mark.parametrize(
    "version",
    ["../x", "..", "a/b", "/etc/passwd", "", ".hidden", "x" * 81, "sp ace", "a\\b", "ok\n"],
)
def test_invalid_version_names_are_refused(tiny_registry, version):
    with pytest.raises(RegistryError, match="invalid version name"):
        check_version(version)
    with pytest.raises(RegistryError, match="invalid version name"):
        tiny_registry.model_record(version)
    with pytest.raises(RegistryError, match="invalid version name"):
        tiny_registry.load_feature_set(version)


def test_invalid_version_on_add_writes_nothing(tiny_registry, tiny_model):
    encoder, _, _ = tiny_model
    with pytest.raises(RegistryError, match="invalid version name '../escape'"):
        tiny_registry.add_model(encoder, version="../escape")
    assert not (tiny_registry.root / "escape").exists()
    assert not (tiny_registry.models_dir.parent / "escape").exists()


def test_set_active_refuses_mismatched_pair(tiny_registry, tiny_spec):
    torch.manual_seed(123)
    from models.encoders.resnet import build_encoder

    tiny_registry.add_model(build_encoder(tiny_spec), version="other")
    with pytest.raises(RegistryError, match="feature set 'tiny' was found on encoder .* but model 'other'"):
        tiny_registry.set_active("other", "tiny")
    pair = tiny_registry.active()
    assert (pair.model, pair.feature_set) == ("tiny", "tiny")  # unchanged
    with pytest.raises(RegistryError, match="no model version 'absent'"):
        tiny_registry.set_active("absent", "tiny")
    with pytest.raises(RegistryError, match="no feature set version 'absent'"):
        tiny_registry.set_active("tiny", "absent")


def test_feature_set_for_another_model_is_refused(tiny_registry, tiny_model, tiny_spec):
    _, _, feature_set = tiny_model
    torch.manual_seed(321)
    from models.encoders.resnet import build_encoder

    tiny_registry.add_model(build_encoder(tiny_spec), version="other")
    fs = feature_set.model_copy(deep=True)
    fs.encoder.model_version = "other"
    with pytest.raises(RegistryError, match="but model 'other' is"):
        tiny_registry.add_feature_set(fs, version="wrong")
    assert not tiny_registry.feature_set_dir("wrong").exists()


def test_tampered_weights_are_detected(tiny_registry):
    from safetensors.torch import load_file, save_file

    path = tiny_registry.model_dir("tiny") / "encoder.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors["conv1.weight"] = tensors["conv1.weight"] + 1
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(RegistryError, match="do not match the recorded fingerprint"):
        tiny_registry.load_model("tiny")


def test_latest_feature_set_for(tiny_registry, tiny_model):
    _, digest, _ = tiny_model
    assert tiny_registry.latest_feature_set_for(digest) == "tiny"
    assert tiny_registry.latest_feature_set_for("0" * 64) is None


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
