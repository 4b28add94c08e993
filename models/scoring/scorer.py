"""Scoring images with an encoder and its feature set: what ``/score`` and ``qscore score`` return.

The scorer's surface is a model server's handler: :meth:`Scorer.preprocess` (one decoded image to
its uint8 pixels at the encoder's size, per image, on the host), :meth:`Scorer.infer` (a batch of
those pixels to representations, and to the pixel statistics typicality reads, when it reads
them) and :meth:`Scorer.postprocess` (representations to one :class:`ImageScore` each);
:meth:`Scorer.score` runs the last two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from models.data.transforms import ResizeCentreCrop
from models.encoders.device import resolve_device
from models.encoders.runtime import Runtime, torch_threads
from models.encoders.spec import Encoder
from models.scoring.compatibility import check_fits
from models.scoring.feature_set import FeatureSet
from models.scoring.probe import LinearHead, head_outputs, head_tensors, softmax
from models.scoring.qscore import QScoreParts, discriminative_mask, q_score_parts
from models.scoring.result import FeatureValue, ImageScore, reasons_of
from models.scoring.signal_graph import SignalGraph, SignalOutputs, build_signal_graph
from models.scoring.signals import finish_signals, signal_tensors
from models.scoring.typicality import pixel_signals

PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: The head's (B, C) class probabilities among the signal graph's outputs: the traffic monitor's
#: COTT reads them (``Inference.probabilities``), no signal does.
PROBABILITIES = "probe_probabilities"

#: What :meth:`Scorer.infer` takes: (H, W, 3) uint8 arrays from :meth:`Scorer.preprocess`, or a
#: (B, 3, H, W) uint8 tensor on any device (the device JPEG decoder's output).
Pixels = Sequence[np.ndarray] | torch.Tensor


@dataclass(frozen=True)
class Inference:
    """A batch after the forward pass: ``h`` (B, r) float32 on the scoring device, and the pixel
    statistics of typicality (each (B,)) when its model uses them, else None; with a signal graph
    (ONNX Runtime on the CPU), its outputs, which the pixel statistics are part of."""

    h: torch.Tensor
    pixel_stats: dict[str, torch.Tensor] | None
    graph: SignalOutputs | None = None

    @property
    def probabilities(self) -> np.ndarray | None:
        """The head's (B, C) class probabilities where the signal graph computed them, else None."""
        return None if self.graph is None else self.graph.signals.get(PROBABILITIES)


