"""Benchmark (not a test): the ONNX Runtime scorer with its torch work on one torch thread, against
the same scorer leaving torch's threads as they are, interleaved in one process.

With ONNX Runtime on the CPU the scorer normalises, scores and searches the bank with torch
(``Engine.torch_threads`` = 1, ``models/encoders/runtime.py``); torch's OpenMP threads spin-wait
after each parallel region and take ONNX Runtime's cores. Both scorers share one export and one
ONNX Runtime thread count; rounds alternate which goes first, and the figure is the median of the
per-round ratios (one thread / as set).

    python -m benchmarks.bench_torch_threads [--threads 2] [--rounds 8] [--seconds 3]

Results: ``benchmarks/results/torch-threads.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, cpu_model, load_average, rate, write_result

BATCHES = (1, 64)


def main() -> None:
    from models.encoders.runtime import Runtime
    from models.registry.versions import Registry
    from models.scoring.scorer import Scorer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch's and ONNX Runtime's intra-op threads")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="per scorer, batch size and round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    registry = Registry(Path(tempfile.mkdtemp()) / "registry")
    registry.seed_demo()
    active = registry.active()
    imported = registry.load_model(active.model)
    features = registry.load_feature_set(active.feature_set)
    runtime = Runtime("onnxruntime", args.threads, registry.exports_dir)
    one_thread = Scorer(imported.encoder, imported.fingerprint, features, "cpu", runtime=runtime)
    as_set = Scorer(imported.encoder, imported.fingerprint, features, "cpu", runtime=runtime)
    as_set.engine = dataclasses.replace(as_set.engine, torch_threads=None)
    pixels = torch.randint(
        0, 256, (max(BATCHES), 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    rates: dict[str, dict[int, list[float]]] = {
        "one_thread": {b: [] for b in BATCHES},
        "as_set": {b: [] for b in BATCHES},
    }
    for round_ in range(args.rounds):
        order = [("one_thread", one_thread), ("as_set", as_set)]
        for name, scorer in order if round_ % 2 == 0 else order[::-1]:
            for b in BATCHES:
                x = pixels[:b]
                rates[name][b].append(rate(lambda s=scorer, x=x: s.score(x, features=False), b, cpu, args.seconds))
    result: dict[str, Any] = {
        "machine": {"cpu": cpu_model(), "torch": torch.__version__, "threads": args.threads, "load": load_average()},
        "rounds": args.rounds,
        "seconds": args.seconds,
    }
    for b in BATCHES:
        ratios = [a / c for a, c in zip(rates["one_thread"][b], rates["as_set"][b], strict=True)]
        result[f"batch_{b}"] = {
            "one_thread_images_per_s": round(statistics.median(rates["one_thread"][b]), 1),
            "as_set_images_per_s": round(statistics.median(rates["as_set"][b]), 1),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratios": [round(r, 3) for r in ratios],
            "rounds_faster": sum(r > 1 for r in ratios),
        }
        print(f"batch {b}:", result[f"batch_{b}"], flush=True)
    write_result(RESULTS / "torch-threads.json", result)


if __name__ == "__main__":
    main()
