"""The one rule a feature set and an encoder must satisfy to be used together, checked in one place.

A feature set fits an encoder when it was discovered on the same weights (the fingerprint) fed the
same way (the preprocessing): the same tensors fed otherwise give other representations, which
the fingerprint (tensors only) cannot tell apart. The scorer, the registry, the service, the
evaluation and the command line all call :func:`check_fits`.
"""

from __future__ import annotations

from typing import Any

from models.scoring.feature_set import FeatureSet, Preprocessing


class FeatureSetMismatch(ValueError):
    """A feature set found on other weights than the encoder's, or on images fed otherwise."""


def preprocessing_mismatch(spec: Any, feature_set: FeatureSet) -> str | None:
    """Why ``feature_set`` does not fit an encoder fed as ``spec`` says, or None when it does.

    Feature sets made before the preprocessing was recorded (None) fit any preprocessing.
    """
    found = feature_set.encoder.preprocessing
    now = Preprocessing.of(spec)
    if found is None or found == now:
        return None

    def show(p: Preprocessing) -> str:
        mean, std = ",".join(f"{v:g}" for v in p.mean), ",".join(f"{v:g}" for v in p.std)
        return f"--image-size {p.image_size} --mean {mean} --std {std}"

    return (
        f"the feature set was found on images preprocessed with {show(found)}, but the encoder is fed "
        f"{show(now)}: the same weights fed otherwise give other representations. Use the same "
        "preprocessing flags as at discovery, or discover again with these."
    )


def check_fits(
    feature_set: FeatureSet,
    fingerprint: str,
    spec: Any,
    *,
    model: str | None = None,
    feature_set_version: str | None = None,
) -> None:
    """Raise :class:`FeatureSetMismatch` unless ``feature_set`` fits the encoder ``(fingerprint, spec)``.

    ``model`` and ``feature_set_version`` (registry versions, when known) name the two in the message.
    """
    fs_name = f"feature set {feature_set_version!r}" if feature_set_version else "the feature set"
    model_name = f"model {model!r}" if model else "this encoder"
    found = feature_set.encoder.fingerprint
    if found != fingerprint:
        raise FeatureSetMismatch(
            f"{fs_name} was found on encoder {found[:12]}, but {model_name} is {fingerprint[:12]}: "
            "discover features for this model first (`qscore discover`, or POST /jobs/discover)"
        )
    mismatch = preprocessing_mismatch(spec, feature_set)
    if mismatch is not None:
        raise FeatureSetMismatch(f"{fs_name} does not fit {model_name}: {mismatch}")
