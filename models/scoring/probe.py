"""The classifier head served beside a feature set: the evaluation's linear probe, or a user's own.

A head maps representations ``h`` (B, r) to class logits (B, C). Its softmax gives three
signals the risk model and the traffic monitor read (:func:`head_signals`): the maximum
probability (``probe_max_softmax``), the entropy (``probe_entropy``) and the gap between the
two largest probabilities (``probe_margin``); and ``/score?predict=true`` returns each image's
predicted class and confidence.

Two kinds, both without pickle:

- :class:`LinearHead`: ``logits = h @ weight.T + bias``, stored as safetensors (``weight`` (C, r),
  ``bias`` (C,), the class names in the file's metadata). The evaluation's scikit-learn probe
  (standardise, then multinomial logistic regression) folds into one such layer exactly.
- :class:`TorchScriptHead`: any scripted module ``h -> logits`` a user registers, with its
  class names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import save_file

from models.storage.atomic import atomic_path

HEAD_FORMAT = "qscore.head/v1"

#: The signals a head adds to the label-free ones (models/scoring/signals.py).
HEAD_SIGNALS = ("probe_max_softmax", "probe_entropy", "probe_margin")


class HeadError(ValueError):
    """A head file that cannot serve: unreadable, wrong shapes, or classes that do not match."""


class HeadInfo(BaseModel):
    """What a feature set records of its head (the weights live beside its JSON)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["linear", "torchscript"]
    classes: list[str] = Field(min_length=2)
    source: str
    top1: float | None = Field(None, ge=0.0, le=1.0, description="Accuracy on the labelled held-out sample.")
    #: A user's own head (registered), which the evaluation keeps instead of training its probe.
    registered: bool = False


def head_path(feature_set_path: str | Path, kind: str) -> Path:
    """Where a feature set's head lives: ``x.json`` -> ``x.head.safetensors`` or ``x.head.pt``."""
    return Path(feature_set_path).with_suffix(".head.safetensors" if kind == "linear" else ".head.pt")


