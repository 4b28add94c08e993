"""ONNX encoders: a model exported for ONNX Runtime, Triton or TorchServe, scored as it is.

The file holds an ONNX graph with one float input (N, 3, S, S) and one output (N, r). Like a
TorchScript file it carries no preprocessing: ``image_size``, ``mean`` and ``std`` come from the
command line or the registry record (defaults: the graph's own input size when it is fixed, else
224; ImageNet's statistics). It is run by ONNX Runtime (an optional dependency, imported on
first use), checked by the same probe forward pass as every brought encoder
(``models/encoders/checks.py``), and its batch dimension must be dynamic: the service batches
whatever arrives, from 1 image to ``QSCORE_MAX_BATCH_SIZE``.

Loading an ONNX file runs no Python code and unpickles nothing. Models whose tensors live in
external data files are refused (the registry keeps one file per version): save them with the
tensors inside (``onnx.save_model(model, path, save_as_external_data=False)``, under 2 GB).

Fine-tuning is refused (:meth:`OnnxEncoder.not_trainable_reason`): the graph is an inference
export, with batch norm folded and no gradients.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from models.encoders.checks import check_output_dim
from models.encoders.errors import OnnxError, OutputCheckError
from models.encoders.layouts import is_onnx
from models.encoders.spec import IMAGENET_MEAN, IMAGENET_STD, ONNX_ARCH, Encoder, EncoderSpec, spec_errors
from models.storage.atomic import write_bytes_atomic

DEFAULT_IMAGE_SIZE = 224


#: Why ``regularize`` refuses ONNX encoders (command line: exit 2; job API: 422).
NOT_TRAINABLE = (
    "ONNX encoders are inference exports and are not fine-tuned: the graph has its batch-norm statistics "
    "folded in and no training mode. Regularize the source model instead (a timm architecture with "
    "--arch timm:NAME and its state dict, or a ResNet checkpoint), then export it again."
)


#: How to export with a dynamic batch dimension, for the error of a fixed-batch export.
DYNAMIC_BATCH_FIX = (
    "export it with a dynamic batch dimension: torch.onnx.export(model, (x,), 'encoder.onnx', dynamo=True, "
    "dynamic_shapes=({0: torch.export.Dim('batch')},)), or with the TorchScript-based exporter "
    "dynamic_axes={'input': {0: 'batch'}, 'output': {0: 'batch'}}"
)


def onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module; an :class:`OnnxError` saying how to install it when it is missing."""
    try:
        # An optional dependency, imported lazily: only ONNX encoders and QSCORE_RUNTIME=onnxruntime need it.
        import onnxruntime as ort
    except ImportError as exc:
        raise OnnxError(
            f"ONNX Runtime is not installed ({exc}): pip install onnxruntime (or onnxruntime-gpu for CUDA)"
        ) from None
    return ort


def providers_for(device: torch.device) -> list[str]:
    """ONNX Runtime's execution providers for ``device``, best first, among those it reports.

    CPU: the CPU provider. CUDA: TensorRT and CUDA where ``onnxruntime-gpu`` offers them, then the
    CPU one (ONNX Runtime places any operator the GPU providers lack there).
    """
    available = set(onnxruntime().get_available_providers())
    wanted = ["CPUExecutionProvider"]
    if device.type == "cuda":
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", *wanted]
    return [p for p in wanted if p in available]


def provider_options(providers: Sequence[str], device: torch.device) -> list[dict[str, Any]]:
    """The device index for the GPU providers (``cuda:N``); nothing for the CPU one."""
    index = str(device.index or 0)
    return [{"device_id": index} if p != "CPUExecutionProvider" else {} for p in providers]