class Scorer:
    """An encoder on a device with its discriminative feature set, ready to score batches.

    ``precision`` other than float32 runs the encoder under autocast on a GPU only; the
    Q-Score itself is always computed in float32. ``runtime`` says what runs the encoder
    (torch by default; ONNX Runtime: ``models/encoders/runtime.py``). With ONNX Runtime on the
    CPU the arithmetic after the forward runs as one more ONNX Runtime session
    (``models/scoring/signal_graph.py``), where it traces and checks.
    """

    def __init__(
        self,
        encoder: Encoder,
        encoder_fingerprint: str,
        feature_set: FeatureSet,
        device: str = "auto",
        precision: str = "float32",
        runtime: Runtime | None = None,
    ) -> None:
        check_fits(feature_set, encoder_fingerprint, encoder.spec)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.device = resolve_device(device)
        if precision != "float32" and self.device.type != "cuda":
            raise ValueError(f"precision {precision} is only supported on a CUDA device")
        self.precision = precision
        self.encoder = encoder.to(self.device).eval()
        runtime = runtime or Runtime()
        self.engine = runtime.engine(self.encoder, encoder_fingerprint, self.device, precision)
        self.fingerprint = encoder_fingerprint
        self.feature_set = feature_set
        spec = encoder.spec
        self.image_size = spec.image_size
        # eval_transform (models/data/transforms.py) split in two: the geometry per image (Pillow),
        # then ToTensor and Normalize for a whole batch at once, the same elementwise operations.
        size = spec.image_size
        self._geometry = ResizeCentreCrop(size)
        self._mean = torch.tensor(spec.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(spec.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        # A boolean mask built once on the device: indices would be range-checked on the host
        # (a GPU sync) on every batch.
        self.discriminative = discriminative_mask(feature_set.discriminative_indices, encoder.feature_dim).to(
            self.device
        )
        self.typicality = feature_set.typicality
        self.bank = None
        if feature_set.bank is not None:
            self.bank = feature_set.bank.to(self.device)
        elif self.typicality is not None and self.typicality.needs_bank:
            raise ValueError("the feature set's typicality needs its reference bank, which was not loaded")
        self._needs_pixels = self.typicality is not None and self.typicality.needs_pixels
        head = feature_set.classifier
        self.head = None if head is None else head.to(self.device)
        # Without typicality or a risk model nothing reads the other signals: the Q-Score's alone.
        self._q_only = self.typicality is None and feature_set.risk_model is None
        # A user's TorchScript head runs on torch after the graph; the graph traces a linear one.
        self._head_in_graph = isinstance(self.head, LinearHead)
        self.signal_graph: SignalGraph | None = None
        if self.engine.name == "onnxruntime" and self.device.type == "cpu":
            with torch_threads(self.engine.torch_threads):
                self.signal_graph = build_signal_graph(
                    lambda h, pixels: self._signal_tensors(h, pixels, head=self._head_in_graph, probabilities=True),
                    needs_pixels=self._needs_pixels,
                    image_size=spec.image_size,
                    feature_dim=encoder.feature_dim,
                    intra_op_threads=runtime.intra_op_threads,
                    bank_bytes=self.bank_bytes,
                )

    @property
    def bank_bytes(self) -> int:
        """Bytes of the reference bank on the serving device (0 without one)."""
        return 0 if self.bank is None else self.bank.nbytes

    # -- 1. preprocess: per image, on the host ---------------------------------------------
    def preprocess(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image resized (short side) and centre-cropped: (H, W, 3) uint8."""
        if image.size == (self.image_size, self.image_size):
            # Already the encoder's size: resize and crop would copy the same pixels, at about a
            # tenth of the event loop's busy time under load with 32 px uploads (py-spy).
            return np.asarray(image, dtype=np.uint8)
        return np.asarray(self._geometry(image), dtype=np.uint8)

    # -- 2. infer: per batch, on the device ------------------------------------------------
    def infer(self, images: Pixels) -> Inference:
        """uint8 pixels of a batch to representations (and pixel statistics, when used).

        The encoder's input is ``(x / 255 - mean) / std``, bit for bit what ``eval_transform``
        gives image by image (ToTensor, then Normalize). On a GPU a batch of arrays crosses from
        pinned memory as uint8 (a quarter of the float bytes).
        """
        if isinstance(images, torch.Tensor):
            batch = images
        else:
            batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
            if self.device.type == "cuda":
                batch = batch.pin_memory()
        if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) uint8 pixels, got {tuple(batch.shape)} {batch.dtype}")
        with torch.inference_mode(), torch_threads(self.engine.torch_threads):
            pixels = batch.to(self.device, non_blocking=True).contiguous()
            x = pixels.to(dtype=torch.float32).div_(255)
            if self.signal_graph is not None:  # the pixel statistics are in the graph
                h = self._forward(x.sub_(self._mean).div_(self._std))
                return Inference(h, None, self.signal_graph.run(pixels, h))
            stats = pixel_signals(x) if self._needs_pixels else None
            x = x.sub_(self._mean).div_(self._std)
            return Inference(self._forward(x), stats)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The inference engine (torch, or an ONNX Runtime session: ``QSCORE_RUNTIME``) on ``x``."""
        if self.precision == "float32":
            return self.engine(x).float()
        with torch.autocast("cuda", dtype=PRECISIONS[self.precision]):
            return self.engine(x).float()

    # -- 3. postprocess: representations to verdicts ---------------------------------------
    def postprocess(self, inference: Inference, features: bool | Sequence[bool] = True) -> list[ImageScore]:
        """One :class:`ImageScore` per image.

        ``features``: list the dominant and active discriminative features of every image
        (True), of none (False), or of the images flagged in a sequence of B booleans.
        """
        # All of it on the engine's torch threads: one torch op left on the full OpenMP pool (the
        # feature lists' nonzero, say) leaves its threads spin-waiting into the next forward.
        with torch_threads(self.engine.torch_threads):
            return self._postprocess(inference, features)

    def _postprocess(self, inference: Inference, features: bool | Sequence[bool]) -> list[ImageScore]:
        h, fs = inference.h, self.feature_set
        wanted = [features] * h.shape[0] if isinstance(features, bool) else list(features)
        parts, sig = self.signals(inference)
        predicted = sig.get("probe_prediction")
        q = sig["q_score"]
        risk = fs.risk(sig)
        if risk is not None:
            risk = np.clip(risk, 0.0, 1.0)  # once for the batch: per image it costs more than the forward
        typ = sig.get("typicality")
        confidence = sig.get("probe_max_softmax")
        classes = self.head.classes if self.head is not None else []
        # Python floats once for the batch (.tolist()), not per image: at batch 64 per-image
        # indexing and conversion cost as much as the kNN search.
        q_list, l1_list = q.tolist(), parts.l1_norm.cpu().tolist()
        risk_list = None if risk is None else risk.tolist()
        typ_list = None if typ is None else typ.tolist()
        conf_list = None if confidence is None else confidence.tolist()
        dominant = active = [None] * len(wanted)
        if any(wanted):
            h_cpu = h.cpu()
            dominant = _feature_values(h_cpu, parts.dominant.cpu(), wanted)
            active = _feature_values(h_cpu, parts.active.cpu(), wanted)
        out = []
        for i in range(len(wanted)):
            low = q_list[i] < fs.alpha
            atypical = None if typ_list is None else typ_list[i] > 1.0
            out.append(
                ImageScore(
                    q_score=q_list[i],
                    low_quality=low,
                    risk=None if risk_list is None else risk_list[i],
                    l1_norm=l1_list[i],
                    dominant=dominant[i],
                    discriminative_active=active[i],
                    typicality=None if typ_list is None else typ_list[i],
                    atypical=atypical,
                    reasons=reasons_of(low, atypical),
                    predicted_class=None if predicted is None else classes[predicted[i]],
                    confidence=None if conf_list is None else conf_list[i],
                )
            )
        return out

    def signals(self, inference: Inference) -> tuple[QScoreParts, dict[str, np.ndarray]]:
        """The Q-Score's parts and every signal the risk model may read, each (B,).

        With a head, also its confidence signals and ``probe_prediction`` (the class index).
        """
        if inference.graph is not None:
            parts, sig = inference.graph.parts, dict(inference.graph.signals)
            sig.pop(PROBABILITIES, None)  # (B, C), for the monitor: not a signal
            if self.head is not None and not self._head_in_graph:
                sig |= head_outputs(self.head, inference.h)
        else:
            parts, tensors = self._signal_tensors(inference.h, inference.pixel_stats, head=self.head is not None)
            sig = {name: t.cpu().numpy() for name, t in tensors.items()}
        return parts, sig if self._q_only else finish_signals(sig, self.typicality)

    def _signal_tensors(
        self,
        h: torch.Tensor,
        pixels: torch.Tensor | dict[str, torch.Tensor] | None,
        *,
        head: bool,
        probabilities: bool = False,
    ) -> tuple[QScoreParts, dict[str, torch.Tensor]]:
        """The arithmetic of :meth:`signals` on ``h`` and the pixels (in [0, 1], or their statistics):
        what the torch path runs and the signal graph is traced from (which also gives the head's
        class probabilities, ``probabilities``, to spare the monitor running the head again)."""
        parts = q_score_parts(h, self.discriminative, self.feature_set.eps)
        if self._q_only:
            sig = {"q_score": parts.q_score, "mean_active": parts.mean_active}
        else:
            sig = signal_tensors(h, pixels, parts, self.typicality, self.bank)
        if head:
            logits = self.head.logits(h)
            sig |= head_tensors(logits)
            if probabilities:
                sig[PROBABILITIES] = softmax(logits)
        return parts, sig

    def score(self, images: Pixels, features: bool | Sequence[bool] = True) -> list[ImageScore]:
        """:meth:`infer` then :meth:`postprocess`: the verdicts on a batch of uint8 pixels."""
        return self.postprocess(self.infer(images), features)

    def score_images(self, images: Sequence[Image.Image], features: bool | Sequence[bool] = True) -> list[ImageScore]:
        """Verdicts on decoded RGB images, as one batch (they are preprocessed first)."""
        return self.score([self.preprocess(image) for image in images], features)


def _feature_values(h: torch.Tensor, mask: torch.Tensor, wanted: Sequence[bool]) -> list[list[FeatureValue] | None]:
    """Per image, the ``(index, value)`` of its features where ``mask`` (B, r) is set, in index
    order, for the images ``wanted``; None for the others. One ``nonzero`` and one copy to Python
    for the batch: per image they cost more than the kNN search."""
    rows = torch.tensor([i for i, w in enumerate(wanted) if w], dtype=torch.int64)
    row, col = mask[rows].nonzero(as_tuple=True)  # row-major: by image, then by feature index
    pairs = list(map(FeatureValue._make, zip(col.tolist(), h[rows[row], col].tolist(), strict=True)))
    out: list[list[FeatureValue] | None] = [None] * len(wanted)
    start = 0
    for i, count in zip(rows.tolist(), torch.bincount(row, minlength=len(rows)).tolist(), strict=True):
        out[i] = pairs[start : start + count]
        start += count
    return out
