"""Import encoder weights that users bring, and save ours (safetensors, atomically).

Layouts understood (``shared/FIELD-NOTES.md``): plain torchvision state dicts; solo-learn and
Lightning (``state_dict`` wrapper, ``backbone.`` or older ``encoder.`` prefix); lightly's
examples (``backbone.0.*`` = conv1 ... ``backbone.7.*`` = layer4); MoCo (``module.encoder_q.``);
SwAV (``module.``, extra ``projection_head``/``prototypes``); VISSL trunks; DataParallel
(``module.``); and safetensors files of any of these. Pickled files are read with
``torch.load(weights_only=True)`` only: never unrestricted unpickling. Training scripts often
save numpy scalars beside the weights (``best_prec1``, ``epoch``); those, and only those, are
allowed through ``torch.serialization.safe_globals``. Anything else is refused with the one-line
conversion to run on a file one trusts.

:func:`load_encoder` is the one entry point for every encoder: a TorchScript archive
(``models/torchscript_encoders.py``), a state dict of a timm architecture (``arch="timm:NAME"``,
``models/timm_encoders.py``), or a ResNet checkpoint in one of the layouts above.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from models.atomic import atomic_path
from models.encoders import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TIMM_PREFIX,
    TORCHSCRIPT_ARCH,
    EncoderBase,
    EncoderSpec,
    build_encoder,
    fingerprint,
)

SPEC_METADATA_KEY = "qscore.encoder"

# Prefixes of the backbone inside training checkpoints, most specific first.
_PREFIXES = (
    "module.encoder_q.",
    "encoder_q.",
    "module.backbone.",
    "model.backbone.",
    "backbone.",
    "module.encoder.",
    "encoder.",
    "_feature_blocks.",
    "trunk._feature_blocks.",
    "module.",
    "resnet.",
    "model.",
    "",
)
# lightly's examples wrap ``nn.Sequential(*list(resnet.children())[:-1])``.
_LIGHTLY_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
# Heads that sit under the backbone's prefix in some layouts; not part of an encoder.
_HEAD_PREFIXES = ("fc.", "head.", "projection_head.", "prototypes.", "classifier.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose weights do not fit the encoder."""


def _harmless_globals() -> list[Any]:
    """numpy scalars and dtypes: what training scripts save beside weights (``best_prec1``)."""
    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [core.multiarray.scalar, np.dtype]
    allowed += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return allowed


def conversion_hint(path: str | Path) -> str:
    """The one-line conversion of a pickle that needs more than tensors, for files one trusts."""
    return (
        "If you trust the file, convert it once to safetensors:\n"
        '  python -c "import torch; from safetensors.torch import save_file; '
        f"c = torch.load('{path}', map_location='cpu', weights_only=False); "
        "sd = c.get('state_dict', c); "
        "save_file({k: v.contiguous() for k, v in sd.items() if torch.is_tensor(v)}, "
        f"'{Path(path).stem}.safetensors')\"\n"
        "then pass the .safetensors file (with --arch for an architecture that is not a ResNet)."
    )


@dataclass(frozen=True)
class ImportedEncoder:
    encoder: EncoderBase
    fingerprint: str
    source_layout: str


