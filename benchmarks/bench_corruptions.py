"""Benchmark (not a test): images per second of every graded corruption at 32x32 on one core, and
how far each severity moves the pixels (mean absolute change, grey levels) on real images.

A seeded sample of CIFAR-10 test images goes through ``corrupt_array`` for every family and
severity; the rate is the sample size over the wall time of that one call (run it pinned to one
core, e.g. ``taskset -c 0``, with ``OMP_NUM_THREADS=1``). Writes benchmarks/results/corruptions.json.

    .venv/bin/python -m benchmarks.bench_corruptions [--images 500]
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

import numpy as np
from PIL import Image

from benchmarks.common import RESULTS, cpu_model, load_average, write_result
from models.data.corruptions import CORRUPTIONS, EXTRA_SHIFTS, FAMILY_GROUP, SEVERITIES, corrupt_array
from models.data.datasets import ensure_cifar10, image_folder, random_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    folder = image_folder(ensure_cifar10() / "test")
    sample = random_sample(len(folder), args.images, seed=0)
    images = np.stack([np.asarray(Image.open(folder.samples[i][0]).convert("RGB")) for i in sample.indices])
    clean = images.astype(np.float32)
    families = {}
    print(f"{'family':16s} {'group':8s} {'img/s min':>9s} | mean |change| at severities 1..5")
    for name in list(CORRUPTIONS) + list(EXTRA_SHIFTS):
        rates, change = [], []
        for severity in SEVERITIES:
            start = time.perf_counter()
            out = corrupt_array(name, images, severity, seed=0)
            rates.append(len(images) / (time.perf_counter() - start))
            change.append(float(np.abs(out.astype(np.float32) - clean).mean()))
        group = FAMILY_GROUP.get(name, "extra")
        families[name] = {"group": group, "images_per_s": [round(r) for r in rates], "mean_abs_change": change}
        print(f"{name:16s} {group:8s} {min(rates):9.0f} | " + " ".join(f"{c:5.1f}" for c in change), flush=True)
    write_result(
        RESULTS / "corruptions.json",
        {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "cpu": cpu_model(),
            "load_average": load_average(),
            "images": f"{args.images} CIFAR-10 test images, 32x32 ({sample.description})",
            "families": families,
        },
    )


if __name__ == "__main__":
    main()