class Head:
    """Logits of a batch of representations, and the class names they index."""

    kind: str
    classes: list[str]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> Head:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        raise NotImplementedError

    def _checked(self, logits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape != (h.shape[0], len(self.classes)):
            raise HeadError(
                f"the head gave logits of shape {tuple(logits.shape)} for {h.shape[0]} representations; "
                f"expected ({h.shape[0]}, {len(self.classes)}) (one per class)"
            )
        return logits.float()


class LinearHead(Head):
    kind = "linear"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, classes: list[str]) -> None:
        if weight.dim() != 2 or bias.shape != (weight.shape[0],):
            raise HeadError(
                f"a linear head needs weight (C, r) and bias (C,), got {tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        if len(classes) != weight.shape[0] or len(set(classes)) != len(classes):
            raise HeadError(f"{weight.shape[0]} rows of weights for {len(classes)} class names (must be unique)")
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise HeadError("the head's weights must be finite")
        self.weight, self.bias, self.classes = weight.float(), bias.float(), list(classes)

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    @classmethod
    def from_sklearn(cls, pipeline: Any, classes: list[str]) -> LinearHead:
        """Fold a fitted ``make_pipeline(StandardScaler(), LogisticRegression())`` into one layer.

        ``W (x - m) / s + b = (W / s) x + (b - W m / s)``: the same decision values, so the same
        softmax (multinomial logistic regression's ``predict_proba`` is the softmax of them).
        """
        scaler, lr = pipeline.named_steps["standardscaler"], pipeline.named_steps["logisticregression"]
        w = lr.coef_ / scaler.scale_
        b = lr.intercept_ - w @ scaler.mean_
        if w.shape[0] == 1:  # binary: scikit-learn keeps one row; softmax of (-d/2, d/2) is sigmoid(d)
            w, b = np.concatenate([-w / 2, w / 2]), np.array([-b[0] / 2, b[0] / 2])
        names = [classes[int(c)] for c in lr.classes_]
        return cls(torch.from_numpy(w).float(), torch.from_numpy(np.asarray(b)).float(), names)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 2 or h.shape[1] != self.dim:
            raise HeadError(f"the head takes (B, {self.dim}) representations, got {tuple(h.shape)}")
        return self._checked(torch.addmm(self.bias, h.float(), self.weight.T), h)

    def to(self, device: torch.device | str) -> LinearHead:
        return LinearHead(self.weight.to(device), self.bias.to(device), self.classes)

    def save(self, path: str | Path) -> None:
        metadata = {"format": HEAD_FORMAT, "classes": json.dumps(self.classes)}
        with atomic_path(path) as tmp:
            save_file({"weight": self.weight.cpu().contiguous(), "bias": self.bias.cpu().contiguous()}, tmp, metadata)
            os.chmod(tmp, 0o644)  # safetensors re-creates the file 0600; the api and workers read it

    @classmethod
    def load(cls, path: str | Path) -> LinearHead:
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as exc:  # safetensors raises its own error types for a bad file
            raise HeadError(f"{path} is not a readable safetensors head: {exc}") from exc
        if metadata.get("format") != HEAD_FORMAT or set(tensors) != {"weight", "bias"}:
            raise HeadError(f"{path} is not a {HEAD_FORMAT} file (tensors 'weight', 'bias' and class names)")
        return cls(tensors["weight"], tensors["bias"], json.loads(metadata["classes"]))


class TorchScriptHead(Head):
    """A user's scripted head: ``module(h) -> logits``, its class names given at registration."""

    kind = "torchscript"

    def __init__(self, module: torch.jit.ScriptModule, classes: list[str]) -> None:
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise HeadError("a head needs at least two unique class names")
        self.module, self.classes = module.eval(), list(classes)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._checked(self.module(h.float()), h)

    def to(self, device: torch.device | str) -> TorchScriptHead:
        return TorchScriptHead(self.module.to(device), self.classes)

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            torch.jit.save(self.module, str(tmp))

    @classmethod
    def load(cls, path: str | Path, classes: list[str]) -> TorchScriptHead:
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # torch.jit raises RuntimeError and others for a bad archive
            raise HeadError(f"{path} is not a TorchScript module: {exc}") from exc
        return cls(module, classes)


def load_head(path: str | Path, info: HeadInfo) -> Head:
    """The head a feature set records, from its file."""
    if info.kind == "linear":
        head: Head = LinearHead.load(path)
        if head.classes != info.classes:
            raise HeadError(f"{path} holds classes {head.classes}; the feature set records {info.classes}")
        return head
    return TorchScriptHead.load(path, info.classes)


def read_head_file(path: str | Path, classes: list[str] | None) -> Head:
    """A user's head file: linear safetensors (class names inside; ``classes``, if given, must match) or TorchScript."""
    path = Path(path)
    if path.suffix == ".safetensors":
        head: Head = LinearHead.load(path)
        if classes is not None and classes != head.classes:
            raise HeadError(f"{path} holds classes {head.classes}, not the {classes} given")
        return head
    if not classes:
        raise HeadError(f"a TorchScript head ({path.name}) needs its class names (--classes a,b,...)")
    return TorchScriptHead.load(path, classes)


def check_head(head: Head, dim: int) -> None:
    """A head must take this encoder's representations and give finite logits, one per class."""
    probe = torch.rand(4, dim, generator=torch.Generator().manual_seed(0))
    try:
        logits = head.logits(probe)
    except HeadError:
        raise
    except Exception as exc:  # a user's module may fail in any way
        raise HeadError(f"the head fails on (4, {dim}) representations: {exc}") from exc
    if not torch.isfinite(logits).all():
        raise HeadError("the head gives non-finite logits")


def head_probabilities(head: Head, h: torch.Tensor) -> np.ndarray:
    """(B, C) float32 softmax of the head's logits, on the host: what COTT transports (scoring/error_estimate.py)."""
    with torch.no_grad():
        return softmax(head.logits(h)).cpu().numpy()


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """(B, C) class probabilities of (B, C) logits, in float32."""
    return torch.softmax(logits.float(), dim=1)


def head_outputs(head: Head, h: torch.Tensor) -> dict[str, np.ndarray]:
    """What a head adds to a batch's signals: :func:`head_signals` and ``probe_prediction`` (class index)."""
    return {name: t.cpu().numpy() for name, t in head_tensors(head.logits(h)).items()}


def head_tensors(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """:func:`head_signals` as (B,) tensors, and ``probe_prediction`` (the class index, int64)."""
    p = softmax(logits)
    top2 = torch.topk(p, 2, dim=1).values
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)
    return {
        "probe_max_softmax": top2[:, 0],
        "probe_entropy": entropy,
        "probe_margin": top2[:, 0] - top2[:, 1],
        "probe_prediction": logits.argmax(dim=1),
    }


def head_signals(logits: torch.Tensor) -> dict[str, np.ndarray]:
    """Softmax confidence signals of (B, C) logits, each (B,): max probability, entropy, margin."""
    out = head_tensors(logits)
    del out["probe_prediction"]
    return {name: t.cpu().numpy() for name, t in out.items()}
