"""Parameters of the three job types: checked by the API before anything is queued, and again
by the task that runs them (the same models), so a bad job never reaches the core.

Data sets are names that the configuration (``QSCORE_DATASETS``) maps to folders; models and
feature sets are registry versions. No client-supplied path is ever opened.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torchvision.datasets.folder import is_image_file

from models.encoders.export_program import NOT_TRAINABLE as EXPORT_NOT_TRAINABLE
from models.encoders.onnx_encoder import NOT_TRAINABLE as ONNX_NOT_TRAINABLE
from models.encoders.spec import EncoderSpec
from models.encoders.torchscript_encoder import NOT_TRAINABLE
from models.evaluation.defaults import DEFAULT_SHIFT_SAMPLES
from models.registry.versions import Registry, RegistryError
from qscore_config.settings import Settings

Method = Literal["simclr", "moco_v2", "byol", "swav"]
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$"


class ParamError(ValueError):
    """A parameter that names something that does not exist; ``field`` says which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class ParamConflict(ParamError):
    """Names that exist but do not fit together (or with the registry's state): the API's 409."""


#: No entry of an r-dimensional representation lies more than sqrt(r - 1) of its standard deviations
#: above its mean (one spike, the rest equal): above that nothing is dominant and every Q-Score is 0.
#: 100 bounds it for any r up to 10,001; :func:`resolve` checks the model's own r.
MAX_EPS = 100.0

#: Seeds as numpy and torch both take them.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class _Params(BaseModel):
    # Strict: `"seed": false` or `"lo": "0.3"` is refused (422) as the published schema says,
    # not coerced; and no infinity or NaN (JSON's 1e309 parses to infinity) gets past the bounds.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _integral_floats(cls, value: Any) -> Any:
        """JSON Schema counts 3.0 as an integer (strict pydantic would not); floats take ints."""
        return int(value) if isinstance(value, float) and value.is_integer() else value

    model: str | None = Field(None, pattern=NAME, description="Model version; default: the active one.")
    activate: bool | None = Field(
        None,
        description="Make the output the registry's active pair (the service follows it); default: QSCORE_AUTO_SWITCH.",
    )


class DiscoverParams(_Params):
    dataset: str = Field(pattern=NAME, description="A data set name from QSCORE_DATASETS.")
    eps: Annotated[float, Field(gt=0, le=MAX_EPS)] | Literal["auto"] = Field(
        4.0, description=f"Dominance threshold (std devs, positive, at most {MAX_EPS:g}) or 'auto'."
    )
    lo: float = Field(0.25, ge=0.0, lt=1.0, description="Lower end of the band of dominance shares; below hi.")
    hi: float = Field(0.75, gt=0.0, le=1.0, description="Upper end of the band; above lo (when size is not given).")
    size: int | None = Field(None, ge=1, le=100_000, description="Select this many features instead of a band.")
    sample_size: int | None = Field(5000, ge=10, le=10_000_000, description="Reference images; null = all.")
    seed: Seed = 0
    batch_size: int = Field(256, ge=1, le=4096)
    shards: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Count in this many parallel tasks; default: one per QSCORE_DISCOVER_SHARD_SIZE images.",
    )

    @model_validator(mode="after")
    def _band(self) -> DiscoverParams:
        if self.size is None and not self.lo < self.hi:
            raise ValueError(f"the band needs lo < hi, got lo={self.lo}, hi={self.hi}")
        return self


class RegularizeDiscoverParams(DiscoverParams):
    """A regularize job's discovery on its result. What it leaves out comes from the job, and eps is
    auto: a discover job's own default, eps 4, left a user's fine-tuned model 2 discriminative
    features (coverage 0.03, Q = 0 on ordinary images)."""

    dataset: str | None = Field(None, pattern=NAME, description="Default: the job's data set.")  # type: ignore[assignment]
    eps: Annotated[float, Field(gt=0, le=MAX_EPS)] | Literal["auto"] = Field(
        "auto", description=f"Dominance threshold (std devs, positive, at most {MAX_EPS:g}) or 'auto'."
    )
    seed: Seed | None = Field(None, description="Default: the job's seed.")  # type: ignore[assignment]


