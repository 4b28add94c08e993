"""The on-disk registry (models/registry/versions.py); its atomic writes are tested in tests/models/storage."""

from __future__ import annotations

import pytest
import torch

from models.registry.versions import RegistryError, check_version


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
