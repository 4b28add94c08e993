"""Benchmark of the scoring service (not a test): /score against what the machine allows.

Measured in one run, so that the ratios hold even on a shared machine:
- the raw scorer (encoder + Q-Score on preprocessed uint8 pixels) at batch 1 and at the max batch;
- the bare-framework ceiling (benchmarks/bare_app.py: FastAPI under the same uvicorn, parsing
  the same multipart body and decoding the images with Pillow, no model) at 1 and 8 images a
  request;
- /score at 1, 8 and 32 connections with 1 image a request and at 32 with 8 images a request,
  with p50 and p99 latency and the server's resident memory;
- the raw scorer and /score once per inference engine (``--runtime``, default both: torch, and
  ONNX Runtime on the encoder's ONNX export, QSCORE_RUNTIME=onnxruntime), the bare framework once.
The load comes from ``wrk`` (a C load generator that leaves the CPU to the servers; installed
with apt when missing), one thread, keep-alive connections. Goals (issue 8), as ratios:
- /score at 32 connections >= 0.8 x L, L = 1 / (1/raw + 1/bare): two costs sharing the cores;
- 1 connection: p50 <= the batch-1 forward time + 2 ms.
Goals of issue 18, as ratios of the same run: raw scorer at the max batch with ONNX Runtime >= 1.8x
torch; /score at 32 connections (1 image) with ONNX Runtime >= 1.4x torch's and >= 0.8 x L with L
computed from the faster raw figure.

    python -m benchmarks.bench_service                                   # CPU, demo encoder, both runtimes
    python -m benchmarks.bench_service --runtime onnxruntime             # one runtime only
    python -m benchmarks.bench_service --preset cuda-resnet50            # ResNet-50, 224 px, CUDA
    python -m benchmarks.bench_service --preset cuda-resnet50 --raw-only # torch/torchvision only

``--raw-only`` measures the raw scorer and the decode paths (Pillow on the CPU against batched
``torchvision.io.decode_jpeg`` on the device, and pinned against pageable host-to-device copies)
with nothing but torch, torchvision, numpy and Pillow importable. Results go to
benchmarks/results/ (service.json, service-cuda-resnet50.json, ...-raw.json).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.common import RESULTS, ROOT, load_average, pythonpath, rate, write_result

BOUNDARY = "qscore-bench-boundary"


@dataclass(frozen=True)
class Preset:
    name: str
    device: str
    arch: str
    image_size: int
    max_batch_size: int
    synthetic_images: bool  # True: generated JPEGs (no data set needed), else CIFAR-10 test JPEGs


PRESETS = {
    "cpu-demo": Preset("cpu-demo", "cpu", "demo", 32, 64, False),
    "cuda-resnet50": Preset("cuda-resnet50", "cuda", "resnet50", 224, 64, True),
}


# -- inputs -----------------------------------------------------------------------------------


def synthetic_jpegs(n: int, size: int, seed: int = 0, width: int | None = None) -> list[bytes]:
    """Smooth random pictures with some texture, JPEG quality 90 (about photo-sized files);
    ``size`` x ``size`` pixels, or ``width`` x ``size``."""
    rng = np.random.default_rng(seed)
    width = width or size
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, size), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (size, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def cifar_jpegs(n: int) -> list[bytes]:

    # Lazy: --raw-only runs where only torch, torchvision, numpy and Pillow are installed.
    from models.data.datasets import ensure_cifar10

    files = sorted((ensure_cifar10() / "test").rglob("*.jpg"))
    random.Random(0).shuffle(files)
    return [p.read_bytes() for p in files[:n]]


def input_blobs(preset: Preset, n: int = 256) -> list[bytes]:
    return synthetic_jpegs(n, preset.image_size) if preset.synthetic_images else cifar_jpegs(n)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this preset needs a CUDA device; none is available here")
    return torch.device(name)


# -- raw scorer -------------------------------------------------------------------------------


def raw_scorer_rates(score_batch: Any, inputs: torch.Tensor, device: torch.device, max_batch: int, seconds: float):
    """Images/s of ``score_batch`` at batch 1 and at ``max_batch``; batch-1 time in ms."""
    one = inputs[:1]
    full = inputs[:max_batch]
    at1 = rate(lambda: score_batch(one), 1, device, seconds)
    atmax = rate(lambda: score_batch(full), max_batch, device, seconds)
    return {
        "batch_1_images_per_s": round(at1, 1),
        "batch_1_ms": round(1000 / at1, 3),
        f"batch_{max_batch}_images_per_s": round(atmax, 1),
    }


def best_raw_rates(
    scorer_for: Any, inputs: torch.Tensor, device: torch.device, max_batch: int, seconds: float
) -> dict[str, Any]:
    """:func:`raw_scorer_rates` with torch's default threads and with one fewer, the faster of
    each figure: on a CPU shared with other work, threads that wait on each other at every
    operation can lose 5-30x. ``scorer_for(threads)``: a :class:`Scorer` with that many intra-op
    threads (ONNX Runtime sessions get their count when they are made). Also, per thread count,
    the engine alone at ``max_batch`` (normalised float input): the ceiling the scorer's own
    work (normalisation, Q-Score, typicality, head) takes its share of."""
    default = torch.get_num_threads()
    runs = {}
    for threads in sorted({default, max(1, (os.cpu_count() or 1) - 1)}):
        torch.set_num_threads(threads)
        scorer = scorer_for(threads)
        runs[threads] = raw_scorer_rates(scorer.score, inputs, device, max_batch, seconds)
        x = inputs[:max_batch].to(device).float().div(255)
        with torch.inference_mode():
            engine = rate(functools.partial(scorer.engine, x), max_batch, device, seconds)
        runs[threads][f"engine_only_batch_{max_batch}_images_per_s"] = round(engine, 1)
    torch.set_num_threads(default)
    key = f"batch_{max_batch}_images_per_s"
    best_1 = max(runs.values(), key=lambda r: r["batch_1_images_per_s"])
    best_max = max(runs.values(), key=lambda r: r[key])
    engine_key = f"engine_only_{key}"
    return {
        "batch_1_images_per_s": best_1["batch_1_images_per_s"],
        "batch_1_ms": best_1["batch_1_ms"],
        key: best_max[key],
        engine_key: max(r[engine_key] for r in runs.values()),
        "by_intra_op_threads": runs,
    }


def interleaved_raw_ratio(
    scorers: dict[str, Any], inputs: torch.Tensor, device: torch.device, max_batch: int, rounds: int, seconds: float
) -> dict[str, Any]:
    """ONNX Runtime's raw scorer at ``max_batch`` over torch's, round by round: the two take turns
    (the order alternating), each round gives one ratio, and the median is the figure. Single
    before-and-after rates on a shared 2-core machine drift by 20% between runs, and the ratio
    with them (1.63x to 1.87x on the same machine and code); taken in turns, what else the machine
    does falls on both alike. ``scorers``: a scorer per runtime, with torch's default threads."""
    full = inputs[:max_batch]
    ratios, rates = [], {"torch": [], "onnxruntime": []}
    for r in range(rounds):
        order = ("torch", "onnxruntime") if r % 2 == 0 else ("onnxruntime", "torch")
        got = {kind: rate(lambda k=kind: scorers[k].score(full), max_batch, device, seconds) for kind in order}
        for kind, value in got.items():
            rates[kind].append(round(value, 1))
        ratios.append(got["onnxruntime"] / got["torch"])
    return {
        "median": round(statistics.median(ratios), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
        "rounds": rounds,
        "seconds_each": seconds,
        "images_per_s": rates,
    }


def torch_only_resnet50(device: torch.device, image_size: int):
    """A random ResNet-50 (torchvision, nothing downloaded) and a Q-Score on 120 random features:
    the same computation as models.scoring.scorer.Scorer, importable with torch and torchvision alone."""
    # Lazy: --raw-only runs where only torch, torchvision, numpy and Pillow are installed.
    import torchvision

    from models.scoring.qscore import discriminative_mask, q_score_parts

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    net.fc = torch.nn.Identity()
    net = net.to(device).eval()
    mask = discriminative_mask(torch.randperm(2048)[:120].tolist(), 2048).to(device)

    mean = torch.tensor((0.485, 0.456, 0.406), device=device).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=device).view(1, 3, 1, 1)

    def score_batch(batch: torch.Tensor) -> list[float]:
        """(B, 3, S, S) uint8 pixels, as ``Scorer.score`` takes them."""
        with torch.inference_mode():
            x = batch.to(device, non_blocking=True).float().div_(255).sub_(mean).div_(std)
            h = net(x).float()
            return q_score_parts(h, mask, 2.0).q_score.cpu().tolist()

    return score_batch


