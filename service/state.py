"""What the service serves: one immutable (encoder, feature set) pair, swapped atomically.

A switch builds the new :class:`ServingState` completely (load, fingerprint check, warm-up)
before one reference is replaced. Every queued image keeps the state it was admitted with, and
the batcher never batches images of different states, so a request is scored by one version
only and nothing fails while a switch happens.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import numpy as np
import torch

from models.encoders.runtime import Runtime
from models.explanation.explain import Explainer
from models.monitoring.monitor import TrafficMonitor
from models.registry.versions import ModelRecord, Registry, RegistryError
from models.scoring.compatibility import FeatureSetMismatch, check_fits
from models.scoring.feature_set import FeatureSet
from models.scoring.scorer import Scorer
from qscore_config.settings import Settings
from service.schemas import FeatureSetInfo, ModelInfo, ServingInfo

log = logging.getLogger(__name__)

#: Reduced precision is used only when scores stay this close to float32 (issue 3, point 2).
PRECISION_TOLERANCE = 1e-3


class VersionNotFound(RegistryError):
    """A model or feature-set version the registry does not hold."""


class PairMismatch(RegistryError):
    """A feature set found on other weights than the model's."""


@dataclass(frozen=True, eq=False)
class ServingState:
    scorer: Scorer
    model: ModelRecord
    feature_set: FeatureSet
    feature_set_version: str
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def model_version(self) -> str:
        return self.model.version

    @property
    def pair(self) -> tuple[str, str]:
        return self.model.version, self.feature_set_version

    @property
    def serving_labels(self) -> tuple[str, str, str]:
        """(fingerprint prefix, device, precision): the labels of ``qscore_serving_info``."""
        return self.model.fingerprint[:16], str(self.scorer.device), self.scorer.precision

    def model_info(self) -> ModelInfo:
        return ModelInfo.of(self.model)

    def feature_set_info(self) -> FeatureSetInfo:
        return FeatureSetInfo.of(self.feature_set_version, self.feature_set)

    @cached_property
    def response_header(self) -> dict[str, Any]:
        """``model`` and ``feature_set`` of every /score answer, built once per served pair."""
        return {
            "model": self.model_info().model_dump(mode="json"),
            "feature_set": self.feature_set_info().model_dump(mode="json"),
        }

    @cached_property
    def explainer(self) -> Explainer:
        """Explanations with this pair (POST /explain), made on first use, in the explain thread."""
        return Explainer(self.scorer)

    def info(self) -> ServingInfo:
        return ServingInfo(
            model=self.model_info(),
            feature_set=self.feature_set_info(),
            loaded_at=self.loaded_at,
            device=str(self.scorer.device),
            precision=self.scorer.precision,
            runtime=self.scorer.engine.name,
            providers=list(self.scorer.engine.providers),
            bank_bytes=self.scorer.bank_bytes,
            signal_graph=self.scorer.signal_graph is not None,
        )


def resolve_pair(registry: Registry, settings: Settings) -> tuple[str, str]:
    """The pair to serve at start-up: configured, else the registry's active one, else the demo."""
    if settings.model_version:
        model = settings.model_version
        if settings.feature_set_version:
            return model, settings.feature_set_version
        record = _record(registry, model)
        fs = registry.latest_feature_set_for(record.fingerprint)
        if fs is None:
            raise VersionNotFound(
                f"no feature set for model {model!r} in the registry: discover one (`qscore discover --model FILE "
                "--data FOLDER --out features.json`, then `qscore import-features --features features.json`, or "
                "POST /jobs/discover)"
            )
        return model, fs
    active = registry.active()
    if active is None:
        registry.seed_demo()
        active = registry.active()
        if active is None:  # models but no active pair: the operator must choose
            raise RegistryError(
                f"the registry {registry.root} holds models but no active pair; set QSCORE_MODEL_VERSION, or "
                "make a pair active (`qscore activate --model VERSION`)"
            )
    return active.model, active.feature_set


