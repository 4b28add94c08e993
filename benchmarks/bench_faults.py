"""Fault injection: short jobs over 2 Celery workers while workers are killed or cut off at random.

Each run: a fresh registry (a seeded width-8 ResNet-18 and its feature set), a Redis database
it may flush (job store), a RabbitMQ vhost of its own (broker), the project's default job
settings (6 h time limit, 20 s AMQP heartbeat), 2 real workers and ``--jobs`` regularize jobs
(``--steps`` steps, a checkpoint every 2). Every ``--fault-every`` seconds (jittered) a worker
that is running a job gets a fault:

- ``kill``: SIGKILL of its whole process group (machine lost, OOM-killed container); a
  replacement worker starts at once, as a restart policy would start one;
- ``freeze``: SIGSTOP of its whole process group (cut off: its TCP connections stay open); a
  replacement starts; once the job runs again elsewhere the frozen worker gets SIGCONT and must
  stop its copy without writing (fencing).

Reported: jobs lost (not succeeded; goal 0), duplicate outputs (a second version folder, a
leftover temporary, or two attempts that both succeeded; goal 0), and the time from each fault
to the job running again (a new attempt started; goal at most 120 s), median and max per kind.
Writes ``benchmarks/results/faults.json``.

    .venv/bin/python -m benchmarks.bench_faults [--jobs 20] [--faults 8] [--freeze-share 0.34]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import torch

from benchmarks.common import RESULTS, ROOT, celery_worker_command, load_average, worker_env, write_result
from models.data.datasets import class_slice, ensure_cifar10, image_folder
from models.data.transforms import eval_transform
from models.discovery.discover import discover, make_selection
from models.encoders.resnet import build_encoder
from models.encoders.spec import EncoderSpec, fingerprint
from models.registry.versions import Registry
from models.scoring.feature_set import EncoderRef
from qscore_config.settings import Settings
from worker.backend import CeleryBackend
from worker.params import RegularizeParams, resolve
from worker.store import RedisJobStore


class Worker:
    def __init__(self, env: dict[str, str], work: Path) -> None:
        self.name = f"bench{uuid.uuid4().hex[:6]}"
        self.log = work / f"{self.name}.log"
        self.proc = subprocess.Popen(
            celery_worker_command(self.name, "INFO"),
            cwd=ROOT,
            env=env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def runs(self, attempt: Any) -> bool:
        return str(attempt.worker or "").startswith(f"{self.name}@")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40, help="Training steps per job.")
    parser.add_argument("--faults", type=int, default=8)
    parser.add_argument("--freeze-share", type=float, default=0.34, help="Share of faults that are SIGSTOPs.")
    parser.add_argument("--fault-every", type=float, default=8.0, help="Mean seconds between faults.")
    parser.add_argument(
        "--heartbeat", type=float, default=None, help="QSCORE_BROKER_HEARTBEAT_S; default: the project's."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/7", help="A Redis database it may flush.")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672", help="RabbitMQ, without vhost.")
    parser.add_argument("--out", type=Path, default=None, help="Default: benchmarks/results/faults.json.")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="qscore-bench-faults-"))
    registry, data = _registry(work)
    vhost = f"qscore-bench-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(
        ["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True, capture_output=True
    )
    redis.Redis.from_url(args.redis).flushdb()
    env = worker_env(
        redis_url=args.redis,
        registry_root=registry.root,
        datasets={"bench": str(data)},
        device="cpu",
        checkpoint_dir=work / "checkpoints",
        extra={"QSCORE_BROKER_URL": f"{args.amqp}/{vhost}"},
    )
    if args.heartbeat is not None:
        env["QSCORE_BROKER_HEARTBEAT_S"] = str(args.heartbeat)
    values: dict[str, Any] = {k.removeprefix("QSCORE_").lower(): v for k, v in env.items() if k.startswith("QSCORE_")}
    values["datasets"] = json.loads(values["datasets"])
    settings = Settings(**values)
    store = RedisJobStore(args.redis)
    workers = [Worker(env, work), Worker(env, work)]
    frozen: list[tuple[Worker, str, int]] = []
    faults: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        time.sleep(5)
        ids = [_submit(settings, store, args.steps) for _ in range(args.jobs)]
        pending_faults = [("freeze" if rng.random() < args.freeze_share else "kill") for _ in range(args.faults)]
        next_fault = time.monotonic() + rng.uniform(0.5, 1.5) * args.fault_every
        watching: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60 * 30
        while time.monotonic() < deadline:
            records = {job_id: store.get(job_id) for job_id in ids}
            now = time.monotonic()
            for fault in watching[:]:
                record = records[fault["job"]]
                if record.attempts > fault["attempts_before"]:
                    fault["seconds_to_running_again"] = round(now - fault["t"], 2)
                    watching.remove(fault)
                    print(json.dumps(fault), flush=True)
                elif record.state != "running":
                    fault["seconds_to_running_again"] = None
                    fault["note"] = f"ended {record.state} before running again"
                    watching.remove(fault)
            for worker, job_id, attempts in frozen[:]:
                if records[job_id].attempts > attempts or records[job_id].state != "running":
                    worker.signal(signal.SIGCONT)  # it comes back while the job runs elsewhere
                    frozen.remove((worker, job_id, attempts))
            if pending_faults and now >= next_fault:
                busy = [
                    (w, r)
                    for r in records.values()
                    if r.state == "running" and r.history
                    for w in workers
                    if w.runs(r.history[-1]) and w.proc.poll() is None
                ]
                busy = [(w, r) for w, r in busy if all(w is not f[0] for f in frozen)]
                if busy:
                    worker, record = rng.choice(busy)
                    kind = pending_faults.pop()
                    fault = {
                        "kind": kind,
                        "job": record.id,
                        "attempts_before": record.attempts,
                        "step": record.metrics.get("step"),
                        "t": time.monotonic(),
                    }
                    if kind == "kill":
                        worker.signal(signal.SIGKILL)
                        worker.proc.wait(10)
                    else:
                        worker.signal(signal.SIGSTOP)
                        frozen.append((worker, record.id, record.attempts))
                    faults.append(fault)
                    watching.append(fault)
                    workers.append(Worker(env, work))  # the replacement a restart policy starts
                    next_fault = time.monotonic() + rng.uniform(0.5, 1.5) * args.fault_every
            if all(r.state in ("succeeded", "failed", "cancelled") for r in records.values()) and not watching:
                break
            time.sleep(0.2)
    finally:
        for worker in workers:
            worker.stop()
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True)
    elapsed = time.monotonic() - started
    records = [store.get(job_id) for job_id in ids]
    lost = [r.id for r in records if r.state != "succeeded"]
    duplicates = _duplicates(registry, records)
    result: dict[str, Any] = {
        "benchmark": "fault injection: short regularize jobs over 2 workers, random SIGKILLs and SIGSTOPs",
        "broker": "RabbitMQ (vhost of its own)",
        "job_store": "Redis",
        "settings": {
            "job_time_limit_s": settings.job_time_limit_s,
            "broker_heartbeat_s": settings.broker_heartbeat_s,
            "workers": 2,
            "concurrency": 1,
        },
        "jobs": args.jobs,
        "steps_per_job": args.steps,
        "faults": len(faults),
        "jobs_lost": len(lost),
        "lost_ids": lost,
        "duplicate_outputs": len(duplicates),
        "duplicates": duplicates,
        "attempts": {str(n): sum(1 for r in records if r.attempts == n) for n in sorted({r.attempts for r in records})},
        "superseded_attempts": sum(1 for r in records for a in r.history if a.outcome == "superseded"),
        "seconds_to_running_again": {},
        "fault_log": [{k: v for k, v in f.items() if k != "t"} for f in faults],
        "elapsed_s": round(elapsed, 1),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": load_average(),
        "machine": platform.platform(),
    }
    for kind in ("kill", "freeze"):
        times = [
            f["seconds_to_running_again"]
            for f in faults
            if f["kind"] == kind and f.get("seconds_to_running_again") is not None
        ]
        if times:
            result["seconds_to_running_again"][kind] = {
                "n": len(times),
                "median": round(statistics.median(times), 2),
                "max": round(max(times), 2),
            }
    write_result(args.out or RESULTS / "faults.json", result)
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "jobs",
                    "faults",
                    "jobs_lost",
                    "duplicate_outputs",
                    "attempts",
                    "superseded_attempts",
                    "seconds_to_running_again",
                    "elapsed_s",
                )
            }
        )
    )


def _registry(work: Path) -> tuple[Any, Path]:

    data = class_slice(ensure_cifar10() / "train", work / "train", per_class=30, seed=0)
    torch.manual_seed(0)
    spec = EncoderSpec(arch="resnet18", cifar_stem=True, width=8, image_size=32)
    encoder = build_encoder(spec).eval()
    feature_set = discover(
        encoder,
        image_folder(data, eval_transform(spec)),
        dataset_name="bench",
        encoder_ref=EncoderRef(
            fingerprint=fingerprint(encoder.backbone_state_dict()),
            arch="resnet18",
            feature_dim=spec.feature_dim,
            model_version="bench",
        ),
        eps="auto",
        selection=make_selection(),
        sample_size=None,
        batch_size=100,
    )
    registry = Registry(work / "registry")
    registry.add_model(encoder, version="bench")
    registry.add_feature_set(feature_set, version="bench")
    registry.set_active("bench", "bench")
    return registry, data


def _submit(settings: Any, store: Any, steps: int) -> str:
    """Queue a job as ``POST /jobs/regularize`` does (validated, recorded, sent)."""

    params = RegularizeParams.model_validate(
        {
            "dataset": "bench",
            "batch_size": 32,
            "epochs": 20,
            "max_steps": steps,
            "checkpoint_every": 2,
            "discover": {"dataset": "bench", "eps": "auto", "sample_size": 100, "batch_size": 50},
        }
    )
    resolved = resolve(params, settings)
    backend = _submit.__dict__.setdefault("backend", CeleryBackend(settings))
    record = backend.store.create("regularize", resolved.model_dump(mode="json", by_alias=True))
    backend.enqueue(record)
    return str(record.id)


def _duplicates(registry: Any, records: list[Any]) -> list[str]:
    out = []
    for folder in (registry.models_dir, registry.feature_sets_dir):
        out += [f"leftover {p.name}" for p in folder.iterdir() if p.name.startswith(".tmp-")]
    for record in records:
        versions = [
            p.name for f in (registry.models_dir, registry.feature_sets_dir) for p in f.iterdir() if record.id in p.name
        ]
        if len(versions) > 2:
            out.append(f"{record.id}: {versions}")
        if sum(1 for a in record.history if a.outcome == "succeeded") > 1:
            out.append(f"{record.id}: two attempts succeeded")
    return out


if __name__ == "__main__":
    main()
