"""Versions of encoders and feature sets on disk, and which pair is active.

Layout under the registry root::

    models/<version>/encoder.safetensors   weights and spec (ResNets, timm architectures)
    models/<version>/encoder.pt            or the TorchScript module, as it was imported
    models/<version>/encoder.onnx          or the ONNX model, as it was imported
    models/<version>/encoder.pt2           or the torch.export program, as it was imported
    models/<version>/model.json            ModelRecord (spec: architecture, preprocessing, dim)
    feature_sets/<version>/feature_set.json
    feature_sets/<version>/atlases/<name>/ a feature atlas of it (models/explanation/atlas.py)
    feature_sets/<version>/atlas.json      {"atlas": <name>}: the one GET /atlas serves
    active.json                            {"model": ..., "feature_set": ...}
    exports/<fingerprint>-<arch>-<S>px.onnx  ONNX exports of encoders, for QSCORE_RUNTIME=onnxruntime

A version folder (and an atlas folder) is written under a temporary name and renamed into place,
and ``active.json`` (and ``atlas.json``) is replaced atomically, so readers never see half a
version. Versions are never overwritten.
Names are checked against a strict pattern: no client-supplied path is ever opened.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from models.encoders.loading import ImportedEncoder, load_encoder, save_encoder
from models.encoders.onnx_encoder import OnnxEncoder, save_onnx
from models.encoders.spec import EXPORT_ARCH, FILE_ARCHS, ONNX_ARCH, TORCHSCRIPT_ARCH, Encoder, EncoderSpec, fingerprint
from models.explanation.atlas import Atlas, write_atlas
from models.scoring.compatibility import FeatureSetMismatch, check_fits
from models.scoring.feature_set import FeatureSet
from models.scoring.probe import HeadError, HeadInfo, read_head_file
from models.storage.atomic import atomic_directory, remove_stale_temporaries, write_json_atomic

VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


WEIGHTS_FILE = "encoder.safetensors"


TORCHSCRIPT_FILE = "encoder.pt"


ONNX_FILE = "encoder.onnx"


EXPORT_FILE = "encoder.pt2"


#: The file of each kind of encoder kept as it was imported.
FILE_NAMES = {TORCHSCRIPT_ARCH: TORCHSCRIPT_FILE, ONNX_ARCH: ONNX_FILE, EXPORT_ARCH: EXPORT_FILE}


EXPORTS_DIR = "exports"


MODEL_FILE = "model.json"


FEATURE_SET_FILE = "feature_set.json"


ACTIVE_FILE = "active.json"


ATLASES_DIR = "atlases"


CURRENT_ATLAS_FILE = "atlas.json"


#: The demo encoder and its feature set, shipped as package data of ``models``.
DEMO_DIR = Path(str(resources.files("models") / "weights"))


DEMO_VERSION = "demo"


class RegistryError(ValueError):
    """An unknown or invalid version, or a pairing that does not fit."""


class VersionExists(RegistryError):
    """A version name that is taken: versions are never overwritten."""


class ModelRecord(BaseModel):
    version: str
    fingerprint: str
    spec: EncoderSpec
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    parent: str | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    imported_from: str | None = Field(None, description="Name of the file `qscore import` registered.")


class ActivePair(BaseModel):
    model: str
    feature_set: str
    #: Who set it: "job:<id>" for a job asked to activate its output (``"activate": true``), which
    #: every service follows; None for the command line and the admin API, which a service follows
    #: only with QSCORE_AUTO_SWITCH.
    set_by: str | None = None

    @staticmethod
    def by_job(job_id: str) -> str:
        """The ``set_by`` of a job's activation."""
        return f"job:{job_id}"

    @property
    def set_by_a_job(self) -> bool:
        return (self.set_by or "").startswith("job:")