def make_session(
    model: bytes,
    *,
    intra_op_threads: int | None = None,
    device: torch.device | None = None,
    what: str = "the ONNX model",
) -> Any:
    """An ONNX Runtime ``InferenceSession`` of a serialised model (an :class:`OnnxError` if it does not load).

    ``intra_op_threads``: threads of one operator (None: ONNX Runtime's default, the physical
    cores); operators run one after the other (``inter_op`` 1), as the encoder is one chain.
    """
    ort = onnxruntime()
    device = device or torch.device("cpu")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings (unused initialisers, ...) are noise here
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    # Idle pool threads sleep instead of spinning: the service's event loop needs the cores they
    # would burn (2 threads on a busy 2-core machine: 185 against 111 batch-1 forwards/s).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = providers_for(device)
    try:
        return ort.InferenceSession(
            model, options, providers=providers, provider_options=provider_options(providers, device)
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if "external" in first.lower():
            hint = (
                "; its tensors are in external data files, which qscore does not read: save it as one file "
                "(onnx.save_model(model, path, save_as_external_data=False))"
            )
        raise OnnxError(f"{what} is not a loadable ONNX model: {first}{hint}") from None


class OnnxEncoder(Encoder):
    """An ONNX model run by ONNX Runtime as an encoder: ``forward(x)`` is the graph's (N, r) output.

    The inputs go to ONNX Runtime as float32 arrays on the host; the output comes back on the
    input's device. :meth:`configure` rebuilds the session for a device and thread count.
    """

    def __init__(self, model: bytes, session: Any, spec: EncoderSpec) -> None:
        super().__init__()
        self.model_bytes = model
        self.session = session
        self.spec = spec
        self.input_name = session.get_inputs()[0].name

    def configure(self, *, intra_op_threads: int | None, device: torch.device) -> None:
        """Serve with ``intra_op_threads`` threads on ``device``'s providers (a new session)."""
        self.session = make_session(self.model_bytes, intra_op_threads=intra_op_threads, device=device)

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(np.asarray(out)).to(x.device)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        # The graph's initialisers are not torch tensors; the fingerprint is the file's SHA-256.
        return {}

    def load_backbone_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError(NOT_TRAINABLE)

    def not_trainable_reason(self) -> str | None:
        return NOT_TRAINABLE


def onnx_fingerprint(model: bytes) -> str:
    """The SHA-256 of the serialised model: the file as it was brought."""
    return hashlib.sha256(model).hexdigest()


def _fixed(dim: object) -> int | None:
    """A dimension of an ONNX Runtime input shape: an int when fixed, None when symbolic."""
    return dim if isinstance(dim, int) and dim > 0 else None


def check_signature(session: Any, what: str) -> int | None:
    """One float (N, 3, S, S) input with a dynamic N and one output; the fixed S, or None.

    Errors name what came and how to export it instead.
    """
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        names = ", ".join(f"{i.name} {i.shape}" for i in inputs)
        raise OutputCheckError(
            f"{what} takes {len(inputs)} inputs ({names}); an encoder takes one (N, 3, S, S) image batch: "
            "export the module that maps images to features"
        )
    if len(outputs) != 1:
        names = ", ".join(f"{o.name} {o.shape}" for o in outputs)
        raise OutputCheckError(
            f"{what} returns {len(outputs)} outputs ({names}), expected one (N, r) tensor of features; "
            "export a module whose forward returns the pooled representation"
        )
    (x,) = inputs
    if x.type != "tensor(float)":
        raise OutputCheckError(f"{what} takes {x.type} input {x.name!r}; qscore feeds float32 images (N, 3, S, S)")
    shape = list(x.shape) if x.shape is not None else []
    if len(shape) != 4 or _fixed(shape[1]) not in (None, 3):
        raise OutputCheckError(f"{what} takes input {x.name!r} of shape {shape}; an encoder takes images (N, 3, S, S)")
    batch = _fixed(shape[0])
    if batch is not None:
        raise OutputCheckError(
            f"{what} has a fixed batch size of {batch} (input {x.name!r} of shape {shape}), but qscore scores "
            f"batches of any size: {DYNAMIC_BATCH_FIX}"
        )
    height, width = _fixed(shape[2]), _fixed(shape[3])
    if height is not None and width is not None and height != width:
        raise OutputCheckError(f"{what} takes {height}x{width} images; qscore feeds square SxS crops")
    return height if height is not None and height == width else None


def load_onnx(
    path: str | Path,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dim: int | None = None,
) -> tuple[OnnxEncoder, str]:
    """The encoder in ``path`` and its fingerprint, after the signature check and a probe forward pass.

    ``dim``, when given (a registry record), must equal the probed feature dimension.
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxError(f"no ONNX file at {path}")
    if not is_onnx(path):
        raise OnnxError(
            f"{path} is not an ONNX model (expected a file written by torch.onnx.export or onnx.save_model)"
        )
    what = f"the ONNX model in {path}"
    model = path.read_bytes()
    session = make_session(model, what=what)
    fixed_size = check_signature(session, what)
    if image_size is not None and fixed_size is not None and image_size != fixed_size:
        raise OutputCheckError(
            f"{what} takes {fixed_size}x{fixed_size} images, not {image_size}x{image_size}: pass --image-size "
            f"{fixed_size}, or export it with dynamic image sizes"
        )
    try:
        spec = EncoderSpec(
            arch=ONNX_ARCH,
            cifar_stem=False,
            image_size=image_size or fixed_size or DEFAULT_IMAGE_SIZE,
            mean=tuple(mean or IMAGENET_MEAN),
            std=tuple(std or IMAGENET_STD),
            dim=1,  # replaced by the probed one below
        )
    except ValueError as exc:
        raise OnnxError(f"bad preprocessing for {path}: {spec_errors(exc)}") from None
    encoder = OnnxEncoder(model, session, spec)
    probed = check_output_dim(encoder, spec.image_size, spec.mean, spec.std, what=what)
    if dim is not None and probed != dim:
        raise OutputCheckError(f"{what} outputs {probed} features, its record says {dim}")
    encoder.spec = spec.model_copy(update={"dim": probed})
    return encoder, onnx_fingerprint(model)


def save_onnx(encoder: OnnxEncoder, path: str | Path) -> str:
    """Write the model as it was loaded, atomically; return its fingerprint."""
    write_bytes_atomic(path, encoder.model_bytes)
    return onnx_fingerprint(encoder.model_bytes)
