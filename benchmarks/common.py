"""What the benchmarks share: where results go and how they are written, the facts of the machine
a figure was measured on, timers that wait for the GPU, and the environment and command line of
the processes they start (uvicorn servers, Celery workers).

Only the standard library, torch and ``models.storage`` are imported here: ``bench_service
--raw-only`` must run where nothing but torch, torchvision, numpy and Pillow is installed.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from models.storage.atomic import write_bytes_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# -- results ---------------------------------------------------------------------------------


def write_result(path: Path, result: dict[str, Any]) -> None:
    """``result`` as indented JSON, written whole (a benchmark killed mid-write leaves the old file)."""
    write_bytes_atomic(path, (json.dumps(result, indent=2) + "\n").encode())


# -- the machine -----------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows where there is none."""
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor()


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: how busy the (often shared) machine was."""
    return [round(x, 2) for x in os.getloadavg()]


def device_name(device: str | torch.device) -> str:
    """The GPU's name for a CUDA device, else the CPU's model."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return cpu_model()


# -- timers ----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA calls return before the work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call of ``fn``, its device work included."""
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def seconds_per_call(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    return [seconds_of(fn, device) for _ in range(repeats)]


def rate(fn: Callable[[], object], items_per_call: int, device: torch.device, seconds: float) -> float:
    """Items per second of ``fn()`` over about ``seconds`` (after two warm-up calls)."""
    fn()
    fn()
    sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += items_per_call
    sync(device)
    return n / (time.perf_counter() - start)


# -- processes the benchmarks start ----------------------------------------------------------


def pythonpath() -> str:
    """This checkout first, then whatever the caller had (packages installed beside the image)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def worker_env(
    *,
    redis_url: str,
    registry_root: Path,
    datasets: dict[str, str],
    device: str,
    checkpoint_dir: Path,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a benchmark's Celery workers: one torch thread each, so that N workers
    use N cores and nothing more."""
    return {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": pythonpath(),
        "QSCORE_REDIS_URL": redis_url,
        "QSCORE_REGISTRY_ROOT": str(registry_root),
        "QSCORE_DATASETS": json.dumps(datasets),
        "QSCORE_DEVICE": device,
        "QSCORE_JOB_CHECKPOINT_DIR": str(checkpoint_dir),
        "QSCORE_WORKER_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        **(extra or {}),
    }


def celery_worker_command(name: str, loglevel: str) -> list[str]:
    """One worker process (prefork, concurrency 1) on the ``qscore`` queue, named ``name@host``."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool=prefork",
        "--concurrency=1",
        "--queues=qscore",
        "-n",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
        f"--loglevel={loglevel}",
    ]
