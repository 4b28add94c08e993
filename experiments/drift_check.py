"""How the monitor's drift test behaves with the demo encoder on CIFAR-10 (issue 15, item 4).

    python -m experiments.drift_check [--window 500] [--permutations 500] [--shift-windows 4]

The reference is what the service tests against: the demo feature set's reference bank, whose
5,000 vectors are CIFAR-10 *train* images (discovery's seed-0 sample), of which each test draws
its own seeded sample of 1,000, and whose held-out typicality is that of the 2,000 CIFAR-10 *test*
images the evaluation measured (``experiments/demo_calibration.py``), as are its held-out image
properties. Windows of ``--window`` images, each tested with
:class:`models.monitoring.drift.DriftReference` exactly as the service does (the MMD, the
typicality test and the image property test, Bonferroni):

- clean CIFAR-10 test images, the evaluation's 2,000 left out (the typicality test's reference):
  every disjoint window of a seeded shuffle of the other 8,000, and
  ``--random-windows`` seeded random windows of them (not independent of one another, but each a
  window the service could see: more of them pin the false-alarm rate down better);
- the same disjoint windows against one *fixed* sample of the bank (two seeds): what a fixed
  reference sample would do (its one draw's quirks fall on every window);
- train images outside the bank (same split as the bank, never in it): whether the encoder tells
  the images it was trained on from others shows as the gap between this row and the clean one;
- grayscale, inverted and upside-down copies of test images (models/data/shifts.py), the shifts
  per-image typicality misses (docs/risk.md).

Prints one table row per set: windows, the shares of windows with p < 0.01 (and with the MMD's
own p < 0.01) and p < 0.05, the median and the largest p-value, and the mean atypical share of the
images (what QScoreInputShift reads).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.data.datasets import ensure_cifar10, random_sample
from models.data.shifts import apply_shift
from models.encoders.loading import load_encoder
from models.monitoring.drift import DEFAULT_PERMUTATIONS, DEFAULT_REFERENCE_SIZE, DriftReference
from models.monitoring.image_properties import image_properties
from models.scoring.bank import normalise
from models.scoring.feature_set import FeatureSet
from models.scoring.scorer import Scorer

REPO = Path(__file__).resolve().parent.parent
DEMO_WEIGHTS = REPO / "models" / "weights" / "demo-encoder.safetensors"
DEMO_FEATURES = REPO / "models" / "weights" / "demo-feature-set.json"
SHIFTS = ("grayscale", "invert", "rotate_180")


def _files(folder: Path) -> list[Path]:
    """Image files in ImageFolder's order (classes sorted, then files sorted): discovery's indices."""
    return [f for c in sorted(p for p in folder.iterdir() if p.is_dir()) for f in sorted(c.iterdir())]


Encoded = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def encode(scorer: Scorer, images: list[Image.Image], batch: int = 256) -> Encoded:
    """(n, r) unit-norm representations, (n,) atypical flags, (n,) typicality and (len(PROPERTIES), n)
    image properties of RGB images, as the service makes them."""
    vectors, atypical, typicality, properties = [], [], [], []
    for start in range(0, len(images), batch):
        pixels = [scorer.preprocess(i) for i in images[start : start + batch]]
        inference = scorer.infer(pixels)
        vectors.append(normalise(inference.h).numpy())
        scores = scorer.postprocess(inference, features=False)
        atypical += [bool(s.atypical) for s in scores]
        typicality += [s.typicality for s in scores]
        properties.append(image_properties(pixels))
    return (
        np.concatenate(vectors),
        np.array(atypical),
        np.array(typicality, dtype=np.float64),
        np.concatenate(properties, axis=1),
    )


Window = tuple[np.ndarray, np.ndarray, np.ndarray]  # (representations, typicality, image properties)


def windows(encoded: Encoded, size: int) -> list[Window]:
    vectors, _, typicality, properties = encoded
    starts = range(0, vectors.shape[0] - size + 1, size)
    return [(vectors[s : s + size], typicality[s : s + size], properties[:, s : s + size]) for s in starts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=int, default=500)
    parser.add_argument("--permutations", type=int, default=DEFAULT_PERMUTATIONS)
    parser.add_argument("--reference-size", type=int, default=DEFAULT_REFERENCE_SIZE)
    parser.add_argument("--shift-windows", type=int, default=4, help="windows per shift set")
    parser.add_argument("--train-windows", type=int, default=10, help="windows of train images outside the bank")
    parser.add_argument("--random-windows", type=int, default=200, help="random windows of clean test images")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    root = ensure_cifar10()
    features = FeatureSet.load(DEMO_FEATURES)
    imported = load_encoder(DEMO_WEIGHTS)
    scorer = Scorer(imported.encoder, imported.fingerprint, features, "cpu")
    assert features.bank is not None and features.typicality is not None  # the demo's drift reference
    held_out = features.typicality.held_out
    held_out_properties = features.held_out_image_properties
    reference = DriftReference(
        features.bank.vectors.float().numpy(),
        args.reference_size,
        held_out_typicality=held_out,
        held_out_properties=held_out_properties,
    )

    rng = np.random.default_rng(0)
    test_files = _files(root / "test")
    # the evaluation's held-out test images (run_evaluation's sample) are the typicality test's reference
    evaluated = set(random_sample(len(test_files), len(held_out or ()), 0).indices)
    test_files = [test_files[i] for i in rng.permutation(len(test_files)) if i not in evaluated]
    test_images = [Image.open(p).convert("RGB") for p in test_files]
    train_files = _files(root / "train")
    in_bank = set(random_sample(len(train_files), features.data.n_reference, features.data.seed or 0).indices)
    outside = [i for i in rng.permutation(len(train_files)) if i not in in_bank][: args.train_windows * args.window]
    n_shifted = args.shift_windows * args.window

    clean = encode(scorer, test_images)
    rows: list[tuple[str, str, list[Window], np.ndarray, DriftReference]] = [
        ("clean test", "fresh sample per test", windows(clean, args.window), clean[1], reference)
    ]
    picks = [rng.choice(len(clean[0]), args.window, replace=False) for _ in range(args.random_windows)]
    random_windows = [(clean[0][i], clean[2][i], clean[3][:, i]) for i in picks]
    rows.append(("clean test, random windows", "fresh sample per test", random_windows, clean[1], reference))
    for seed in (0, 1):
        fixed = DriftReference(
            reference.sample(seed),
            args.reference_size,
            held_out_typicality=held_out,
            held_out_properties=held_out_properties,
        )
        rows.append(("clean test", f"one fixed sample (seed {seed})", windows(clean, args.window), clean[1], fixed))
    train = encode(scorer, [Image.open(train_files[i]).convert("RGB") for i in outside])
    rows.append(("train, not in the bank", "fresh sample per test", windows(train, args.window), train[1], reference))
    for name in SHIFTS:
        shifted = encode(scorer, list(apply_shift(name, test_images[:n_shifted])))
        rows.append((name, "fresh sample per test", windows(shifted, args.window), shifted[1], reference))

    print(
        f"demo encoder, window {args.window}, reference {reference.size} of the bank's {features.bank.size} "
        f"train vectors (bandwidth {reference.bandwidth:.3f}), {args.permutations} permutations\n"
    )
    print(
        "| images | reference | windows | share p < 0.01 | ... MMD alone | ... image properties alone "
        "| share p < 0.05 | median p | max p | atypical share |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, kind, tested, atypical, ref in rows:
        # seeds 1, 2, ...: the service seeds each test by its image count, never 0 (the bandwidth's draw)
        results = [
            ref.test(w, args.permutations, seed=i + 1, typicality=t, properties=x) for i, (w, t, x) in enumerate(tested)
        ]
        p = np.array([r.p_value for r in results])
        mmd = np.array([r.mmd_p_value for r in results])
        props = np.array([1.0 if r.property_p_value is None else r.property_p_value for r in results])
        print(
            f"| {name} | {kind} | {len(p)} | {(p < 0.01).mean():.3f} | {(mmd < 0.01).mean():.3f} | "
            f"{(props < 0.01).mean():.3f} | "
            f"{(p < 0.05).mean():.3f} | {np.median(p):.3f} | {p.max():.3f} | {atypical.mean():.3f} |"
        )
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