def decode_rates(blobs: list[bytes], preset: Preset, device: torch.device, seconds: float) -> dict[str, Any]:
    """Images/s of the decode-and-preprocess paths, batch = max batch size."""
    # Lazy: --raw-only runs where only torch, torchvision, numpy and Pillow are installed.
    from torchvision import transforms

    from service.device_decode import decode_jpegs

    size, b = preset.image_size, preset.max_batch_size
    batch = [blobs[i % len(blobs)] for i in range(b)]
    geometry = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])

    def pillow() -> torch.Tensor:
        """uint8 pixels, as ``Scorer.preprocess`` makes them (the scorer normalises on the device)."""
        return torch.stack([geometry(Image.open(io.BytesIO(x)).convert("RGB")) for x in batch])

    out: dict[str, Any] = {"batch": b, "pillow_cpu_one_thread_images_per_s": round(rate(pillow, b, device, seconds), 1)}
    host = pillow()
    out["host_to_device_pageable_images_per_s"] = round(
        rate(lambda: host.to(device, non_blocking=True), b, device, seconds), 1
    )
    if device.type == "cuda":
        pinned = host.pin_memory()
        out["host_to_device_pinned_images_per_s"] = round(
            rate(lambda: pinned.to(device, non_blocking=True), b, device, seconds), 1
        )
    out["decode_jpeg_on_device_images_per_s"] = round(
        rate(lambda: decode_jpegs(batch, device, size), b, device, seconds), 1
    )
    gap = (decode_jpegs(batch, device, size).cpu().int() - host.int()).abs().float()
    # In uint8 steps (1/255) since the device decoder gives pixels, not normalised inputs.
    out["device_minus_pillow_pixel_max_abs"] = round(float(gap.max()), 4)
    out["device_minus_pillow_pixel_mean_abs"] = round(float(gap.mean()), 5)
    return out


