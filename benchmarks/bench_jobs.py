"""Job throughput (images/s) with 1 and 2 Celery worker processes, on the CPU or a GPU.

Each run: a fresh registry holding a seeded ResNet-18 (``--width``), a CIFAR-10 train slice, a
dedicated Redis database, N real workers (``celery -A worker.celery_app worker``, one process
each, one torch thread each), one discover job of ``--shards`` shards submitted as the API does;
timed from queueing to ``succeeded``. Writes ``benchmarks/results/jobs.json``.

    .venv/bin/python -m benchmarks.bench_jobs [--images 2000] [--shards 8] [--width 16]
    python -m benchmarks.bench_jobs --device cuda --workers 1 --width 64 --job regularize --out ...

``--job regularize`` times a Q-Score-regularised fine-tuning job (``--steps`` steps, then the
discovery of the new model's features) after a discover job has made the feature set it needs:
the worker's whole training path, on ``--device``.

Worker processes only help when there are cores (or GPUs) for them: the figure for 2 workers
is bounded by the machine's free cores (recorded in the results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import torch

from benchmarks.common import RESULTS, ROOT, celery_worker_command, device_name, load_average, worker_env, write_result
from models.data.datasets import class_slice, ensure_cifar10
from models.encoders.resnet import build_encoder
from models.encoders.spec import EncoderSpec
from models.registry.versions import Registry
from qscore_config.settings import Settings
from worker.backend import CeleryBackend
from worker.params import DiscoverParams, RegularizeParams, resolve

if TYPE_CHECKING:  # annotations only: _run imports the worker's modules when it runs
    from pydantic import BaseModel

    from worker.backend import CeleryBackend

JOB_TIMEOUT_S = 600  # a worker that cannot start leaves the job queued: fail instead of waiting forever


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="Reference images (train slice of CIFAR-10).")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 base width.")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="QSCORE_DEVICE of the workers: cpu, cuda, cuda:N.")
    parser.add_argument("--job", choices=["discover", "regularize"], default="discover")
    parser.add_argument("--steps", type=int, default=20, help="Training steps of a regularize job.")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/6", help="A Redis database it may flush.")
    parser.add_argument("--out", type=Path, default=RESULTS / "jobs.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="qscore-bench-jobs-"))
    data = class_slice(ensure_cifar10() / "train", work / "train", per_class=args.images // 10, seed=0)
    torch.manual_seed(0)
    encoder = build_encoder(EncoderSpec(arch="resnet18", cifar_stem=True, width=args.width, image_size=32))
    runs = []
    for n_workers in args.workers:
        for repeat in range(args.repeats):
            registry = Registry(work / f"registry-{n_workers}-{repeat}")
            registry.add_model(encoder, version="bench")
            redis.Redis.from_url(args.redis).flushdb()
            env = worker_env(
                redis_url=args.redis,
                registry_root=registry.root,
                datasets={"bench": str(data)},
                device=args.device,
                checkpoint_dir=work / "checkpoints",
            )
            seconds, images = _run(env, n_workers, args, work)
            runs.append(
                {
                    "workers": n_workers,
                    "repeat": repeat,
                    "seconds": round(seconds, 2),
                    "images_per_s": round(images / seconds, 1),
                }
            )
            print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for n in args.workers:
        best = min((r for r in runs if r["workers"] == n), key=lambda r: r["seconds"])
        summary[str(n)] = {"best_seconds": best["seconds"], "images_per_s": best["images_per_s"]}
    result = {
        "benchmark": f"{args.job} job throughput over Celery worker processes",
        "job": args.job,
        "steps": args.steps if args.job == "regularize" else None,
        "images": args.images,
        "shards": args.shards,
        "model": f"resnet18 width {args.width}",
        "batch_size": args.batch_size,
        "device": args.device,
        "device_name": device_name(args.device),
        "torch_threads_per_worker": 1,
        "cpu_count": os.cpu_count(),
        "load_average_at_end": load_average(),
        "machine": platform.platform(),
        "runs": runs,
        "summary": summary,
    }
    if "1" in summary and "2" in summary:
        result["speedup_2_vs_1"] = round(summary["1"]["best_seconds"] / summary["2"]["best_seconds"], 2)
    write_result(args.out, result)
    print(json.dumps(result["summary"]), result.get("speedup_2_vs_1"))


def _run(env: dict[str, str], n_workers: int, args: argparse.Namespace, work: Path) -> tuple[float, int]:
    """Seconds from queueing to success of the timed job, and the images it went through."""

    procs = []
    try:
        for i in range(n_workers):
            log = work / f"worker-{n_workers}-{i}-{time.time_ns()}.log"
            procs.append(
                (
                    subprocess.Popen(
                        celery_worker_command(f"bench{i}", "WARNING"),
                        cwd=ROOT,
                        env=env,
                        stdout=open(log, "wb"),
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    ),
                    log,
                )
            )
        time.sleep(8)  # let the workers connect before the clock starts
        settings = Settings(
            redis_url=env["QSCORE_REDIS_URL"],
            registry_root=env["QSCORE_REGISTRY_ROOT"],
            datasets=json.loads(env["QSCORE_DATASETS"]),
            job_checkpoint_dir=env["QSCORE_JOB_CHECKPOINT_DIR"],
        )
        backend = CeleryBackend(settings)
        discover = DiscoverParams(
            dataset="bench", model="bench", sample_size=None, shards=args.shards, eps="auto", batch_size=args.batch_size
        )
        seconds, _ = _time_job(backend, "discover", resolve(discover, settings))
        if args.job == "discover":
            return seconds, args.images
        regularize = RegularizeParams(
            dataset="bench", model="bench", batch_size=args.batch_size, max_steps=args.steps, checkpoint_every=10
        )
        seconds, metrics = _time_job(backend, "regularize", resolve(regularize, settings))
        # The steps it trained (one epoch caps --steps), then the discovery pass over the new model.
        return seconds, int(metrics["steps"]) * args.batch_size + args.images
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            proc.wait(30)


def _time_job(backend: CeleryBackend, kind: str, params: BaseModel) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    record = backend.store.create(kind, params.model_dump(mode="json", by_alias=True))
    backend.enqueue(record)
    while True:
        current = backend.store.get(record.id)
        if current is not None and current.state in ("succeeded", "failed", "cancelled"):
            break
        if time.perf_counter() - started > JOB_TIMEOUT_S:
            raise RuntimeError(f"the {kind} job did not end within {JOB_TIMEOUT_S} s (see the worker logs)")
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    if current.state != "succeeded":
        raise RuntimeError(f"the {kind} job ended {current.state}: {current.error}")
    print(json.dumps({"job": kind, "seconds": round(seconds, 2), "metrics": current.metrics}), flush=True)
    return seconds, current.metrics


if __name__ == "__main__":
    main()
