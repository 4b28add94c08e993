"""Give the shipped demo feature set its reference bank, typicality and calibrated risk (issue 10).

    python -m experiments.demo_calibration [--train-samples 5000] [--test-samples 2000]

Discovery is not redone (eps, D, alpha stay as shipped): the demo's own reference sample
(5,000 CIFAR-10 train images, seed 0, as recorded in the feature set) becomes the bank and
calibrates typicality; then the evaluation pipeline trains the linear probe (the head) on
CIFAR-10 train images and fits the risk model and the error estimator on CIFAR-10 test images
and shifted copies of ``--shift-samples`` of them (models/evaluation/shift_fit.py).
Writes ``models/weights/demo-feature-set.json``, ``demo-feature-set.bank.safetensors`` and
``demo-feature-set.head.safetensors``.

    python -m experiments.demo_calibration --image-properties-only

adds only the image properties of the evaluation's held-out test images (the drift test's
reference for the inputs, as ``run_evaluation`` now stores them) to the shipped feature set,
leaving its head, risk model and estimator as they were fitted.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from models.data.datasets import ensure_cifar10, image_folder, random_sample, subset
from models.data.transforms import eval_transform
from models.discovery.discover import with_typicality
from models.encoders.loading import load_encoder
from models.evaluation.linear_eval import DEFAULT_SHIFT_SAMPLES, run_evaluation
from models.monitoring.image_properties import held_out_properties, property_signals
from models.scoring.feature_set import FeatureSet
from models.scoring.representations import extract_with_pixels
from models.scoring.scorer import Scorer

WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-samples", type=int, default=5000)
    parser.add_argument("--test-samples", type=int, default=2000)
    parser.add_argument("--shift-samples", type=int, default=DEFAULT_SHIFT_SAMPLES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-properties-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = ensure_cifar10()
    imported = load_encoder(WEIGHTS / "demo-encoder.safetensors")
    path = WEIGHTS / "demo-feature-set.json"
    fs = FeatureSet.load(path)
    if args.image_properties_only:
        fs = with_held_out_image_properties(fs, imported, root / "test", args.test_samples)
        fs.save(path)
        print(f"{path}: image properties of {args.test_samples} held-out test images")
        return
    train = image_folder(root / "train", eval_transform(imported.encoder.spec))
    sample = random_sample(len(train), fs.data.n_reference, fs.data.seed or 0)
    h, _, pixels = extract_with_pixels(imported.encoder, subset(train, sample.indices), batch_size=250)
    fs = with_typicality(fs, h, pixels)
    report, calibrated = run_evaluation(
        imported.encoder,
        imported.fingerprint,
        fs,
        root / "train",
        root / "test",
        train_samples=args.train_samples,
        test_samples=args.test_samples,
        compression=False,
        shift_samples=args.shift_samples,
    )
    # alpha stays the discovery default (see models/weights/README.md); the head, the risk model
    # and the error estimator are taken.
    fs = calibrated.model_copy(update={"alpha": fs.alpha, "alpha_source": fs.alpha_source})
    fs.save(path)
    summary = {
        "bank_vectors": fs.bank.size if fs.bank else 0,
        "typicality_threshold": fs.typicality.threshold if fs.typicality else None,
        "atypical_share_test": report.get("atypical_share_test"),
        "risk": {k: v for k, v in report["risk"].items() if k not in ("combined", "subsets")}
        | {"combined": {k: v for k, v in report["risk"]["combined"].items() if k != "reliability"}}
        | {"subsets": {k: report["risk"]["subsets"][k] for k in ("clean", "shifted", "gross")}},
        "error_estimate": {k: v for k, v in report["error_estimate"].items() if k != "sets"},
        "top1": report["top1"],
    }
    (WEIGHTS / "demo-risk-evaluation.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(json.dumps(summary, indent=2))


def with_held_out_image_properties(fs: FeatureSet, imported: Any, test_root: Path, samples: int) -> FeatureSet:
    """``fs`` with the image properties of ``run_evaluation``'s held-out sample (seed 0), preprocessed
    as the service takes them."""
    test = image_folder(test_root)
    scorer = Scorer(imported.encoder, imported.fingerprint, fs, "cpu")
    indices = random_sample(len(test), samples, 0).indices
    pixels = [scorer.preprocess(test[i][0].convert("RGB")) for i in indices]
    return fs.model_copy(update={"held_out_image_properties": held_out_properties(property_signals(pixels))})


if __name__ == "__main__":
    main()