def run_raw_only(preset: Preset, seconds: float) -> dict[str, Any]:
    # Lazy: --raw-only runs where only torch, torchvision, numpy and Pillow are installed.
    from service.device_decode import decode_jpegs

    device = resolve_device(preset.device)
    blobs = input_blobs(preset, 128)
    if preset.arch == "resnet50":
        score_batch = torch_only_resnet50(device, preset.image_size)
    else:
        score_batch = demo_scorer(preset).score
    size = preset.image_size
    inputs = torch.randint(0, 256, (preset.max_batch_size, 3, size, size), dtype=torch.uint8)
    result: dict[str, Any] = {
        "raw_scorer": raw_scorer_rates(score_batch, inputs, device, preset.max_batch_size, seconds),
        "decode": decode_rates(blobs, preset, device, seconds),
    }
    if preset.synthetic_images:  # photos as they come: larger than the input, resized on the way
        large = synthetic_jpegs(64, 375, seed=1, width=500)
        result["decode_500x375_jpegs"] = decode_rates(large, preset, device, seconds)
        b = preset.max_batch_size
        batch = [large[i % len(large)] for i in range(b)]
        size = preset.image_size
        result["device_decode_and_score_500x375_images_per_s"] = round(
            rate(lambda: score_batch(decode_jpegs(batch, device, size)), b, device, seconds), 1
        )
    return result


# -- full mode: servers under wrk -------------------------------------------------------------


