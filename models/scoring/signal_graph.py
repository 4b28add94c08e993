"""The scorer's own arithmetic after the forward pass as one ONNX Runtime session (issue 18).

With ONNX Runtime as the engine on the CPU, what the scorer computes around the encoder (the
Q-Score's parts, the norm and sparsity signals, the k-NN search of the reference bank, the
prototype confidences, the pixel statistics, a linear head's softmax signals and class
probabilities) is some sixty small torch operations a batch. Each costs its dispatch, and in the
service each hands the GIL to the event loop and waits to take it back. Traced once into an ONNX
graph it is one ``Session.run``: measured on the demo (2-core Intel Xeon), 0.53 against 1.0 ms at
batch 11 and 0.33 against 0.7 ms at batch 1 (torch's figures without the pixel statistics); at
batch 64 both take about 2.2 ms. ``/score`` at 32 connections gained 1.24x (``bench_ab``).

The graph is traced from the very function the torch path runs (the scorer's
``_signal_tensors``), so there is one definition of every signal; :func:`build_signal_graph`
checks the graph against that function on probe batches and gives None (the torch path) where
it does not trace, answers otherwise, or would copy a large bank. Inputs: ``pixels`` (B, 3, H, W)
uint8 and ``h`` (B, r) float32; outputs: the Q-Score's parts (``parts.*``) and the signals, by name.

The tracer is TorchScript's (``torch.onnx.export(..., dynamo=False)``): the graph has no control
flow and is made anew at every feature-set load, and it traces in 0.1 s against 2.6 s for the
``torch.export``-based exporter.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.encoders.onnx_encoder import make_session
from models.scoring.qscore import QScoreParts

log = logging.getLogger(__name__)

#: What the graph is traced from: (h, pixels in [0, 1] or None) -> the Q-Score's parts and the signals.
SignalFunction = Callable[[torch.Tensor, torch.Tensor | None], tuple[QScoreParts, dict[str, torch.Tensor]]]

PARTS = ("q_score", "dominant", "active", "mean_active", "l1_norm")

#: The graph holds the reference bank as a constant, a second copy beside the scorer's (ONNX
#: Runtime copies a model's constants into its own buffers): above this size the scorer stays on
#: torch rather than double the bank's memory (the demo's is 2.6 MB).
MAX_BANK_BYTES = 64 * 2**20

#: Largest difference allowed between the graph's and torch's signals, relative to the larger of 1
#: and torch's largest |value| of that signal: absolute for probabilities, margins and Q-Scores,
#: whose differences of nearly equal numbers lose relative precision (float reassociation gives
#: about 1e-7).
GRAPH_TOLERANCE = 1e-5


class _SignalModule(torch.nn.Module):
    """``(pixels, h) -> tuple`` of the parts and signals in ``names`` order, for the tracer."""

    def __init__(self, compute: SignalFunction, needs_pixels: bool) -> None:
        super().__init__()
        self.compute, self.needs_pixels = compute, needs_pixels
        self.names: list[str] = []

    def forward(self, pixels: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = pixels.float().div(255) if self.needs_pixels else None
        parts, sig = self.compute(h, x)
        out = {f"parts.{name}": getattr(parts, name) for name in PARTS} | sig
        self.names = list(out)
        return tuple(out.values())


@dataclass(frozen=True)
class SignalOutputs:
    """One batch's graph outputs: the Q-Score's parts (torch, on the CPU) and the signals (numpy)."""

    parts: QScoreParts
    signals: dict[str, np.ndarray]


class SignalGraph:
    """An ONNX Runtime session of the signal arithmetic; :meth:`run` on one batch."""

    def __init__(self, session: Any, names: list[str]) -> None:
        self.session, self.names = session, names
        # An exporter may drop an input the graph does not read (``pixels`` without pixel statistics).
        self.inputs = {i.name for i in session.get_inputs()}

    def run(self, pixels: torch.Tensor, h: torch.Tensor) -> SignalOutputs:
        """``pixels`` (B, 3, H, W) uint8 and ``h`` (B, r) float32, both on the CPU."""
        feed = {"h": h.contiguous().numpy()}
        if "pixels" in self.inputs:
            feed["pixels"] = pixels.contiguous().numpy()
        out = dict(zip(self.names, self.session.run(self.names, feed), strict=True))
        parts = QScoreParts(**{name: torch.from_numpy(out.pop(f"parts.{name}")) for name in PARTS})
        return SignalOutputs(parts, out)


def build_signal_graph(
    compute: SignalFunction,
    *,
    needs_pixels: bool,
    image_size: int,
    feature_dim: int,
    intra_op_threads: int | None,
    bank_bytes: int = 0,
) -> SignalGraph | None:
    """The traced and checked graph of ``compute``; None (logged) where the bank it would copy is
    over :data:`MAX_BANK_BYTES`, or it does not trace, or its signals differ from ``compute``'s by
    more than :data:`GRAPH_TOLERANCE`."""
    if bank_bytes > MAX_BANK_BYTES:
        log.warning(
            "the scorer's signals run on torch: the ONNX signal graph would hold a second copy of the %.1f MiB "
            "reference bank (over %d MiB)",
            bank_bytes / 2**20,
            MAX_BANK_BYTES // 2**20,
        )
        return None
    module = _SignalModule(compute, needs_pixels)
    try:
        model = _trace(module, image_size, feature_dim)
        session = make_session(model, intra_op_threads=intra_op_threads, what="the signal graph")
        graph = SignalGraph(session, module.names)
        check(graph, compute, needs_pixels, image_size, feature_dim)
    except Exception as exc:  # an optimisation that fails leaves the torch path, never a failed load
        log.warning("the scorer's signals run on torch: the ONNX signal graph is not usable (%s)", exc)
        return None
    return graph


def _trace(module: _SignalModule, image_size: int, feature_dim: int) -> bytes:
    pixels, h = _probe(2, image_size, feature_dim, seed=0)
    with torch.no_grad():
        module(pixels, h)  # the output names, in order
    names = module.names
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values taken as constants
        torch.onnx.export(
            module,
            (pixels, h),
            buffer,
            dynamo=False,
            input_names=["pixels", "h"],
            output_names=names,
            dynamic_axes={name: {0: "batch"} for name in ["pixels", "h", *names]},
        )
    return buffer.getvalue()


class SignalGraphMismatch(ValueError):
    """The graph's signals are not torch's."""


def check(graph: SignalGraph, compute: SignalFunction, needs_pixels: bool, image_size: int, feature_dim: int) -> None:
    """The graph against ``compute`` on probe batches of 1 and 8: the same signals, each within
    :data:`GRAPH_TOLERANCE` of torch's, and the same dominant features."""
    for n in (1, 8):
        pixels, h = _probe(n, image_size, feature_dim, seed=n)
        with torch.no_grad():
            parts, want = compute(h, pixels.float().div(255) if needs_pixels else None)
        got = graph.run(pixels, h)
        if set(got.signals) != set(want):
            raise SignalGraphMismatch(f"signals {sorted(got.signals)} against torch's {sorted(want)}")
        if not torch.equal(got.parts.dominant, parts.dominant):
            raise SignalGraphMismatch(f"the dominant features differ on a batch of {n}")
        pairs = {name: (got.signals[name], want[name]) for name in want}
        pairs |= {f"parts.{name}": (getattr(got.parts, name).numpy(), getattr(parts, name)) for name in PARTS}
        for name, (g, w) in pairs.items():
            g, w = g.astype(np.float64), w.numpy().astype(np.float64)
            gap = np.max(np.abs(g - w), initial=0.0) / max(np.max(np.abs(w), initial=0.0), 1.0)
            if g.shape != w.shape or not gap <= GRAPH_TOLERANCE:  # also catches NaN
                raise SignalGraphMismatch(f"{name} differs from torch's by {gap:.3g} relative on a batch of {n}")


def _probe(n: int, image_size: int, feature_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 pixels and sparse non-negative representations (as a ReLU encoder gives)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    h = torch.relu(torch.randn(n, feature_dim, generator=g)) ** 2
    return pixels, h