class RegularizeParams(_Params):
    dataset: str = Field(pattern=NAME, description="Images to fine-tune on (labels unused).")
    feature_set: str | None = Field(None, pattern=NAME, description="Default: the model's latest feature set.")
    method: Method = "simclr"
    lambda_: float = Field(0.1, alias="lambda", ge=0.0, le=100.0, description="Weight of the Q-Score term.")
    alpha: float | None = Field(None, gt=0.0, le=1.0, description="Default: the feature set's alpha.")
    epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(256, ge=2, le=4096)
    lr: float = Field(0.03, gt=0.0, le=10.0)
    max_steps: int | None = Field(None, ge=1, le=10_000_000)
    seed: Seed = 0
    checkpoint_every: int = Field(50, ge=1, le=100_000, description="Steps between resumable checkpoints.")
    discover: RegularizeDiscoverParams | None = Field(
        None,
        description="How to discover the new model's features; what it leaves out: eps auto, the same data set "
        "and seed.",
    )

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _discover_defaults(self) -> RegularizeParams:
        """The discover sub-body's data set and seed, where it names none, are the job's."""
        if self.discover is not None:
            fill = {k: getattr(self, k) for k in ("dataset", "seed") if getattr(self.discover, k) is None}
            if fill:
                self.discover = self.discover.model_copy(update=fill)
        return self


class EvaluateParams(_Params):
    train_dataset: str = Field(pattern=NAME)
    test_dataset: str = Field(pattern=NAME)
    feature_set: str | None = Field(None, pattern=NAME, description="Default: the model's latest feature set.")
    train_samples: int | None = Field(None, ge=10, le=10_000_000)
    test_samples: int | None = Field(None, ge=10, le=10_000_000)
    target_precision: float | None = Field(None, gt=0.0, lt=1.0)
    compression: bool = True
    shift_samples: int = Field(
        DEFAULT_SHIFT_SAMPLES,
        ge=0,
        le=10_000,
        description="Test images whose shifted copies (87 sets) the risk model also sees; 0: clean only.",
    )
    seed: Seed = 0
    batch_size: int = Field(256, ge=1, le=4096)


class AtlasParams(_Params):
    dataset: str = Field(pattern=NAME, description="Reference images (a data set name); labels, if any, for purity.")
    feature_set: str | None = Field(None, pattern=NAME, description="Default: the model's latest feature set.")
    sample_size: int | None = Field(5000, ge=10, le=10_000_000, description="Reference images; null = all.")
    top_k: int = Field(8, ge=1, le=64, description="Images shown per feature.")
    tail_sample: int = Field(16, ge=0, le=4096, description="Upper- and lower-tail features each, for contrast.")
    seed: Seed = 0
    batch_size: int = Field(256, ge=1, le=4096)


PARAMS: dict[str, type[_Params]] = {
    "discover": DiscoverParams,
    "regularize": RegularizeParams,
    "evaluate": EvaluateParams,
    "atlas": AtlasParams,
}


def dataset_folder(settings: Settings, name: str, field: str = "dataset") -> Path:
    """The folder configured for ``name``; a :class:`ParamError` for a name not configured."""
    if name not in settings.datasets:
        known = ", ".join(sorted(settings.datasets)) or "none configured (set QSCORE_DATASETS)"
        raise ParamError(field, f"unknown data set {name!r}; known: {known}")
    folder = Path(settings.datasets[name])
    if not folder.is_dir():
        raise ParamError(field, f"data set {name!r} is configured at a folder that does not exist")
    return folder


