"""Benchmark (not a test): the Q-Score's cost as a share of the encoder's forward pass.

For a batch of 256 images, times (median of several repeats, ``torch.inference_mode``):
- the encoder's forward pass: ResNet-18 with the CIFAR stem at 32x32, ResNet-18 and ResNet-50
  with the ImageNet stem at 224x224;
- the Q-Score of its representations, as the scorer computes it: ``q_score_parts(h, D, eps)``
  with ``D`` half of the features (a band found on the batch itself) and eps = 2.
Goal: the Q-Score costs under 2% of the forward pass. Writes
benchmarks/results/qscore_overhead.json with the machine's description.

    .venv/bin/python -m benchmarks.bench_qscore_overhead [--device cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.common import RESULTS, cpu_model, load_average, seconds_per_call, write_result
from models.encoders.resnet import build_encoder
from models.scoring.dominance import DominanceCounts, select_discriminative
from models.scoring.qscore import q_score_parts

GOAL_SHARE = 0.02
EPS = 2.0
CONFIGS = (
    ("resnet18-cifar-32", {"arch": "resnet18", "cifar_stem": True, "width": 64}, 32),
    ("resnet18-imagenet-224", {"arch": "resnet18", "cifar_stem": False, "width": 64}, 224),
    ("resnet50-imagenet-224", {"arch": "resnet50", "cifar_stem": False}, 224),
)


def machine_info(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cpu_model": cpu_model(),
        "load_average_1_5_15": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def bench_one(name: str, overrides: dict, size: int, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    encoder = build_encoder(**overrides).to(device).eval()
    x = torch.randn(args.batch, 3, size, size, device=device)
    with torch.inference_mode():
        h = encoder(x).float()
        counts = DominanceCounts.of(h, (EPS,)).for_eps(EPS)
        ever = int((counts > 0).sum())
        d = select_discriminative(counts, size=max(1, min(ever, h.shape[1] // 2))).to(device)
        forward = seconds_per_call(lambda: encoder(x), args.repeats, device)
        q_times = seconds_per_call(lambda: q_score_parts(h, d, EPS), args.q_repeats, device, warmup=3)
    fwd, q = statistics.median(forward), statistics.median(q_times)
    row = {
        "config": name,
        "batch": args.batch,
        "image_size": size,
        "feature_dim": int(h.shape[1]),
        "discriminative": int(d.numel()),
        "eps": EPS,
        "forward_s_median": fwd,
        "forward_s_all": forward,
        "qscore_s_median": q,
        "qscore_repeats": args.q_repeats,
        "qscore_share_of_forward": q / fwd,
        "under_goal": q / fwd < GOAL_SHARE,
    }
    print(
        f"{name:24s} forward {fwd * 1e3:10.1f} ms   q-score {q * 1e3:8.3f} ms   share {100 * q / fwd:7.4f}%",
        flush=True,
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="forward passes timed per encoder")
    parser.add_argument("--q-repeats", type=int, default=50, help="Q-Score computations timed per encoder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--only", nargs="*", default=None, help="config names to run (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS / "qscore_overhead.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but no CUDA GPU is available")
    rows = [
        bench_one(name, overrides, size, args, device)
        for name, overrides, size in CONFIGS
        if not args.only or name in args.only
    ]
    result = {
        "benchmark": "qscore_overhead",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "goal": f"Q-Score under {GOAL_SHARE:.0%} of the forward pass",
        "machine": machine_info(device),
        "results": rows,
        "all_under_goal": all(r["under_goal"] for r in rows),
    }
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
