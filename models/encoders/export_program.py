"""``torch.export`` programs (``.pt2``, written by ``torch.export.save``) as encoders.

An exported program is a graph of ATen operators with its weights, the format torch recommends
for deployment now that TorchScript is deprecated. It is loaded with ``torch.export.load`` and
run as a module (``ExportedProgram.module()``); its preprocessing comes from the command line or
the registry record, as for TorchScript (defaults: the program's input size when it is fixed,
else 224; ImageNet's statistics). Its batch dimension must be dynamic.

``torch.export.load`` unpickles (``weights_only=False``) weights and constants stored as
pickles (tensor subclasses), custom objects and old-format archives. qscore never unpickles a
file it is brought, so those archives are refused before ``torch.export.load`` sees them: only
archives whose tensors are raw bytes described by JSON, and whose sample inputs load with
``weights_only=True``, are read.

Fine-tuning is refused: the graph is fixed at export (batch-norm mode included).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from models.encoders.checks import brought_spec, probed_spec
from models.encoders.errors import ExportProgramError, OutputCheckError
from models.encoders.layouts import is_export_program
from models.encoders.spec import (
    EXPORT_ARCH,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    EncoderSpec,
    fingerprint,
)
from models.storage.atomic import atomic_path

DEFAULT_IMAGE_SIZE = 224


#: Why ``regularize`` refuses exported programs (command line: exit 2; job API: 422).
NOT_TRAINABLE = (
    "torch.export programs are inference exports and are not fine-tuned: the graph has its batch-norm mode "
    "and control flow fixed at export. Regularize the source model instead (a timm architecture with "
    "--arch timm:NAME and its state dict, or a ResNet checkpoint), then export it again."
)


DYNAMIC_BATCH_FIX = (
    "export it with a dynamic batch dimension: torch.export.export(model, (x,), "
    "dynamic_shapes=({0: torch.export.Dim('batch')},))"
)


class ExportProgramEncoder(Encoder):
    """An exported program as an encoder: ``forward(x)`` is the program's (N, r) output."""

    def __init__(self, program: torch.export.ExportedProgram, spec: EncoderSpec) -> None:
        super().__init__()
        self.program = program
        self.module = program.module()
        self.spec = spec

    def train(self, mode: bool = True) -> ExportProgramEncoder:
        # The graph's mode was fixed at export; the unlifted module refuses train()/eval().
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.program.state_dict)
        tensors.update({f"constants.{k}": v for k, v in self.program.constants.items() if torch.is_tensor(v)})
        return tensors

    def load_backbone_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError(NOT_TRAINABLE)

    def not_trainable_reason(self) -> str | None:
        return NOT_TRAINABLE


def _pickled_parts(archive: zipfile.ZipFile) -> list[str]:
    """The members ``torch.export.load`` would unpickle with ``weights_only=False``; [] when none."""
    names = archive.namelist()
    roots = {n[: -len("archive_format")] for n in names if n.endswith("archive_format")}
    if len(roots) != 1:
        return ["archive_format (none, or several programs)"]
    (root,) = roots
    found = []
    for name in names:
        rel = name[len(root) :]
        if rel.startswith(("data/weights/", "data/constants/")) and rel.endswith(".pt"):
            found.append(rel)  # old-format weights or constants: one pickle
        if rel.startswith("data/constants/") and Path(rel).name.startswith(("custom_obj_", "opaque_obj_")):
            found.append(rel)
        if rel.startswith("data/") and rel.endswith("_config.json"):
            config = json.loads(archive.read(name)).get("config", {})
            found += [f"{rel}: {key}" for key, entry in config.items() if entry.get("use_pickle")]
        if rel.startswith("data/sample_inputs/"):
            try:
                torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
            except Exception:
                found.append(rel)
    if f"{root}models/model.json" not in names:
        found.append("models/model.json (no program named 'model')")
    return found