def load_state(registry: Registry, model: str, feature_set: str, settings: Settings) -> ServingState:
    """Load, check and warm up a pair (blocking: call it in a thread)."""
    record = _record(registry, model)
    try:
        features = registry.load_feature_set(feature_set)
    except RegistryError as exc:
        raise VersionNotFound(registry.public(exc)) from exc
    try:
        check_fits(features, record.fingerprint, record.spec, model=model, feature_set_version=feature_set)
    except FeatureSetMismatch as exc:
        raise PairMismatch(str(exc)) from exc
    imported = registry.load_model(model)
    runtime = Runtime(settings.runtime, settings.onnxruntime_threads, registry.exports_dir)
    scorer = Scorer(imported.encoder, imported.fingerprint, features, settings.device, settings.precision, runtime)
    if scorer.precision != "float32":
        scorer = _checked_precision(scorer, imported.fingerprint, features)
    _warm_up(scorer)
    return ServingState(scorer=scorer, model=record, feature_set=features, feature_set_version=feature_set)


def _record(registry: Registry, model: str) -> ModelRecord:
    try:
        return registry.model_record(model)
    except RegistryError as exc:
        raise VersionNotFound(registry.public(exc)) from exc


def _probe(scorer: Scorer, n: int = 16) -> torch.Tensor:
    """(n, 3, S, S) seeded random uint8 images at the encoder's size."""
    size = scorer.image_size
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=generator, dtype=torch.uint8)


def _warm_up(scorer: Scorer) -> None:
    scorer.score(_probe(scorer, 2))


def _checked_precision(scorer: Scorer, fingerprint: str, features: FeatureSet) -> Scorer:
    """Keep reduced precision only when Q-Scores stay within PRECISION_TOLERANCE of float32."""
    reference = Scorer(scorer.encoder, fingerprint, features, str(scorer.device), "float32")
    probe = _probe(scorer, 64)
    low = np.array([s.q_score for s in scorer.score(probe)])
    full = np.array([s.q_score for s in reference.score(probe)])
    gap = float(np.abs(low - full).max())
    if gap > PRECISION_TOLERANCE:
        log.warning(
            "precision %s moves Q-Scores by up to %.2g (> %g): serving float32 instead",
            scorer.precision,
            gap,
            PRECISION_TOLERANCE,
        )
        return reference
    return scorer


class StateHolder:
    """The one reference to the current :class:`ServingState`, and the lock that serialises switches.

    ``monitor``: the traffic monitor, restarted from an empty window whenever the served pair changes.
    """

    def __init__(self, registry: Registry, settings: Settings, monitor: TrafficMonitor | None = None) -> None:
        self.registry = registry
        self.settings = settings
        self.monitor = monitor
        self.current: ServingState | None = None
        self._lock = asyncio.Lock()

    async def load_initial(self) -> ServingState:
        model, fs = await asyncio.to_thread(resolve_pair, self.registry, self.settings)
        return await self.switch(model, fs)

    async def switch(self, model: str, feature_set: str, persist: bool = False) -> ServingState:
        async with self._lock:
            current = self.current
            if current is not None and current.pair == (model, feature_set):
                new = current
            else:
                new = await asyncio.to_thread(load_state, self.registry, model, feature_set, self.settings)
            if persist:
                await asyncio.to_thread(self.registry.set_active, model, feature_set)
            if new is not current and self.monitor is not None:
                # before the swap: batches of the old pair that finish later are dropped, not mixed in
                self.monitor.activate(new.model_version, new.feature_set_version, new.feature_set)
            self.current = new  # the atomic swap: one reference
            if new is not current:
                log.info("serving model %s with feature set %s", model, feature_set)
            return new

    async def watch(self, poll_seconds: float, follow_all: bool) -> None:
        """Follow the registry's active pair: poll its mtime, switch on change. Every change with
        ``follow_all`` (QSCORE_AUTO_SWITCH); else only a job's that was asked to activate its output
        (``"activate": true``, which promises the switch), not the command line's or another API's."""
        seen = await asyncio.to_thread(self.registry.active_mtime)
        while True:
            await asyncio.sleep(poll_seconds)
            try:
                mtime = await asyncio.to_thread(self.registry.active_mtime)
                if mtime is None or mtime == seen:
                    continue
                seen = mtime
                active = await asyncio.to_thread(self.registry.active)
                if active is not None and (follow_all or active.set_by_a_job):
                    await self.switch(active.model, active.feature_set)
            except asyncio.CancelledError:
                raise
            except Exception:  # keep serving the current pair; the next change is tried again
                log.exception("could not follow the registry's active pair; still serving the old one")
