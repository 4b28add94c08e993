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
(``models/encoders/torchscript_encoder.py``), a state dict of a timm architecture (``arch="timm:NAME"``,
``models/encoders/timm_encoder.py``), or a ResNet checkpoint in one of the layouts above.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from models.encoders.errors import CheckpointError
from models.encoders.spec import (
    CIFAR_MEAN,
    CIFAR_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderSpec,
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


#: What a file none of the encoder formats reads is told.
_NOT_A_MODEL = (
    "is not an encoder file qscore reads: not a TorchScript module, an ONNX model, a torch.export program, "
    "a safetensors file or a PyTorch checkpoint (torch.save of a state dict), or it is damaged"
)


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
    kinds = (
        (is_torchscript, "a TorchScript module"),
        (is_export_program, "a torch.export program"),
        (is_onnx, "an ONNX model"),
    )
    for sniff, what in kinds:
        if sniff(path):
            raise CheckpointError(
                f"{path} is {what}, not a state dict: pass it as the model itself (--model, or qscore import), "
                "without --arch"
            )
    try:
        with torch.serialization.safe_globals(_harmless_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found is None:  # not a pickle of objects at all: damaged or another format
            # (torch's own message goes on to suggest weights_only=False: wrong for a file that is not a
            # checkpoint, and unsafe for one that is)
            raise CheckpointError(f"{path} {_NOT_A_MODEL}") from None
        what = f" (it needs {found.group(1)})"
        raise CheckpointError(
            f"{path} holds pickled objects other than tensors, plain containers and numpy scalars{what}; "
            f"qscore loads checkpoints with weights_only=True and will not unpickle them.\n{conversion_hint(path)}"
        ) from None
    except Exception as exc:  # garbage input makes the unpickler raise anything
        # (RuntimeError, EOFError, and KeyError/IndexError/struct.error from random bytes).
        raise CheckpointError(f"{path} {_NOT_A_MODEL} ({type(exc).__name__} reading it)") from exc
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


def is_torchscript(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``), not a ``torch.save`` checkpoint."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


#: Tags that follow ``ir_version`` (field 1) in a serialised ONNX ``ModelProto``: producer_name,
#: producer_version, domain, model_version, doc_string, graph, opset_import, metadata_props,
#: training_info, functions (protobuf writers emit fields in number order).
_ONNX_NEXT_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0xA2, 0xCA})


def is_onnx(path: str | Path) -> bool:
    """Whether ``path`` is an ONNX model: named ``.onnx``, or starting as a serialised ``ModelProto`` does.

    ONNX files have no magic number; a ``ModelProto`` starts with ``ir_version`` (tag 0x08, a small
    varint) and another of its fields. Safetensors headers, zip archives (``torch.save``,
    TorchScript, ``.pt2``) and pickles (0x80) start otherwise.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(3)
    except OSError:
        return False
    if not (len(head) == 3 and head[0] == 0x08 and 1 <= head[1] <= 0x7F and head[2] in _ONNX_NEXT_TAGS):
        return False
    return not _looks_like_safetensors(path)  # a safetensors header of 1.2 MB+ can start alike


def is_export_program(path: str | Path) -> bool:
    """Whether ``path`` is a ``torch.export.save`` archive (``.pt2``): a zip whose ``archive_format`` says pt2."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n == "archive_format" or n.endswith("/archive_format")]
            return any(archive.read(n).strip() == b"pt2" for n in names[:1])
    except (zipfile.BadZipFile, OSError, KeyError):
        return False
