"""Benchmark (not a test): scoring throughput with typicality on against off (issue 10 goal: >= 0.9x).

The demo encoder and its shipped feature set (a 5,000-vector reference bank, prototypes, pixel
statistics, the risk model) score batches of CIFAR-10 test images through ``Scorer.score_batch``,
what ``/score`` and ``qscore score`` run per batch; "off" is the same feature set without
typicality, bank and risk model, which scores the Q-Score alone (no other signal is computed). Runs alternate on and off (median of ``--repeats`` each), so
load from other processes hits both alike. Writes benchmarks/results/typicality.json.

    .venv/bin/python benchmarks/bench_typicality.py [--images 2048] [--batch-size 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.checkpoints import load_encoder  # noqa: E402
from models.data import ensure_cifar10, eval_transform, image_folder, random_sample  # noqa: E402
from models.features import FeatureSet  # noqa: E402
from models.scoring import Scorer  # noqa: E402

WEIGHTS = ROOT / "models" / "weights"
RESULTS = ROOT / "benchmarks" / "results" / "typicality.json"
GOAL = 0.9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    imported = load_encoder(WEIGHTS / "demo-encoder.safetensors")
    with_typicality = FeatureSet.load(WEIGHTS / "demo-feature-set.json")
    without = FeatureSet.model_validate(
        with_typicality.model_dump() | {"typicality": None, "risk_model": None, "risk_curve": None}
    )
    assert with_typicality.bank is not None and without.bank is None
    dataset = image_folder(ensure_cifar10() / "test", eval_transform(imported.encoder.spec))
    x = torch.stack([dataset[i][0] for i in random_sample(len(dataset), args.images, 0).indices])
    batches = list(torch.split(x, args.batch_size))
    scorers = {
        "on": Scorer(imported.encoder, imported.fingerprint, with_typicality, args.device),
        "off": Scorer(imported.encoder, imported.fingerprint, without, args.device),
    }
    times: dict[str, list[float]] = {"on": [], "off": []}
    for scorer in scorers.values():
        scorer.score_batch(batches[0])  # warm-up
    # Batch by batch, on and off alternate (in alternating order), so that load from other
    # processes on a shared machine falls on both alike.
    # Throughput from the median time per batch: robust to the spikes of a shared machine.
    for repeat in range(args.repeats):
        for i, batch in enumerate(batches):
            order = ("on", "off") if (i + repeat) % 2 == 0 else ("off", "on")
            for name in order:
                start = time.perf_counter()
                scorers[name].score_batch(batch)
                if scorers[name].device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    throughput = {name: args.batch_size / statistics.median(t) for name, t in times.items()}
    ratio = throughput["on"] / throughput["off"]
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads},
        "device": args.device,
        "encoder": "demo SimCLR ResNet-18 width 16 (128 features), 32x32",
        "bank_vectors": with_typicality.bank.size,
        "bank_bytes_float32_cpu": scorers["on"].bank_bytes,
        "images": args.images,
        "batch_size": args.batch_size,
        "images_per_second": throughput,
        "ratio_on_over_off": ratio,
        "goal": f">= {GOAL}",
        "median_seconds_per_batch": {name: statistics.median(t) for name, t in times.items()},
        "mean_seconds_per_batch": {name: statistics.mean(t) for name, t in times.items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))  # noqa: T201


if __name__ == "__main__":
    main()
