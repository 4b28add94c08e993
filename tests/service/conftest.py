"""Service fixtures: a registry with two tiny model versions, and a real uvicorn server in a thread."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from service_helpers import LiveServer, build_registry, make_settings

from models.registry.versions import Registry


@pytest.fixture(scope="module")
def service_registry(tmp_path_factory: pytest.TempPathFactory, tiny_model: tuple) -> Registry:
    return build_registry(tmp_path_factory.mktemp("service") / "registry", tiny_model)


@pytest.fixture(scope="module")
def server(service_registry: Registry) -> Iterator[LiveServer]:
    with LiveServer(make_settings(service_registry.root)) as live:
        yield live


@pytest.fixture()
def make_server(tmp_path: Path, tiny_model: tuple) -> Iterator[Callable[..., LiveServer]]:
    """A fresh registry and a server with settings overrides; stopped after the test."""
    started: list[LiveServer] = []

    def make(**overrides: Any) -> LiveServer:
        registry_root = overrides.pop("registry_root", None)
        if registry_root is None:
            registry_root = build_registry(tmp_path / f"registry{len(started)}", tiny_model).root
        live = LiveServer(make_settings(registry_root, **overrides)).__enter__()
        started.append(live)
        return live

    yield make
    for live in started:
        live.__exit__()