def demo_scorer(preset: Preset):
    # Lazy: --raw-only runs where only torch, torchvision, numpy and Pillow are installed.
    from models.registry.versions import Registry
    from models.scoring.scorer import Scorer

    registry = Registry(Path(tempfile.mkdtemp()) / "registry")
    registry.seed_demo()
    active = registry.active()
    imported = registry.load_model(active.model)
    return Scorer(imported.encoder, imported.fingerprint, registry.load_feature_set(active.feature_set), preset.device)


def build_registry(root: Path, preset: Preset, blobs: list[bytes]):
    """The demo pair, or a random-initialised ResNet-50 registered with features found on ``blobs``."""
    # Lazy: --raw-only runs where only torch, torchvision, numpy and Pillow are installed.
    from models.registry.versions import Registry

    registry = Registry(root)
    if preset.arch == "demo":
        registry.seed_demo()
        return registry, "demo encoder (models/weights)"
    from models.data.datasets import image_folder
    from models.data.transforms import eval_transform
    from models.discovery.discover import discover, make_selection
    from models.encoders.resnet import build_encoder
    from models.encoders.spec import EncoderSpec, fingerprint
    from models.scoring.feature_set import EncoderRef

    torch.manual_seed(0)
    spec = EncoderSpec(
        arch="resnet50",
        cifar_stem=False,
        image_size=preset.image_size,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    encoder = build_encoder(spec).eval()
    folder = root.parent / "reference" / "x"
    folder.mkdir(parents=True)
    for i, blob in enumerate(blobs):
        (folder / f"{i}.jpg").write_bytes(blob)
    fs = discover(
        encoder,
        image_folder(folder.parent, eval_transform(spec)),
        dataset_name="synthetic",
        encoder_ref=EncoderRef(
            fingerprint=fingerprint(encoder.backbone_state_dict()), arch="resnet50", feature_dim=spec.feature_dim
        ),
        eps="auto",
        selection=make_selection(),
        sample_size=len(blobs),
        batch_size=64,
        device=preset.device,
    )
    registry.add_model(encoder, version="bench-resnet50")
    fs.encoder.model_version = "bench-resnet50"
    registry.add_feature_set(fs, version="bench-resnet50")
    registry.set_active("bench-resnet50", "bench-resnet50")
    return registry, "random-initialised torchvision ResNet-50, 224 px, features discovered on synthetic JPEGs"


def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path is None and os.geteuid() == 0:
        subprocess.run(
            "apt-get install -y -qq wrk || (apt-get update -qq && apt-get install -y -qq wrk)",
            shell=True,
            check=False,
            capture_output=True,
        )
        path = shutil.which("wrk")
    if path is None:
        raise SystemExit("wrk is needed (Debian/Ubuntu: apt-get install wrk)")
    return path


WRK_SCRIPT = """
local bodies = {}
local n = 0
for line in io.lines(os.getenv("QSCORE_BENCH_BODIES")) do
  local f = assert(io.open(line, "rb"))
  n = n + 1
  bodies[n] = f:read("*all")
  f:close()
end
local i = 0
local headers = {["Content-Type"] = "multipart/form-data; boundary=@BOUNDARY@"}
request = function()
  i = i % n + 1
  return wrk.format("POST", os.getenv("QSCORE_BENCH_PATH"), headers, bodies[i])
end
done = function(summary, latency, requests)
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "non_2xx": %d, "errors": %d, "timeouts": %d, ' ..
    '"p50_us": %d, "p99_us": %d, "mean_us": %.1f}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
""".replace("@BOUNDARY@", BOUNDARY)


def write_bodies(folder: Path, blobs: list[bytes], per_request: int, n_bodies: int = 32) -> Path:
    listing = folder / f"bodies-{per_request}.txt"
    paths = []
    for b in range(n_bodies):
        parts = []
        for k in range(per_request):
            blob = blobs[(b * per_request + k) % len(blobs)]
            parts.append(
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{b}-{k}.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n".encode()
                + blob
                + b"\r\n"
            )
        path = folder / f"body-{per_request}-{b}.bin"
        path.write_bytes(b"".join(parts) + f"--{BOUNDARY}--\r\n".encode())
        paths.append(str(path))
    listing.write_text("\n".join(paths) + "\n")
    return listing


def wrk_run(
    wrk: str,
    script: Path,
    url: str,
    bodies: Path,
    connections: int,
    seconds: float,
    per_request: int,
    path: str = "/score",
) -> dict[str, Any]:
    env = {**os.environ, "QSCORE_BENCH_BODIES": str(bodies), "QSCORE_BENCH_PATH": path}
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "30s", "-s", str(script), url]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    raw = json.loads(line[len("WRK_JSON ") :])
    seconds_run = raw["duration_us"] / 1e6
    return {
        "connections": connections,
        "images_per_request": per_request,
        "requests": raw["requests"],
        "non_2xx": raw["non_2xx"],
        "socket_errors": raw["errors"],
        "timeouts": raw["timeouts"],
        "requests_per_s": round(raw["requests"] / seconds_run, 1),
        "images_per_s": round(raw["requests"] * per_request / seconds_run, 1),
        "p50_ms": round(raw["p50_us"] / 1000, 2),
        "p99_ms": round(raw["p99_us"] / 1000, 2),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A uvicorn process (httptools and uvloop when installed, no access log)."""

    def __init__(self, factory: str, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            factory,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        self.process = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": pythonpath()})

    def wait_ready(self, path: str) -> None:

        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(self.url + path, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"the server {self.url} did not start")
            time.sleep(0.2)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
        return float("nan")

    def metrics(self) -> str:

        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def mean_batch(metrics_text: str) -> float | None:
    total = count = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("qscore_batch_size_sum"):
            total += float(line.split()[-1])
        elif line.startswith("qscore_batch_size_count"):
            count += float(line.split()[-1])
    return round(total / count, 2) if count else None


def run_full(preset: Preset, seconds: float, server_env: dict[str, str], runtimes: list[str]) -> dict[str, Any]:
    # Lazy: --raw-only runs where only torch, torchvision, numpy and Pillow are installed.
    from models.encoders.runtime import Runtime
    from models.scoring.scorer import Scorer

    wrk = ensure_wrk()
    device = resolve_device(preset.device)
    blobs = input_blobs(preset, 256)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        registry, model = build_registry(tmp / "registry", preset, blobs)
        active = registry.active()
        imported = registry.load_model(active.model)
        feature_set = registry.load_feature_set(active.feature_set)

        def scorer_for(kind: str) -> Any:
            def build(threads: int) -> Any:
                # ONNX Runtime: exported once into the registry's cache, as the service does
                runtime = Runtime(kind, threads, registry.exports_dir)  # type: ignore[arg-type]
                return Scorer(imported.encoder, imported.fingerprint, feature_set, preset.device, runtime=runtime)

            scorers: dict[int, Any] = {}

            def scorer(threads: int) -> Any:
                if threads not in scorers:
                    scorers[threads] = build(threads)
                return scorers[threads]

            return scorer

        builders = {kind: scorer_for(kind) for kind in runtimes}
        reference = Scorer(imported.encoder, imported.fingerprint, feature_set, preset.device)
        inputs = torch.stack(
            [
                torch.from_numpy(reference.preprocess(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1)
                for b in blobs[: preset.max_batch_size]
            ]
        )
        raw_before = {}
        for kind in runtimes:
            raw_before[kind] = best_raw_rates(builders[kind], inputs, device, preset.max_batch_size, seconds / 2)
            print(f"raw scorer ({kind}):", raw_before[kind], flush=True)
        script = tmp / "score.lua"
        script.write_text(WRK_SCRIPT)
        bodies = {k: write_bodies(tmp, blobs, k) for k in (1, 8)}

        bare = Server("benchmarks.bare_app:create_app", {})
        try:
            bare.wait_ready("/docs")
            wrk_run(wrk, script, bare.url, bodies[1], 8, 2, 1)  # warm-up
            bare_runs = [
                wrk_run(wrk, script, bare.url, bodies[k], c, seconds, k) for c, k in ((1, 1), (32, 1), (32, 8))
            ]
        finally:
            bare.stop()
        for r in bare_runs:
            print("bare:", r, flush=True)

        served = {}
        for kind in runtimes:
            env = {
                "QSCORE_REGISTRY_ROOT": str(registry.root),
                "QSCORE_DEVICE": preset.device,
                "QSCORE_MAX_BATCH_SIZE": str(preset.max_batch_size),
                "QSCORE_RUNTIME": kind,
                "PYTHONWARNINGS": "ignore",
                **server_env,
            }
            served[kind] = serve_and_measure(wrk, script, bodies, env, seconds, kind)
        # The CPU may be shared with other work: measure the scorer again, keep the faster run.
        raw_after = {}
        for kind in runtimes:
            raw_after[kind] = best_raw_rates(builders[kind], inputs, device, preset.max_batch_size, seconds / 2)
            print(f"raw scorer again ({kind}):", raw_after[kind], flush=True)
        interleaved = None
        if {"torch", "onnxruntime"} <= set(runtimes):
            threads = torch.get_num_threads()
            scorers = {kind: builders[kind](threads) for kind in ("torch", "onnxruntime")}
            interleaved = interleaved_raw_ratio(scorers, inputs, device, preset.max_batch_size, 8, seconds / 4)
            print("raw scorer, ONNX Runtime over torch, interleaved:", interleaved, flush=True)
        del reference, builders

    max_key = f"batch_{preset.max_batch_size}_images_per_s"
    raws = {}
    for kind in runtimes:
        best_1 = max(raw_before[kind], raw_after[kind], key=lambda r: r["batch_1_images_per_s"])
        raws[kind] = {
            "batch_1_images_per_s": best_1["batch_1_images_per_s"],
            "batch_1_ms": best_1["batch_1_ms"],
            max_key: max(raw_before[kind][max_key], raw_after[kind][max_key]),
            f"engine_only_{max_key}": max(r[f"engine_only_{max_key}"] for r in (raw_before[kind], raw_after[kind])),
        }
    fastest_raw = max(r[max_key] for r in raws.values())

    def ceiling(raw_max: float, bare_images_per_s: float) -> float:
        if raw_max <= 0 or bare_images_per_s <= 0:
            return 0.0
        return 1 / (1 / raw_max + 1 / bare_images_per_s)

    by_runtime = {}
    for kind in runtimes:
        raw, runs = raws[kind], served[kind]["service"]
        l1, l8 = (
            ceiling(raw[max_key], bare_runs[1]["images_per_s"]),
            ceiling(raw[max_key], bare_runs[2]["images_per_s"]),
        )
        score_1, score_32_1, score_32_8 = runs[0], runs[2], runs[3]
        l1_fastest = ceiling(fastest_raw, bare_runs[1]["images_per_s"])
        goals = {
            "L_1_image_images_per_s": round(l1, 1),
            "score_32c_1_image_over_L": ratio(score_32_1["images_per_s"], l1),
            "L_8_images_images_per_s": round(l8, 1),
            "score_32c_8_images_over_L": ratio(score_32_8["images_per_s"], l8),
            "L_1_image_fastest_raw_images_per_s": round(l1_fastest, 1),
            "score_32c_1_image_over_L_fastest_raw": ratio(score_32_1["images_per_s"], l1_fastest),
            "p50_1c_ms": score_1["p50_ms"],
            "batch_1_forward_plus_2_ms": round(raw["batch_1_ms"] + 2, 2),
            "p50_1c_goal_met": score_1["p50_ms"] <= raw["batch_1_ms"] + 2,
            "goal": ">= 0.8 for both ratios; p50 at 1 connection <= batch-1 forward + 2 ms",
        }
        by_runtime[kind] = {
            "raw_scorer": raw,
            "raw_scorer_before_and_after": [raw_before[kind], raw_after[kind]],
            **served[kind],
            "goals": goals,
        }
    result: dict[str, Any] = {"model": model, "bare_framework": bare_runs, "runtimes": by_runtime}
    if {"torch", "onnxruntime"} <= set(runtimes):
        torch_run, ort_run = by_runtime["torch"], by_runtime["onnxruntime"]
        result["onnxruntime_against_torch"] = {
            f"raw_{max_key}_ratio": ratio(ort_run["raw_scorer"][max_key], torch_run["raw_scorer"][max_key]),
            # the figure the goal is read from: the median of 8 rounds in turns (interleaved_raw_ratio)
            f"raw_{max_key}_ratio_interleaved": interleaved,
            f"engine_only_{max_key}_ratio": ratio(
                ort_run["raw_scorer"][f"engine_only_{max_key}"], torch_run["raw_scorer"][f"engine_only_{max_key}"]
            ),
            "raw_batch_1_ratio": ratio(
                ort_run["raw_scorer"]["batch_1_images_per_s"], torch_run["raw_scorer"]["batch_1_images_per_s"]
            ),
            "score_32c_1_image_ratio": ratio(
                ort_run["service"][2]["images_per_s"], torch_run["service"][2]["images_per_s"]
            ),
            "score_32c_8_images_ratio": ratio(
                ort_run["service"][3]["images_per_s"], torch_run["service"][3]["images_per_s"]
            ),
            "score_1c_p50_ms": {
                "torch": torch_run["service"][0]["p50_ms"],
                "onnxruntime": ort_run["service"][0]["p50_ms"],
            },
            "goal": "raw >= 1.8x (the interleaved median); /score 32 connections, 1 image >= 1.4x, and >= 0.8 x L "
            "of the faster raw figure",
        }
    return result


def ratio(a: float, b: float) -> float | None:
    """a / b to 3 decimals; None when b is 0 (nothing answered in a run too short or too loaded)."""
    return round(a / b, 3) if b else None


def serve_and_measure(
    wrk: str, script: Path, bodies: dict[int, Path], env: dict[str, str], seconds: float, label: str
) -> dict[str, Any]:
    """/score at 1, 8, 32 connections (1 image a request) and 32 (8 images), memory and mean batch."""
    service = Server("service.app:create_app", env)
    try:
        service.wait_ready("/readyz")
        wrk_run(wrk, script, service.url, bodies[1], 8, 2, 1)  # warm-up
        rss_before = service.rss_mib()
        runs = []
        for c, k in ((1, 1), (8, 1), (32, 1), (32, 8)):
            runs.append(wrk_run(wrk, script, service.url, bodies[k], c, seconds, k))
            print(f"/score ({label}):", runs[-1], flush=True)
        rss_after = service.rss_mib()
        batch = mean_batch(service.metrics())
    finally:
        service.stop()
    return {"service": runs, "mean_batch_size": batch, "rss_mib": {"before": rss_before, "after": rss_after}}


def machine(preset: Preset) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-demo")
    parser.add_argument("--raw-only", action="store_true", help="Raw scorer and decode paths only (torch alone).")
    parser.add_argument("--seconds", type=float, default=10.0, help="Length of each measurement.")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="QSCORE_X=value",
        help="Extra settings of the /score server, e.g. QSCORE_MAX_BATCH_WAIT_MS=2.",
    )
    parser.add_argument("--device", default=None, help="Override the preset's device (e.g. cpu, to try a preset).")
    parser.add_argument("--out", type=Path, default=None, help="Results file (default: by preset).")
    parser.add_argument(
        "--runtime",
        action="append",
        choices=["torch", "onnxruntime"],
        default=None,
        help="Inference engine to measure (repeat for several; default: torch and onnxruntime, in one run).",
    )
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.device:
        preset = Preset(**{**preset.__dict__, "device": args.device})
    result: dict[str, Any] = {"preset": preset.__dict__, "machine": machine(preset)}
    if args.raw_only:
        result.update(run_raw_only(preset, args.seconds))
        default_name = f"service-{preset.name}-raw.json"
    else:
        server_env = dict(item.split("=", 1) for item in args.server_env)
        result["server_env"] = server_env
        runtimes = args.runtime or ["torch", "onnxruntime"]
        result.update(run_full(preset, args.seconds, server_env, list(dict.fromkeys(runtimes))))
        default_name = "service.json" if preset.name == "cpu-demo" else f"service-{preset.name}.json"
    result["machine"]["loadavg_at_end"] = load_average()
    write_result(args.out or RESULTS / default_name, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