def _input_shape(program: torch.export.ExportedProgram, what: str) -> list[int | None]:
    """The (N, 3, S, S) user input's shape, None for dynamic dimensions."""
    user_inputs = set(program.graph_signature.user_inputs)
    shapes = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            value = node.meta.get("val")
            shapes.append(None if value is None else [d if isinstance(d, int) else None for d in value.shape])
    if len(shapes) != 1 or shapes[0] is None:
        raise OutputCheckError(
            f"{what} takes {len(shapes)} inputs; an encoder takes one (N, 3, S, S) image batch: export the module "
            "that maps images to features"
        )
    return shapes[0]


def load_export_program(
    path: str | Path,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dim: int | None = None,
) -> tuple[ExportProgramEncoder, str]:
    """The encoder in ``path`` and its fingerprint, after the safety and shape checks and a probe."""
    path = Path(path)
    what = f"the torch.export program in {path}"
    if not path.is_file():
        raise ExportProgramError(f"no torch.export file at {path}")
    if not is_export_program(path):
        raise ExportProgramError(
            f"{path} is not a torch.export archive (expected a file written by torch.export.save, e.g. "
            "torch.export.save(torch.export.export(model, (x,), dynamic_shapes=...), 'encoder.pt2'))"
        )
    with zipfile.ZipFile(path) as archive:
        pickled = _pickled_parts(archive)
    if pickled:
        raise ExportProgramError(
            f"{path} holds parts torch.export.load would unpickle ({', '.join(pickled[:5])}); qscore does not "
            "unpickle files it is brought. Save the program with plain tensors (torch.export.save of a current "
            "torch, no tensor subclasses or custom objects), or export it to ONNX"
        )
    # torch logs a traceback (and retries an old format) for an archive it cannot read; the error says it.
    torch_log = logging.getLogger("torch.export")
    previous, torch_log.disabled = torch_log.disabled, True
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        message = f"{path} is not a loadable torch.export program: {type(exc).__name__}: {exc}"
        raise ExportProgramError(message) from None
    finally:
        torch_log.disabled = previous
    shape = _input_shape(program, what)
    if len(shape) != 4 or shape[1] not in (None, 3):
        raise OutputCheckError(f"{what} takes input of shape {shape}; an encoder takes images (N, 3, S, S)")
    if shape[0] is not None:
        raise OutputCheckError(
            f"{what} has a fixed batch size of {shape[0]} (input shape {shape}), but qscore scores batches of "
            f"any size: {DYNAMIC_BATCH_FIX}"
        )
    fixed_size = shape[2] if shape[2] is not None and shape[2] == shape[3] else None
    if image_size is not None and fixed_size is not None and image_size != fixed_size:
        raise OutputCheckError(
            f"{what} takes {fixed_size}x{fixed_size} images, not {image_size}x{image_size}: pass --image-size "
            f"{fixed_size}, or export it with dynamic image sizes"
        )
    spec = brought_spec(EXPORT_ARCH, image_size or fixed_size or DEFAULT_IMAGE_SIZE, mean or IMAGENET_MEAN,
                        std or IMAGENET_STD, error=ExportProgramError, subject=str(path))  # fmt: skip
    encoder = ExportProgramEncoder(program, spec)
    encoder.spec = probed_spec(encoder, spec, dim, what)
    return encoder, export_program_fingerprint(encoder, path)


def export_program_fingerprint(encoder: ExportProgramEncoder, path: str | Path) -> str:
    """The hash of the program's tensors; of the file's bytes when it has none."""
    state = encoder.backbone_state_dict()
    if state:
        return fingerprint(state)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_export_program(encoder: ExportProgramEncoder, path: str | Path) -> str:
    """Write the program with ``torch.export.save``, atomically; return its fingerprint."""
    with atomic_path(path) as tmp:
        torch.export.save(encoder.program, str(tmp))
    return export_program_fingerprint(encoder, path)
