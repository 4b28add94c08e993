"""TorchScript encoders: a module exported for a model server, scored as it is.

The file holds a scripted or traced module mapping (N, 3, S, S) float images to (N, r) features.
Its preprocessing is not in the file: it comes from the command line or the registry record
(``image_size``, ``mean``, ``std``; defaults 224 and ImageNet's statistics). The module is
loaded with ``torch.jit.load``, which runs only TorchScript code and restores only TorchScript
types (no arbitrary Python objects are unpickled), and is checked by a probe forward pass.

Fine-tuning is refused (:meth:`TorchScriptEncoder.not_trainable_reason`): a traced export has its
batch-norm mode and control flow fixed at export time, so ``train()`` cannot be trusted to do
what it does on the source model, and the source model is what should be fine-tuned.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from models.encoders.checks import brought_spec, probed_spec
from models.encoders.errors import TorchScriptError
from models.encoders.layouts import is_torchscript
from models.encoders.spec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TORCHSCRIPT_ARCH,
    Encoder,
    EncoderSpec,
    fingerprint,
)
from models.storage.atomic import atomic_path

DEFAULT_IMAGE_SIZE = 224


#: Why ``regularize`` refuses TorchScript encoders (command line: exit 2; job API: 422).
NOT_TRAINABLE = (
    "TorchScript encoders are inference exports and are not fine-tuned: a traced export may have its "
    "batch-norm mode and control flow fixed at export, so training it would not do what training "
    "the source model does. Regularize the source model instead (a timm architecture with "
    "--arch timm:NAME and its state dict, or a ResNet checkpoint), then export it again."
)


class TorchScriptEncoder(Encoder):
    """A TorchScript module as an encoder: ``forward(x)`` is the module's (N, r) output."""

    def __init__(self, module: torch.jit.ScriptModule, spec: EncoderSpec) -> None:
        super().__init__()
        self.module = module
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.module.state_dict())

    def load_backbone_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.module.load_state_dict(dict(state_dict), strict=True)

    def not_trainable_reason(self) -> str | None:
        return NOT_TRAINABLE


def load_torchscript(
    path: str | Path,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dim: int | None = None,
) -> tuple[TorchScriptEncoder, str]:
    """The encoder in ``path`` and its fingerprint, after a probe forward pass.

    ``dim``, when given (a registry record), must equal the probed feature dimension.
    """
    path = Path(path)
    if not path.is_file():
        raise TorchScriptError(f"no TorchScript file at {path}")
    if not is_torchscript(path):
        raise TorchScriptError(
            f"{path} is not a TorchScript archive (expected a file written by torch.jit.save, e.g. "
            "torch.jit.save(torch.jit.script(model), 'encoder.pt')); a state dict needs its architecture: "
            "--arch timm:NAME, or a ResNet layout qscore reads"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # a damaged archive raises anything
        raise TorchScriptError(f"{path} is not a loadable TorchScript module: {type(exc).__name__}: {exc}") from None
    module.eval()
    spec = brought_spec(TORCHSCRIPT_ARCH, image_size or DEFAULT_IMAGE_SIZE, mean or IMAGENET_MEAN,
                        std or IMAGENET_STD, error=TorchScriptError, subject=str(path))  # fmt: skip
    encoder = TorchScriptEncoder(module, probed_spec(module, spec, dim, f"the TorchScript module in {path}"))
    return encoder, torchscript_fingerprint(encoder, path)


def torchscript_fingerprint(encoder: TorchScriptEncoder, path: str | Path) -> str:
    """The hash of the module's tensors; of the file's bytes for a frozen module (no tensors left)."""
    state = encoder.backbone_state_dict()
    if state:
        return fingerprint(state)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_torchscript(encoder: TorchScriptEncoder, path: str | Path) -> str:
    """Write the module as a TorchScript archive, atomically; return its fingerprint."""
    with atomic_path(path) as tmp:
        torch.jit.save(encoder.module, str(tmp))
    return torchscript_fingerprint(encoder, path)