def read_tensors(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The raw contents of a weights file and its safetensors metadata (empty for pickles)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    with open(path, "rb") as handle:
        head = handle.read(8)
    # A safetensors file starts with the little-endian length of its JSON header.
    if path.suffix == ".safetensors" or (len(head) == 8 and _looks_like_safetensors(path)):
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            return load_file(str(path)), metadata
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    if _is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript module, not a state dict: pass it as the model itself "
            "(--model, or qscore import), without --arch"
        )
    try:
        with torch.serialization.safe_globals(_harmless_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:  # not a pickle of objects at all: damaged or another format
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {first}") from None
        what = f" (it needs {found.group(1)})"
        raise CheckpointError(
            f"{path} holds pickled objects other than tensors, plain containers and numpy scalars{what}; "
            f"qscore loads checkpoints with weights_only=True and will not unpickle them.\n{conversion_hint(path)}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - garbage input makes the unpickler raise anything
        # (RuntimeError, EOFError, and KeyError/IndexError/struct.error from random bytes).
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return dict(obj), {}


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        if not 2 <= header_len <= 100_000_000:
            return False
        return handle.read(1) == b"{"


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside the wrappers training frameworks put around it."""
    node: Any = obj
    if "classy_state_dict" in node:  # VISSL
        try:
            node = node["classy_state_dict"]["base_model"]["model"]["trunk"]
        except (KeyError, TypeError) as exc:
            raise CheckpointError("a VISSL checkpoint without base_model.model.trunk") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(node, Mapping) and key in node and isinstance(node[key], Mapping):
            node = node[key]
            break
    tensors = {k: v for k, v in node.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError("the checkpoint holds no tensors")
    return tensors


def to_torchvision_layout(
    tensors: Mapping[str, torch.Tensor], expected: set[str] | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Rename a backbone's keys to torchvision's layout; return them and the prefix used.

    The prefix chosen is the one under which most keys land on known ResNet parameter names;
    keys outside it (a MoCo key encoder, a queue) are other parts of the training model.
    """
    best: tuple[int, str, dict[str, torch.Tensor]] = (-1, "", {})
    for prefix in _PREFIXES:
        renamed = {}
        for key, value in tensors.items():
            if not key.startswith(prefix):
                continue
            name = _lightly_to_torchvision(key[len(prefix) :])
            if name.startswith(_HEAD_PREFIXES):
                continue
            renamed[name] = value
        score = sum(1 for name in renamed if _is_resnet_key(name, expected))
        if score > best[0]:
            best = (score, prefix, renamed)
    return best[2], best[1] or "torchvision"


def _lightly_to_torchvision(name: str) -> str:
    head, _, rest = name.partition(".")
    if head in _LIGHTLY_CHILDREN and rest:
        return f"{_LIGHTLY_CHILDREN[head]}.{rest}"
    return name


def _is_resnet_key(name: str, expected: set[str] | None) -> bool:
    if expected is not None:
        return name in expected
    return name.startswith(("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4."))


def infer_spec(state_dict: Mapping[str, torch.Tensor], **overrides: Any) -> EncoderSpec:
    """Architecture, stem and width from the weights themselves; inputs from the stem."""
    if "conv1.weight" not in state_dict:
        raise CheckpointError(
            "no conv1.weight among the backbone's weights, so this is not a ResNet checkpoint "
            f"qscore understands; first keys: {sorted(state_dict)[:8]}.\n{OTHER_ARCHITECTURES}"
        )
    conv1 = state_dict["conv1.weight"]
    arch = "resnet50" if "layer1.0.conv3.weight" in state_dict else "resnet18"
    cifar_stem = conv1.shape[-1] == 3
    values: dict[str, Any] = {
        "arch": arch,
        "cifar_stem": cifar_stem,
        "width": int(conv1.shape[0]),
        "image_size": 32 if cifar_stem else 224,
        "mean": CIFAR_MEAN if cifar_stem else IMAGENET_MEAN,
        "std": CIFAR_STD if cifar_stem else IMAGENET_STD,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return EncoderSpec(**values)
    except ValueError as exc:
        raise CheckpointError(f"the weights describe an unsupported encoder: {exc}") from exc


def _is_torchscript(path: Path) -> bool:
    from models.torchscript_encoders import is_torchscript

    return is_torchscript(path)


def load_encoder(path: str | Path, *, arch: str | None = None, **spec_overrides: Any) -> ImportedEncoder:
    """Build an encoder from a TorchScript file, a timm state dict or a ResNet checkpoint.

    ``arch``: ``"timm:NAME"`` for a timm state dict, ``"torchscript"`` to insist on a TorchScript
    file, a ResNet name, or None (a TorchScript archive is recognised; a saved spec is read; a
    ResNet is inferred from its weights). ``spec_overrides`` (``image_size``, ``mean``, ``std``,
    ...) replace the preprocessing the source would give. Raises :class:`CheckpointError` (or a
    ``ValueError`` from the probe) saying what is wrong: for weights that do not fit, the missing,
    unexpected and mis-shaped keys.
    """
    path = Path(path)
    overrides = {k: v for k, v in spec_overrides.items() if v is not None}
    if arch is not None and arch != TORCHSCRIPT_ARCH and not arch.startswith(TIMM_PREFIX):
        overrides["arch"] = arch
    if arch == TORCHSCRIPT_ARCH or (arch is None and path.is_file() and _is_torchscript(path)):
        from models.torchscript_encoders import load_torchscript

        encoder, digest = load_torchscript(
            path,
            image_size=overrides.get("image_size"),
            mean=overrides.get("mean"),
            std=overrides.get("std"),
            dim=overrides.get("dim"),
        )
        return ImportedEncoder(encoder, digest, "torchscript")
    raw, metadata = read_tensors(path)
    tensors = unwrap_state_dict(raw)
    saved = EncoderSpec.model_validate_json(metadata[SPEC_METADATA_KEY]) if SPEC_METADATA_KEY in metadata else None
    timm_arch = arch if arch is not None and arch.startswith(TIMM_PREFIX) else None
    if timm_arch is None and arch is None and saved is not None and saved.source == "timm":
        timm_arch = saved.arch
    if timm_arch is not None:
        return _load_timm(path, timm_arch, tensors, saved, overrides)
    state_dict, layout = to_torchvision_layout(tensors)
    if saved is not None:
        spec = saved.model_copy(update=overrides)
    else:
        spec = infer_spec(state_dict, **overrides)
    encoder = build_encoder(spec)
    expected = encoder.backbone_state_dict()
    state_dict, layout = to_torchvision_layout(tensors, set(expected))
    _fill_batchnorm_counters(state_dict, expected)
    missing, unexpected, mismatched = key_differences(state_dict, expected, "encoder")
    if missing or unexpected or mismatched:
        raise CheckpointError(_mismatch_message(path, spec, layout, missing, unexpected, mismatched))
    state_dict = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
    encoder.load_backbone_state_dict(state_dict)
    encoder.eval()
    return ImportedEncoder(encoder, fingerprint(encoder.backbone_state_dict()), layout)


def _load_timm(
    path: Path, arch: str, tensors: dict[str, torch.Tensor], saved: EncoderSpec | None, overrides: dict[str, Any]
) -> ImportedEncoder:
    from models.timm_encoders import build_timm_encoder

    # A file saved by qscore carries its preprocessing; flags still override it.
    base = saved.model_dump() if saved is not None and saved.arch == arch else {}
    values = {**base, **overrides}
    encoder = build_timm_encoder(
        arch[len(TIMM_PREFIX) :],
        tensors,
        source=str(path),
        image_size=values.get("image_size"),
        mean=values.get("mean"),
        std=values.get("std"),
        dim=overrides.get("dim"),
    )
    return ImportedEncoder(encoder, fingerprint(encoder.backbone_state_dict()), "timm")


def _fill_batchnorm_counters(state_dict: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    # Some exporters drop BatchNorm's num_batches_tracked; it plays no part in evaluation.
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state_dict:
            state_dict[key] = torch.zeros((), dtype=torch.long)


def _mismatch_message(
    path: str | Path,
    spec: EncoderSpec,
    layout: str,
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> str:
    header = (
        f"the weights in {path} (read as layout '{layout}') do not fit a {spec.arch} encoder"
        f" (cifar_stem={spec.cifar_stem}, width={spec.width})."
    )
    message = describe_key_mismatch(header, missing, unexpected, mismatched)
    return message + "\n" + OTHER_ARCHITECTURES


#: What to do with weights of an architecture qscore does not build from a ResNet layout.
OTHER_ARCHITECTURES = (
    "Another architecture? Name it with --arch timm:NAME (a timm model, weights in timm's layout), "
    "or bring a TorchScript export of the encoder (--model encoder.pt --image-size S --mean R,G,B --std R,G,B)."
)


def key_differences(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], target: str
) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and "key: checkpoint (shape) vs <target> (shape)" lines."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs {target} {tuple(expected[k].shape)}"
        for k in set(state_dict) & set(expected)
        if state_dict[k].shape != expected[k].shape
    )
    return missing, unexpected, mismatched


def describe_key_mismatch(header: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    """``header`` and the missing, unexpected and mis-shaped keys, ten of each at most."""

    def show(names: list[str]) -> str:
        more = f" ... and {len(names) - 10} more" if len(names) > 10 else ""
        return ", ".join(names[:10]) + more

    lines = [header]
    if missing:
        lines.append(f"Missing keys ({len(missing)}): {show(missing)}")
    if unexpected:
        lines.append(f"Unexpected keys ({len(unexpected)}): {show(unexpected)}")
    if mismatched:
        lines.append(f"Shape mismatches ({len(mismatched)}): {show(mismatched)}")
    return "\n".join(lines)


def save_encoder(encoder: EncoderBase, path: str | Path, extra_metadata: Mapping[str, str] | None = None) -> str:
    """Write the encoder's weights and spec as safetensors, atomically; return its fingerprint.

    A TorchScript encoder is written as a TorchScript archive (its spec lives in the registry's
    record, as a TorchScript file has no metadata qscore reads).
    """
    if encoder.spec.source == "torchscript":
        from models.torchscript_encoders import save_torchscript

        return save_torchscript(encoder, path)  # type: ignore[arg-type]
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in encoder.backbone_state_dict().items()}
    digest = fingerprint(state_dict)
    metadata = {SPEC_METADATA_KEY: encoder.spec.model_dump_json(), "fingerprint": digest}
    metadata.update(extra_metadata or {})
    with atomic_path(path) as tmp:
        save_file(state_dict, str(tmp), metadata=metadata)
    return digest


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The safetensors metadata of a saved encoder (without reading its tensors), spec parsed."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            out: dict[str, Any] = dict(handle.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    if SPEC_METADATA_KEY in out:
        out[SPEC_METADATA_KEY] = json.loads(out[SPEC_METADATA_KEY])
    return out
