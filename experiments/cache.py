"""Stage caching for the reproduction: each stage's output is a file, and a stage whose file
exists is skipped, so a killed run resumes where it stopped. Durations are kept beside them."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from models.storage.atomic import atomic_path, write_json_atomic

log = logging.getLogger("experiments.reproduce")


def clean(obj: Any) -> Any:
    """JSON-safe copy: NaN and infinities become None, numpy scalars and tuples plain types."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, str | bytes):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


class Stages:
    """Run-or-skip for stages whose result is a JSON file or a ``torch.save``d dict of tensors."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.timings_path = work_dir / "timings.json"
        self.timings: dict[str, float] = (
            json.loads(self.timings_path.read_text()) if self.timings_path.is_file() else {}
        )
        self.skipped: list[str] = []
        self.ran: list[str] = []

    def path(self, relative: str) -> Path:
        return self.work_dir / relative

    def done(self, relative: str) -> bool:
        return self.path(relative).is_file()

    def record(self, name: str, seconds: float) -> None:
        self.timings[name] = round(seconds, 2)
        write_json_atomic(self.timings_path, self.timings)

    def skip(self, name: str) -> None:
        log.info("skip %s (cached)", name)
        self.skipped.append(name)

    def run_file(self, name: str, relative: str, fn: Callable[[Path], None]) -> Path:
        """``fn(path)`` writes the stage's file itself (an encoder, a feature set...)."""
        target = self.path(relative)
        if target.is_file():
            self.skip(name)
            return target
        log.info("run %s", name)
        start = time.perf_counter()
        target.parent.mkdir(parents=True, exist_ok=True)
        fn(target)
        if not target.is_file():
            raise RuntimeError(f"stage {name} did not write {target}")
        self.record(name, time.perf_counter() - start)
        self.ran.append(name)
        return target

    def json(self, name: str, relative: str, fn: Callable[[], Any]) -> Any:
        target = self.path(relative)
        if target.is_file():
            self.skip(name)
            return json.loads(target.read_text())
        log.info("run %s", name)
        start = time.perf_counter()
        value = clean(fn())
        write_json_atomic(target, value)
        self.record(name, time.perf_counter() - start)
        self.ran.append(name)
        return value

    def tensors(self, name: str, relative: str, fn: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        target = self.path(relative)
        if target.is_file():
            self.skip(name)
            return torch.load(target, map_location="cpu", weights_only=True)
        log.info("run %s", name)
        start = time.perf_counter()
        value = fn()
        with atomic_path(target) as tmp:
            torch.save(value, tmp)
        self.record(name, time.perf_counter() - start)
        self.ran.append(name)
        return value
