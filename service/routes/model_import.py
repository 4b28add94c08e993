"""POST /admin/models: register an encoder file (TorchScript, ONNX, torch.export, timm state dict, ResNet checkpoint).

The upload is loaded and probed before anything is written (``Registry.import_model``); a file
that fails gets 422 ``invalid_model`` with the reason and the registry is unchanged. No path a
client names is opened: the file arrives in the body and goes to a private temporary folder.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile
from pydantic import BaseModel

from models.encoders.spec import parse_rgb
from models.registry.versions import VERSION_PATTERN, ModelRecord, VersionExists
from service.deps import RegistryDep
from service.limits import ApiError
from service.schemas import ErrorResponse
from service.security import require_api_key

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_api_key)],
    responses={401: {"model": ErrorResponse, "description": "Missing or wrong X-API-Key (when configured)."}},
)

# Three numbers, as `qscore --mean/--std` take them: "0.485,0.456,0.406".
_NUMBER = r"\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*"
RGB_PATTERN = f"^{_NUMBER},{_NUMBER},{_NUMBER}$"

_SUFFIXES = {".pt", ".pth", ".th", ".tar", ".ckpt", ".bin", ".safetensors", ".torch", ".onnx", ".pt2"}


class ImportedModel(BaseModel):
    version: str
    fingerprint: str
    arch: str
    feature_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    created_at: str
    imported_from: str | None = None

    @classmethod
    def of(cls, record: ModelRecord) -> ImportedModel:
        spec = record.spec
        return cls(
            version=record.version,
            fingerprint=record.fingerprint,
            arch=spec.arch,
            feature_dim=spec.feature_dim,
            image_size=spec.image_size,
            mean=spec.mean,
            std=spec.std,
            created_at=record.created_at,
            imported_from=record.imported_from,
        )


@router.post(
    "/models",
    status_code=201,
    response_model=ImportedModel,
    responses={
        409: {"model": ErrorResponse, "description": "The version name is taken (version_exists)."},
        422: {
            "model": ErrorResponse,
            "description": "Invalid form (invalid_request), or a file that is not a usable encoder (invalid_model).",
        },
    },
)
async def import_model(
    registry: RegistryDep,
    file: Annotated[
        UploadFile,
        File(description="TorchScript, ONNX or torch.export (.pt2) file, or a state dict (safetensors or pickle)."),
    ],
    version: Annotated[str | None, Form(pattern=VERSION_PATTERN.pattern, max_length=80)] = None,
    arch: Annotated[str | None, Form(description="timm:NAME for a timm state dict.", max_length=200)] = None,
    image_size: Annotated[int | None, Form(ge=8, le=4096, description="Input size S.")] = None,
    mean: Annotated[str | None, Form(description="R,G,B", max_length=100, pattern=RGB_PATTERN)] = None,
    std: Annotated[str | None, Form(description="R,G,B", max_length=100, pattern=RGB_PATTERN)] = None,
) -> ImportedModel:
    """Register an encoder file as a model version, after a probe forward pass."""
    try:
        rgb_mean, rgb_std = parse_rgb(mean, "mean"), parse_rgb(std, "std")
    except ValueError as exc:
        raise ApiError(422, "invalid_model", str(exc)) from exc
    suffix = Path(file.filename or "").suffix.lower()
    with tempfile.TemporaryDirectory(prefix="qscore-import-") as folder:
        path = Path(folder) / f"upload{suffix if suffix in _SUFFIXES else ''}"
        with open(path, "wb") as out:
            await asyncio.to_thread(shutil.copyfileobj, file.file, out)
        try:
            record = await asyncio.to_thread(
                registry.import_model,
                path,
                version=version,
                source_name=Path(file.filename or "upload").name,
                arch=arch,
                image_size=image_size,
                mean=rgb_mean,
                std=rgb_std,
            )
        except VersionExists as exc:
            raise ApiError(409, "version_exists", str(exc)) from exc
        except ValueError as exc:  # CheckpointError, OutputCheckError, TimmError: what is wrong with the file
            # name the upload, not the server's temporary path, and the form's fields, not the command's flags
            message = _as_form_fields(str(exc).replace(str(path), repr(file.filename or "upload")))
            raise ApiError(422, "invalid_model", message) from exc
    return ImportedModel.of(record)


#: The command line's preprocessing flags in the checks' messages, and the form fields that set them here.
_FLAGS_AS_FIELDS = (
    (re.compile(r"--image-size (\d+)"), r"image_size=\1"),
    (re.compile(r"--image-size"), "the image_size field"),
    (re.compile(r"--mean/--std"), "the mean and std fields"),
    (re.compile(r"--arch"), "the arch field"),
)


def _as_form_fields(message: str) -> str:
    for flag, field in _FLAGS_AS_FIELDS:
        message = flag.sub(field, message)
    return message