def resolve(params: _Params, settings: Settings) -> _Params:
    """Check every name against the configuration and the registry; fill in default versions.

    Returns a copy with ``model`` (and ``feature_set``) set, so the job record says what ran.
    """
    registry = Registry(settings.registry_root)
    update: dict[str, object] = {}
    model = params.model
    if model is None:
        active = registry.active()
        if active is None:
            raise ParamConflict("model", "no model given and the registry has no active model")
        model = active.model
    try:
        record = registry.model_record(model)
    except RegistryError as exc:
        raise ParamError("model", registry.public(exc)) from None
    update["model"] = model
    # Decided when the job is queued: by the request, else the service's QSCORE_AUTO_SWITCH.
    update["activate"] = settings.auto_switch if params.activate is None else params.activate

    if isinstance(params, DiscoverParams):
        dataset_folder(settings, params.dataset)
        _check_selection(params, record.spec.feature_dim, model)
    elif isinstance(params, RegularizeParams | EvaluateParams | AtlasParams):
        if isinstance(params, AtlasParams):
            dataset_folder(settings, params.dataset)
        elif isinstance(params, RegularizeParams):
            _check_trainable(record.spec, model)
            _check_one_batch(dataset_folder(settings, params.dataset), params.dataset, params.batch_size)
            if params.discover is not None:
                dataset_folder(settings, params.discover.dataset, "discover.dataset")
                _check_selection(params.discover, record.spec.feature_dim, model, "discover.")
                if params.discover.model is not None:  # unused (discovery runs on the result), but checked
                    try:
                        registry.model_record(params.discover.model)
                    except RegistryError as exc:
                        raise ParamError("discover.model", registry.public(exc)) from None
        else:
            dataset_folder(settings, params.train_dataset, "train_dataset")
            dataset_folder(settings, params.test_dataset, "test_dataset")
        feature_set = params.feature_set
        if feature_set is None:
            active = registry.active()
            if active is not None and active.model == model:
                feature_set = active.feature_set
            else:
                feature_set = registry.latest_feature_set_for(record.fingerprint)
            if feature_set is None:
                raise ParamConflict("feature_set", f"model {model!r} has no feature set; run a discover job first")
        try:
            registry.load_feature_set(feature_set)
        except RegistryError as exc:  # an unknown version: 422, like an unknown model
            raise ParamError("feature_set", registry.public(exc)) from None
        try:
            registry.check_pair(model, feature_set)
        except RegistryError as exc:  # both exist but do not fit together: 409
            raise ParamConflict("feature_set", registry.public(exc)) from None
        update["feature_set"] = feature_set
    return params.model_copy(update=update)


def _check_one_batch(folder: Path, name: str, batch_size: int) -> None:
    """Training takes whole batches: a data set of fewer images than one fails in the worker, so it
    is refused here. Counts the files torchvision's ImageFolder takes (``<class>/**/<image>``, links
    followed), and stops at ``batch_size``: a submit never walks a whole large data set."""
    count = 0
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for _, _, names in os.walk(class_dir, followlinks=True):
            count += sum(map(is_image_file, names))
            if count >= batch_size:
                return
    raise ParamError(
        "batch_size",
        f"data set {name!r} holds {count} images, fewer than one training batch of {batch_size}: lower batch_size",
    )


def _check_selection(params: DiscoverParams, feature_dim: int, model: str, prefix: str = "") -> None:
    """A selection of more features than the model has would silently give fewer; an eps above
    sqrt(r - 1) leaves no feature dominant (see MAX_EPS). ``prefix``: where the body holds them."""
    if params.size is not None and params.size > feature_dim:
        raise ParamError(f"{prefix}size", f"size {params.size} exceeds the {feature_dim} features of model {model!r}")
    if isinstance(params.eps, float) and params.eps > math.sqrt(feature_dim - 1):
        raise ParamError(
            f"{prefix}eps",
            f"eps {params.eps:g} leaves no feature of model {model!r} dominant: with {feature_dim} features none "
            f"lies more than sqrt({feature_dim} - 1) = {math.sqrt(feature_dim - 1):.2f} standard deviations above "
            "the mean",
        )


def _check_trainable(spec: object, model: str) -> None:
    """Nothing is queued that cannot run: TorchScript, ONNX and torch.export models are not fine-tuned."""
    reasons = {"torchscript": NOT_TRAINABLE, "onnx": ONNX_NOT_TRAINABLE, "torch_export": EXPORT_NOT_TRAINABLE}
    if isinstance(spec, EncoderSpec) and spec.source in reasons:
        raise ParamError("model", f"cannot regularize model {model!r}: {reasons[spec.source]}")
