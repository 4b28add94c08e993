"""Load every kind of encoder through one entry point (:func:`load_encoder`), and save ours.

The kind of file is read off its bytes, not its name: a TorchScript archive, a ``torch.export``
archive (``.pt2``), an ONNX model, else a state dict (safetensors or a pickle read with
``weights_only=True``) of a timm architecture or a ResNet layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from models.encoders.errors import CheckpointError
from models.encoders.export_program import ExportProgramEncoder, load_export_program, save_export_program
from models.encoders.layouts import (
    OTHER_ARCHITECTURES,
    SPEC_METADATA_KEY,
    describe_key_mismatch,
    infer_spec,
    is_export_program,
    is_onnx,
    is_torchscript,
    key_differences,
    read_tensors,
    to_torchvision_layout,
    unwrap_state_dict,
)
from models.encoders.onnx_encoder import OnnxEncoder, load_onnx, save_onnx
from models.encoders.resnet import build_encoder
from models.encoders.spec import (
    EXPORT_ARCH,
    FILE_ARCHS,
    ONNX_ARCH,
    TIMM_PREFIX,
    TORCHSCRIPT_ARCH,
    Encoder,
    EncoderSpec,
    fingerprint,
)
from models.encoders.timm_encoder import build_timm_encoder
from models.encoders.torchscript_encoder import TorchScriptEncoder, load_torchscript, save_torchscript
from models.storage.atomic import atomic_path


@dataclass(frozen=True)
class ImportedEncoder:
    encoder: Encoder
    fingerprint: str
    source_layout: str


#: The loader of each kind of encoder file kept as it came (TorchScript, ONNX, torch.export).
_FILE_LOADERS = {TORCHSCRIPT_ARCH: load_torchscript, ONNX_ARCH: load_onnx, EXPORT_ARCH: load_export_program}


def file_kind(path: Path) -> str | None:
    """``"torchscript"``, ``"torch_export"`` or ``"onnx"`` from the file's bytes; None for a state dict."""
    if not path.is_file():
        return None
    if is_torchscript(path):
        return TORCHSCRIPT_ARCH
    if is_export_program(path):
        return EXPORT_ARCH
    if is_onnx(path):
        return ONNX_ARCH
    return None


def load_encoder(path: str | Path, *, arch: str | None = None, **spec_overrides: Any) -> ImportedEncoder:
    """Build an encoder from a TorchScript, ONNX or ``torch.export`` file, a timm state dict or a ResNet checkpoint.

    ``arch``: ``"timm:NAME"`` for a timm state dict, ``"torchscript"``, ``"onnx"`` or
    ``"torch_export"`` to insist on that kind of file, a ResNet name, or None (the kind of file
    is recognised; a saved spec is read; a ResNet is inferred from its weights).
    ``spec_overrides`` (``image_size``, ``mean``, ``std``, ...) replace the preprocessing the
    source would give. Raises :class:`CheckpointError` (or a ``ValueError`` from the probe) saying
    what is wrong: for weights that do not fit, the missing, unexpected and mis-shaped keys.
    """
    path = Path(path)
    overrides = {k: v for k, v in spec_overrides.items() if v is not None}
    if arch is not None and arch not in FILE_ARCHS and not arch.startswith(TIMM_PREFIX):
        overrides["arch"] = arch
    kind = arch if arch in FILE_ARCHS else file_kind(path) if arch is None else None
    if kind is not None:
        encoder, digest = _FILE_LOADERS[kind](
            path,
            image_size=overrides.get("image_size"),
            mean=overrides.get("mean"),
            std=overrides.get("std"),
            dim=overrides.get("dim"),
        )
        return ImportedEncoder(encoder, digest, kind)
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


def save_encoder(encoder: Encoder, path: str | Path, extra_metadata: Mapping[str, str] | None = None) -> str:
    """Write the encoder's weights and spec as safetensors, atomically; return its fingerprint.

    TorchScript, ONNX and ``torch.export`` encoders are written in their own format (their spec
    lives in the registry's record, as those files have no metadata qscore reads).
    """
    if isinstance(encoder, TorchScriptEncoder):
        return save_torchscript(encoder, path)
    if isinstance(encoder, OnnxEncoder):
        return save_onnx(encoder, path)
    if isinstance(encoder, ExportProgramEncoder):
        return save_export_program(encoder, path)
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in encoder.backbone_state_dict().items()}
    digest = fingerprint(state_dict)
    metadata = {SPEC_METADATA_KEY: encoder.spec.model_dump_json(), "fingerprint": digest}
    metadata.update(extra_metadata or {})
    with atomic_path(path) as tmp:
        save_file(state_dict, str(tmp), metadata=metadata)
    return digest