def check_version(version: str) -> str:
    # fullmatch: with match, "$" would accept a trailing newline ("v1\n")
    if not VERSION_PATTERN.fullmatch(version or ""):
        raise RegistryError(
            f"invalid version name {version!r}: use 1-80 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return version


def new_version(prefix: str, fingerprint: str | None = None) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    return check_version(f"{prefix}-{stamp}" + (f"-{fingerprint[:8]}" if fingerprint else ""))


class Registry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.models_dir = self.root / "models"
        self.feature_sets_dir = self.root / "feature_sets"
        #: ONNX exports of the encoders, by fingerprint (models/encoders/runtime.py writes them).
        self.exports_dir = self.root / EXPORTS_DIR

    # -- models ---------------------------------------------------------------------------
    def model_dir(self, version: str) -> Path:
        return self.models_dir / check_version(version)

    def public(self, exc: Exception) -> str:
        """``exc``'s message for an API client: the registry named, not its path on this server."""
        message = str(exc)
        for folder, name in (
            (self.models_dir, "the registry's models"),
            (self.feature_sets_dir, "the registry's feature sets"),
            (self.root, "the registry"),
        ):
            message = message.replace(str(folder), name)
        return message

    def list_models(self) -> list[ModelRecord]:
        return [self.model_record(p.name) for p in _versions(self.models_dir)]

    def model_record(self, version: str) -> ModelRecord:
        path = self.model_dir(version) / MODEL_FILE
        if not path.is_file():
            raise RegistryError(f"no model version {version!r} in {self.models_dir}")
        return ModelRecord.model_validate_json(path.read_text())

    def load_model(self, version: str) -> ImportedEncoder:
        record = self.model_record(version)
        spec = record.spec
        path = self.model_dir(version) / weights_file(spec)
        if spec.source == "torchvision":
            imported = load_encoder(path)
        else:  # preprocessing and dimension from the record, checked again by the probe
            imported = load_encoder(
                path, arch=spec.arch, image_size=spec.image_size, mean=spec.mean, std=spec.std, dim=spec.dim
            )
        if imported.fingerprint != record.fingerprint:
            raise RegistryError(f"model {version!r}: weights do not match the recorded fingerprint")
        return imported

    def add_model(
        self,
        encoder: Encoder,
        *,
        version: str | None = None,
        parent: str | None = None,
        training: dict[str, Any] | None = None,
        imported_from: str | None = None,
    ) -> ModelRecord:
        version = version or new_version("model", fingerprint(encoder.backbone_state_dict()))
        with atomic_directory(self._new_dir(self.models_dir, version, "model")) as tmp:
            digest = save_encoder(encoder, tmp / weights_file(encoder.spec))
            record = ModelRecord(
                version=version,
                fingerprint=digest,
                spec=encoder.spec,
                parent=parent,
                training=training or {},
                imported_from=imported_from,
            )
            write_json_atomic(tmp / MODEL_FILE, record.model_dump(mode="json"))
        return record

    def import_model(
        self, path: str | Path, *, version: str | None = None, source_name: str | None = None, **source: Any
    ) -> ModelRecord:
        """Register an encoder file (TorchScript, ONNX, torch.export, timm state dict, ResNet checkpoint).

        ``source``: ``arch``, ``image_size``, ``mean``, ``std`` as :func:`load_encoder` takes
        them. The file is loaded and probed first; nothing is written when that fails. A
        TorchScript, ONNX or torch.export file is kept byte for byte; other weights are stored as
        safetensors with their spec.
        """
        if version is not None:
            self._new_dir(self.models_dir, version, "model")  # refuse a taken name before the work
        imported = load_encoder(path, **source)
        version = check_version(version or new_version("model", imported.fingerprint))
        name = source_name or Path(path).name
        if imported.encoder.spec.source not in FILE_ARCHS:
            return self.add_model(imported.encoder, version=version, imported_from=name)
        return self.add_model_from_file(Path(path), imported, version, imported_from=name)

    # -- feature sets ---------------------------------------------------------------------
    def feature_set_dir(self, version: str) -> Path:
        return self.feature_sets_dir / check_version(version)

    def list_feature_sets(self) -> list[tuple[str, FeatureSet]]:
        return [(p.name, self.load_feature_set(p.name)) for p in _versions(self.feature_sets_dir)]

    def load_feature_set(self, version: str) -> FeatureSet:
        path = self.feature_set_dir(version) / FEATURE_SET_FILE
        if not path.is_file():
            raise RegistryError(f"no feature set version {version!r} in {self.feature_sets_dir}")
        return FeatureSet.load(path)

    def add_feature_set(self, feature_set: FeatureSet, *, version: str | None = None) -> str:
        model_version = feature_set.encoder.model_version
        if model_version is not None:
            record = self.model_record(model_version)
            try:
                check_fits(feature_set, record.fingerprint, record.spec, model=model_version)
            except FeatureSetMismatch as exc:
                raise RegistryError(str(exc)) from exc
        version = version or new_version("features", feature_set.encoder.fingerprint)
        with atomic_directory(self._new_dir(self.feature_sets_dir, version, "feature set")) as tmp:
            feature_set.save(tmp / FEATURE_SET_FILE)
        return version

    def attach_head(
        self, feature_set: str, path: str | Path, *, classes: list[str] | None = None, version: str | None = None
    ) -> str:
        """A new feature-set version: ``feature_set`` with a user's head (linear safetensors or TorchScript).

        Versions are immutable, so the head goes to a copy. A risk model or error estimator that
        reads the old head's signals no longer holds and is dropped (run the evaluation again:
        it keeps a registered head and refits them on its mistakes).
        """
        fs = self.load_feature_set(feature_set)
        head = read_head_file(path, classes)
        info = HeadInfo(
            kind=head.kind, classes=head.classes, source=f"registered from {Path(path).name}", registered=True
        )
        try:
            copy = fs.with_head(head, info)
        except HeadError as exc:
            raise RegistryError(f"the head does not fit feature set {feature_set!r}: {exc}") from exc
        reads_head = fs.risk_model is not None and any(s.startswith("probe_") for s in fs.risk_model.signals)
        # ATC's and COTT's thresholds were learnt on the old head's outputs, a set-level correction on its errors
        estimator = fs.error_estimator
        fitted_on_old_head = estimator is not None and (
            estimator.method in ("atc", "cott") or estimator.correction is not None
        )
        stale: dict[str, None] = {}
        if reads_head:
            stale["risk_model"] = None
        if reads_head or fitted_on_old_head:
            stale["error_estimator"] = None
        return self.add_feature_set(copy.model_copy(update=stale), version=version)

    # -- feature atlases (beside their feature set) ----------------------------------------
    def atlas_dir(self, feature_set: str, name: str) -> Path:
        return self.feature_set_dir(feature_set) / ATLASES_DIR / check_version(name)

    def add_atlas(self, feature_set: str, name: str, atlas: Atlas | None = None) -> Path:
        """Write ``atlas`` as atlas ``name`` of ``feature_set`` (atomically) and make it the one served.

        An atlas that exists already is kept as it is (a job delivered twice writes once); ``atlas``
        may then be None.
        """
        if not (self.feature_set_dir(feature_set) / FEATURE_SET_FILE).is_file():
            raise RegistryError(f"no feature set version {feature_set!r} in {self.feature_sets_dir}")
        target = self.atlas_dir(feature_set, name)
        if not target.exists():
            if atlas is None:
                raise RegistryError(f"feature set {feature_set!r} has no atlas {name!r} yet, and none was given")
            write_atlas(atlas, target)
        write_json_atomic(self.feature_set_dir(feature_set) / CURRENT_ATLAS_FILE, {"atlas": name})
        return target

    def current_atlas(self, feature_set: str) -> Path | None:
        """The folder of the atlas served for ``feature_set`` (the latest written), or None."""
        pointer = self.feature_set_dir(feature_set) / CURRENT_ATLAS_FILE
        if not pointer.is_file():
            return None
        target = self.atlas_dir(feature_set, json.loads(pointer.read_text())["atlas"])
        return target if target.is_dir() else None

    # -- the active pair ------------------------------------------------------------------
    def active(self) -> ActivePair | None:
        path = self.root / ACTIVE_FILE
        if not path.is_file():
            return None
        return ActivePair.model_validate_json(path.read_text())

    def active_mtime(self) -> float | None:
        path = self.root / ACTIVE_FILE
        return path.stat().st_mtime if path.is_file() else None

    def check_pair(self, model: str, feature_set: str) -> tuple[ModelRecord, FeatureSet]:
        record = self.model_record(model)
        features = self.load_feature_set(feature_set)
        try:
            check_fits(features, record.fingerprint, record.spec, model=model, feature_set_version=feature_set)
        except FeatureSetMismatch as exc:
            raise RegistryError(str(exc)) from exc
        return record, features

    def set_active(self, model: str, feature_set: str, *, set_by: str | None = None) -> ActivePair:
        self.check_pair(model, feature_set)
        pair = ActivePair(model=model, feature_set=feature_set, set_by=set_by)
        write_json_atomic(self.root / ACTIVE_FILE, pair.model_dump(exclude_none=True))
        return pair

    def latest_feature_set_for(self, fingerprint: str) -> str | None:
        matches = [(fs.created_at, v) for v, fs in self.list_feature_sets() if fs.encoder.fingerprint == fingerprint]
        return max(matches)[1] if matches else None

    # -- housekeeping ---------------------------------------------------------------------
    def clean(self) -> list[Path]:
        """Remove leftovers of interrupted writes."""
        removed = (
            remove_stale_temporaries(self.models_dir)
            + remove_stale_temporaries(self.feature_sets_dir)
            + remove_stale_temporaries(self.exports_dir)
        )
        for folder in _versions(self.feature_sets_dir):
            removed += remove_stale_temporaries(folder / ATLASES_DIR)
        return removed

    def seed_demo(self, demo_dir: Path = DEMO_DIR) -> bool:
        """Install the packaged demo encoder and feature set when the registry is empty."""
        if self.active() is not None or _versions(self.models_dir):
            return False
        weights, features = demo_dir / "demo-encoder.safetensors", demo_dir / "demo-feature-set.json"
        if not weights.is_file() or not features.is_file():
            raise RegistryError(f"the demo encoder is missing from {demo_dir}; run `qscore pretrain` first")
        imported = load_encoder(weights)
        self.add_model_from_file(weights, imported, DEMO_VERSION)
        fs = FeatureSet.load(features)
        fs.encoder.model_version = DEMO_VERSION
        self.add_feature_set(fs, version=DEMO_VERSION)
        self.set_active(DEMO_VERSION, DEMO_VERSION)
        return True

    def add_model_from_file(
        self,
        weights: Path,
        imported: ImportedEncoder,
        version: str,
        training: dict[str, Any] | None = None,
        imported_from: str | None = None,
    ) -> ModelRecord:
        record = ModelRecord(
            version=check_version(version),
            fingerprint=imported.fingerprint,
            spec=imported.encoder.spec,
            training=training or {},
            imported_from=imported_from,
        )
        with atomic_directory(self._new_dir(self.models_dir, version, "model")) as tmp:
            if isinstance(imported.encoder, OnnxEncoder):  # as loaded: with any external data read in
                save_onnx(imported.encoder, tmp / weights_file(imported.encoder.spec))
            else:
                shutil.copyfile(weights, tmp / weights_file(imported.encoder.spec))
            write_json_atomic(tmp / MODEL_FILE, record.model_dump(mode="json"))
        return record

    def _new_dir(self, parent: Path, version: str, what: str) -> Path:
        target = parent / check_version(version)
        if target.exists():
            raise VersionExists(f"{what} version {version!r} already exists; choose another name")
        return target


def weights_file(spec: EncoderSpec) -> str:
    """The weights file of a version: the TorchScript, ONNX or torch.export file, or safetensors."""
    return FILE_NAMES.get(spec.source, WEIGHTS_FILE)


def _versions(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and VERSION_PATTERN.fullmatch(p.name))
