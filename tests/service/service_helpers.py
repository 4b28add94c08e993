"""Helpers of the service tests: a two-version registry, a live uvicorn server, metric reading."""

from __future__ import annotations

import copy
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

from models.registry.versions import Registry
from models.scoring.feature_set import FeatureSet
from qscore_config.settings import Settings
from service.app import create_app


def build_registry(root: Path, tiny_model: tuple) -> Registry:
    """Like the shared ``tiny_registry`` fixture (model and feature set 'tiny', active), plus:

    'tiny-b': the tiny encoder with perturbed weights (another fingerprint, other scores) and
    its feature set 'tiny-b' (same indices, rebound to tiny-b's fingerprint).
    """
    encoder, _, feature_set = tiny_model
    registry = Registry(root)
    registry.add_model(encoder, version="tiny")
    fs: FeatureSet = feature_set.model_copy(deep=True)
    fs.encoder.model_version = "tiny"
    registry.add_feature_set(fs, version="tiny")
    registry.set_active("tiny", "tiny")

    other = copy.deepcopy(encoder)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=generator))
    record = registry.add_model(other, version="tiny-b")
    fs_b: FeatureSet = feature_set.model_copy(deep=True)
    fs_b.encoder.fingerprint = record.fingerprint
    fs_b.encoder.model_version = "tiny-b"
    registry.add_feature_set(fs_b, version="tiny-b")
    return registry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """The real app under uvicorn on a free port, in a thread of the test process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return sum_samples(text, name, **labels)


def sum_samples(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def make_settings(root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        registry_root=root,
        max_batch_size=16,
        max_batch_wait_ms=30.0,
        max_queue_images=256,
        max_files=8,
        max_request_bytes=4 * 1024 * 1024,
        max_file_bytes=1024 * 1024,
        decode_threads=2,
        api_key=None,
        auto_switch=False,
    )
    values.update(overrides)
    return Settings(**values)
