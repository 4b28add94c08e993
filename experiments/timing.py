"""Time a handful of steps of each expensive stage of a preset, and extrapolate the total.

    python -m experiments.timing --config cpu [--steps 6]

Training images/s, extraction images/s and one linear probe are measured on this machine; the
estimate adds them up the way :mod:`experiments.reproduce` runs them. A rough guide only: the
first steps are slower than steady state, and a busy machine is slower still.
"""

from __future__ import annotations

import argparse
import time

import torch

from experiments.config import PRESETS, get_config
from experiments.reproduce import encoder_spec, load_data
from models.data.datasets import ensure_cifar10, image_folder, subset
from models.data.transforms import eval_transform
from models.encoders.device import resolve_device
from models.encoders.resnet import build_encoder
from models.evaluation.metrics import linear_probe
from models.scoring.representations import extract_representations
from models.training.loop import TrainConfig, train
from models.training.objectives import build_method


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    c = get_config(args.config)
    root = ensure_cifar10()
    data = load_data(c, root)
    spec = encoder_spec(c)
    device = resolve_device(c.device)
    rates = {}
    for m in c.methods:
        method = build_method(m, build_encoder(spec))
        ds = subset(image_folder(root / "train", method.view_transform(spec)), data.pretrain_indices)
        marks: list[float] = []
        cfg = TrainConfig(epochs=1, batch_size=c.batch_size, lr=c.lr, max_steps=args.steps, workers=c.workers)
        train(method, ds, cfg, device=device, on_step=lambda r, p, marks=marks: marks.append(time.perf_counter()))
        # Leave out the first step (start-up, worker spawn).
        rates[m] = c.batch_size * (len(marks) - 1) / (marks[-1] - marks[0])
        print(f"{m}: {rates[m]:.0f} images/s (two views each) over {len(marks) - 1} steps")
    encoder = build_encoder(spec)
    n = min(2048, len(data.test_indices))
    ds = subset(image_folder(root / "test", eval_transform(spec)), data.test_indices[:n])
    start = time.perf_counter()
    h, y = extract_representations(encoder, ds, batch_size=c.eval_batch_size, device=device)
    extract_rate = n / (time.perf_counter() - start)
    print(f"extraction: {extract_rate:.0f} images/s")
    n_train = len(data.probe_indices)
    fake = torch.randn(n_train, spec.feature_dim).relu()
    labels = torch.randint(0, 10, (n_train,))
    start = time.perf_counter()
    linear_probe(
        fake, labels, fake[: len(data.test_indices)], labels[: len(data.test_indices)], max_iter=c.probe_max_iter
    )
    probe_s = time.perf_counter() - start
    print(f"one probe on {n_train} x {spec.feature_dim}: {probe_s:.1f} s (random features: an upper bound)")

    n_pre = (len(data.pretrain_indices) // c.batch_size) * c.batch_size
    train_s = sum(n_pre * (c.pretrain_epochs + 2 * c.reg_epochs) / rates[m] for m in c.methods)
    n_enc = len(c.progress_points) + 3  # snapshots, baseline, regularised, control
    extract_s = len(c.methods) * n_enc * (len(data.probe_indices) + len(data.test_indices)) / extract_rate
    n_probes = n_enc + 1 + len(c.compression_fractions) * (2 + 1 + c.random_seeds)
    probes_s = len(c.methods) * n_probes * probe_s
    total = train_s + extract_s + probes_s
    print(
        f"estimate: training {train_s / 60:.1f} min, extraction {extract_s / 60:.1f} min, "
        f"probes {probes_s / 60:.1f} min, total {total / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
