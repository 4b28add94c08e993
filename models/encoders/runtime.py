"""The inference engine of an encoder: torch, or ONNX Runtime running an ONNX export of it.

:meth:`Runtime.engine` turns an :class:`Encoder` into a callable ``(B, 3, H, W) float tensor ->
(B, r) tensor`` (on the input's device), chosen by ``QSCORE_RUNTIME``:

- ``torch``: the encoder's own forward. An ONNX encoder is always run by ONNX Runtime, the only
  engine that can run it (with this runtime's threads and device).
- ``onnxruntime``: ONNX Runtime. A torch encoder (built-in ResNet, timm, TorchScript,
  ``torch.export``) is exported to ONNX once at load, with a dynamic batch dimension, and its
  outputs are checked against torch's on probe batches of 1 and 8 images; an encoder that does
  not export, or whose export answers otherwise, is an error (:class:`RuntimeUnavailable`).
- ``auto``: ONNX Runtime where it is installed and the encoder exports and checks, else torch;
  the reason is logged once.

Exports go to ``cache_dir`` (the registry's ``exports/`` folder) named by the encoder's
fingerprint, architecture and input size, written atomically, so each encoder is exported once
per registry, by whichever process loads it first; a cached export is checked like a new one and
exported again if it does not load or answers otherwise. The export itself is
``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based exporter); TorchScript
modules, which that exporter cannot trace, take the TorchScript-based one.

Threads: with ONNX Runtime on the CPU, the scorer's own torch work around the forward (the
normalisation, the Q-Score, typicality, the head) runs on one torch thread
(:attr:`Engine.torch_threads`, :func:`torch_threads`): torch's OpenMP threads spin-wait after each
parallel region and take the cores from ONNX Runtime's pool (on 2 cores a 0.05 ms torch
normalisation before each batch-64 forward took ONNX Runtime from 3,160 to 2,500 images/s).

Providers: ONNX Runtime's CPU provider on the CPU; TensorRT and CUDA where ``onnxruntime-gpu``
reports them for a CUDA device (untested here: no GPU was lent when this was written).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from models.encoders.checks import check_inputs
from models.encoders.errors import OnnxError, RuntimeUnavailable
from models.encoders.export_program import ExportProgramEncoder
from models.encoders.onnx_encoder import OnnxEncoder, make_session, onnxruntime, providers_for
from models.encoders.spec import Encoder, EncoderSpec
from models.encoders.torchscript_encoder import TorchScriptEncoder
from models.storage.atomic import write_bytes_atomic

log = logging.getLogger(__name__)

RuntimeName = Literal["torch", "onnxruntime", "auto"]


RUNTIMES: tuple[RuntimeName, ...] = ("torch", "onnxruntime", "auto")


#: Largest difference allowed between the export's and torch's representations, relative to
#: torch's largest |h|: float reassociation gives about 1e-7; a wrong export is off by far more.
EXPORT_TOLERANCE = 1e-4


#: Batch sizes the export is checked on: the lone request, and a batch unlike the export's 2.
VERIFY_BATCHES = (1, 8)


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)


@dataclass(frozen=True, eq=False)
class Engine:
    """What runs the encoder: ``engine(x)`` is ``h``, (B, r), on ``x``'s device."""

    name: Literal["torch", "onnxruntime"]
    forward: Callable[[torch.Tensor], torch.Tensor]
    #: ONNX Runtime's execution providers in use, best first (empty for torch).
    providers: tuple[str, ...] = ()
    #: Where the ONNX graph came from: "file" (an ONNX encoder), "exported" now, or "cache".
    onnx_source: Literal["file", "exported", "cache"] | None = None
    #: Why ``auto`` chose torch, when it did.
    fallback_reason: str | None = None
    #: torch's intra-op threads for the work around the forward (None: as the caller set them);
    #: 1 with ONNX Runtime on the CPU, whose own pool runs the encoder.
    torch_threads: int | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block and restored after (None: left as they are).

    In the calling thread: OpenMP's thread count is per thread (a pair of calls costs about 0.3 us).
    """
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _host_threads(device: torch.device) -> int | None:
    """:attr:`Engine.torch_threads` of an ONNX Runtime engine on ``device``."""
    return 1 if device.type == "cpu" else None


def export_path(cache_dir: Path, fingerprint: str, spec: EncoderSpec) -> Path:
    """The cached export of an encoder: by fingerprint, architecture and input size (the graph's H and W)."""
    arch = re.sub(r"[^A-Za-z0-9._-]", "-", spec.arch)
    return Path(cache_dir) / f"{fingerprint}-{arch}-{spec.image_size}px.onnx"


def export_onnx(encoder: Encoder) -> bytes:
    """The encoder as a serialised ONNX model with a dynamic batch dimension (a :class:`RuntimeUnavailable`
    saying why when it does not export)."""
    spec = encoder.spec
    parameter = next(iter(encoder.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    x = check_inputs(2, spec.image_size, spec.mean, spec.std).to(device)
    try:
        with warnings.catch_warnings():
            # torch.onnx's deprecation notes and the tracer's warnings say nothing about this export.
            warnings.simplefilter("ignore")
            if isinstance(encoder, TorchScriptEncoder):
                # The torch.export-based exporter cannot trace a ScriptModule; the TorchScript-based one can.
                buffer = io.BytesIO()
                torch.onnx.export(
                    encoder.module,
                    (x,),
                    buffer,
                    dynamo=False,
                    input_names=["x"],
                    output_names=["h"],
                    dynamic_axes={"x": {0: "batch"}, "h": {0: "batch"}},
                )
                return buffer.getvalue()
            if isinstance(encoder, ExportProgramEncoder):  # its dynamic batch is in the program
                program = torch.onnx.export(encoder.program, (x,), dynamo=True, verbose=False)
            else:
                program = torch.onnx.export(
                    encoder,
                    (x,),
                    dynamo=True,
                    dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                    input_names=["x"],
                    output_names=["h"],
                    verbose=False,
                )
            return program.model_proto.SerializeToString()
    except Exception as exc:
        raise RuntimeUnavailable(f"the encoder does not export to ONNX ({_root_cause(exc)})") from None


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's first line (the exporter wraps it in steps and advice), without colours."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    first = text.splitlines()[0][:300] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def verify(encoder: Encoder, exported: OnnxEncoder, device: torch.device) -> float:
    """The export's largest difference from torch on the probe batches, relative to torch's largest |h|.

    A :class:`RuntimeUnavailable` when it exceeds :data:`EXPORT_TOLERANCE` or the shapes differ.
    """
    spec = encoder.spec
    worst = 0.0
    for n in VERIFY_BATCHES:
        x = check_inputs(n, spec.image_size, spec.mean, spec.std, seed=7).to(device)
        with torch.inference_mode():
            want = encoder(x).float()
            got = exported(x).float()
        if got.shape != want.shape:
            raise RuntimeUnavailable(
                f"the ONNX export maps a batch of {n} to shape {tuple(got.shape)}, torch to {tuple(want.shape)}"
            )
        gap = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
        if not gap <= EXPORT_TOLERANCE:  # also catches NaN
            raise RuntimeUnavailable(
                f"the ONNX export's representations differ from torch's by {gap:.3g} relative on a batch of {n} "
                f"(more than {EXPORT_TOLERANCE:g})"
            )
        worst = max(worst, gap)
    return worst


@dataclass(frozen=True)
class Runtime:
    """How encoders are run: the engine (``kind``), its intra-op threads, where exports are cached."""

    kind: RuntimeName = "torch"
    #: Threads of one ONNX Runtime operator (torch's are set by whoever runs the forward, in its
    #: own thread: ``torch.set_num_threads``); None: ONNX Runtime's default.
    intra_op_threads: int | None = None
    #: Where ONNX exports are cached (the registry's ``exports/``); None: exported at every load.
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.kind not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.kind!r}")

    def engine(self, encoder: Encoder, fingerprint: str, device: torch.device, precision: str = "float32") -> Engine:
        """The engine that runs ``encoder`` (already on ``device``) for this runtime."""
        if isinstance(encoder, OnnxEncoder):
            encoder.configure(intra_op_threads=self.intra_op_threads, device=device)
            if precision != "float32":
                _log_once(f"precision {precision} is a torch setting: ONNX encoders run as they were exported")
            if device.type == "cuda" and encoder.providers == ["CPUExecutionProvider"]:
                _log_once(
                    "this onnxruntime has no GPU provider (install onnxruntime-gpu): ONNX encoders run on the CPU"
                )
            return Engine("onnxruntime", encoder, tuple(encoder.providers), "file", torch_threads=_host_threads(device))
        if self.kind == "torch":
            return Engine("torch", encoder)
        try:
            return self._onnx_engine(encoder, fingerprint, device, precision)
        except RuntimeUnavailable as exc:
            if self.kind == "onnxruntime":
                raise RuntimeUnavailable(
                    f"QSCORE_RUNTIME=onnxruntime cannot run encoder {fingerprint[:12]} ({encoder.spec.arch}): {exc}; "
                    "use QSCORE_RUNTIME=torch or auto"
                ) from None
            _log_once(f"QSCORE_RUNTIME=auto: encoder {fingerprint[:12]} ({encoder.spec.arch}) runs on torch: {exc}")
            return Engine("torch", encoder, fallback_reason=str(exc))

    def _onnx_engine(self, encoder: Encoder, fingerprint: str, device: torch.device, precision: str) -> Engine:
        if precision != "float32":
            raise RuntimeUnavailable(f"precision {precision} is a torch setting; ONNX Runtime serves float32")
        try:
            onnxruntime()
        except OnnxError as exc:
            raise RuntimeUnavailable(str(exc)) from None
        providers = providers_for(device)
        if device.type == "cuda" and providers == ["CPUExecutionProvider"]:
            raise RuntimeUnavailable("this onnxruntime has no GPU provider for a CUDA device (install onnxruntime-gpu)")
        path = export_path(self.cache_dir, fingerprint, encoder.spec) if self.cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                exported = self._session(path.read_bytes(), encoder.spec, device)
                verify(encoder, exported, device)
                return Engine(
                    "onnxruntime", exported, tuple(exported.providers), "cache", torch_threads=_host_threads(device)
                )
            except (OnnxError, RuntimeUnavailable) as exc:  # damaged, or from another exporter: export again
                log.warning("the cached ONNX export %s is not usable (%s); exporting again", path, exc)
        model = export_onnx(encoder)
        try:
            exported = self._session(model, encoder.spec, device)
        except OnnxError as exc:
            raise RuntimeUnavailable(str(exc)) from None
        gap = verify(encoder, exported, device)
        if path is not None:
            write_bytes_atomic(path, model)
        log.info("exported encoder %s to ONNX (differs from torch by %.2g relative)", fingerprint[:12], gap)
        return Engine(
            "onnxruntime", exported, tuple(exported.providers), "exported", torch_threads=_host_threads(device)
        )

    def _session(self, model: bytes, spec: EncoderSpec, device: torch.device) -> OnnxEncoder:
        session = make_session(model, intra_op_threads=self.intra_op_threads, device=device, what="the ONNX export")
        return OnnxEncoder(model, session, spec)
