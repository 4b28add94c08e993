"""ONNX encoders: a model exported for ONNX Runtime, Triton or TorchServe, scored as it is.

The file holds an ONNX graph with one float input (N, 3, S, S) and one output (N, r). Like a
TorchScript file it carries no preprocessing: ``image_size``, ``mean`` and ``std`` come from the
command line or the registry record (defaults: the graph's own input size when it is fixed, else
224; ImageNet's statistics). It is run by ONNX Runtime (an optional dependency, imported on
first use), checked by the same probe forward pass as every brought encoder
(``models/encoders/checks.py``), and its batch dimension must be dynamic: the service batches
whatever arrives, from 1 image to ``QSCORE_MAX_BATCH_SIZE``.

Loading an ONNX file runs no Python code and unpickles nothing. Tensors in external data files
(what ``torch.onnx.export`` writes by default: ``encoder.onnx`` beside ``encoder.onnx.data``) are
read in from the model's own folder, never from outside it, and the model is kept as one file,
under protobuf's 2 GB (the registry keeps one file per version); its fingerprint is that of the
one file. An upload (``POST /admin/models``) is one file: there the tensors must be inside
(``onnx.save_model(model, path, save_as_external_data=False)``).

Fine-tuning is refused (:meth:`OnnxEncoder.not_trainable_reason`): the graph is an inference
export, with batch norm folded and no gradients.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from models.encoders.checks import brought_spec, probed_spec
from models.encoders.errors import OnnxError, OutputCheckError
from models.encoders.layouts import is_onnx
from models.encoders.spec import IMAGENET_MEAN, IMAGENET_STD, ONNX_ARCH, Encoder, EncoderSpec
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


#: Protobuf's limit on one serialised message: a model with its tensors inside must stay below it.
MAX_MODEL_BYTES = 2**31 - 1


def read_model(path: Path) -> bytes:
    """The serialised model in ``path`` with its tensors inside: the file's own bytes, or, when
    its tensors live in external data files, the model with them read in (an :class:`OnnxError`
    when one is missing, lies outside the model's folder, or the whole would exceed 2 GB)."""
    model = path.read_bytes()
    # A lazy import, as for onnxruntime: the package is only needed by ONNX encoders.
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model, uses_external_data

    try:
        proto = onnx.load_model_from_string(model)
    except Exception:  # not parseable: the session's own error says so (make_session)
        return model
    external = [t for t in _tensors(proto.graph) if uses_external_data(t)]
    if not external:
        return model
    folder = path.resolve().parent
    for tensor in external:
        location = ExternalDataInfo(tensor).location
        target = (folder / location).resolve()
        if not target.is_relative_to(folder):
            raise OnnxError(
                f"{path} names external data {location!r} outside its own folder; qscore reads tensors only "
                "from beside the model"
            )
        if not target.is_file():
            raise OnnxError(
                f"{path} keeps tensor {tensor.name!r} in {location!r}, which is not beside it: save the model as "
                "one file (torch.onnx.export(..., external_data=False), or onnx.save_model(model, path, "
                "save_as_external_data=False)); from the command line, that file beside the model works too"
            )
    try:
        load_external_data_for_model(proto, str(folder))
    except Exception as exc:
        raise OnnxError(f"the external data of {path} could not be read: {exc}") from None
    if proto.ByteSize() > MAX_MODEL_BYTES:
        raise OnnxError(
            f"{path} with its external data is over 2 GB; qscore keeps an ONNX encoder as one file, under protobuf's "
            "2 GB limit"
        )
    return proto.SerializeToString(deterministic=True)


def _tensors(graph: Any) -> Iterator[Any]:
    """Every tensor a graph holds: initialisers and constant attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


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
                "; its tensors are in external data files, which an upload cannot bring: save it as one file "
                "(onnx.save_model(model, path, save_as_external_data=False)), or import it from its folder "
                "(qscore import)"
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
    model = read_model(path)
    session = make_session(model, what=what)
    fixed_size = check_signature(session, what)
    if image_size is not None and fixed_size is not None and image_size != fixed_size:
        raise OutputCheckError(
            f"{what} takes {fixed_size}x{fixed_size} images, not {image_size}x{image_size}: pass --image-size "
            f"{fixed_size}, or export it with dynamic image sizes"
        )
    spec = brought_spec(ONNX_ARCH, image_size or fixed_size or DEFAULT_IMAGE_SIZE, mean or IMAGENET_MEAN,
                        std or IMAGENET_STD, error=OnnxError, subject=str(path))  # fmt: skip
    encoder = OnnxEncoder(model, session, spec)
    encoder.spec = probed_spec(encoder, spec, dim, what)
    return encoder, onnx_fingerprint(model)


def save_onnx(encoder: OnnxEncoder, path: str | Path) -> str:
    """Write the model as it was loaded, atomically; return its fingerprint."""
    write_bytes_atomic(path, encoder.model_bytes)
    return onnx_fingerprint(encoder.model_bytes)
