"""Measurement (not a test): what signed representations do to the Q-Score (issue 9, item 5).

ViT pre-logits have no ReLU, so ``h`` has negative entries; the Q-Score (SPEC section 3) was
designed for the non-negative, sparse ``h`` of ResNets. On 1,000 random CIFAR-10 test JPEGs this
compares, per encoder: the share of negative entries of ``h`` and their share of the L1 norm;
coverage per eps and the eps ``auto`` picks; the Q-Score on ``h`` against the Q-Score on the
same ``h`` with negatives set to 0 (same ``D`` and eps), as medians and as a Spearman rank
correlation (how much the negative entries reorder images).

Encoders: the shared CIFAR-10 ResNet-20 TorchScript module (supervised: a stand-in for a strong
encoder, ``../shared/models``), and two random-initialised timm ViTs (no ViT weights can be
downloaded or trained here, so the ViT figures describe the geometry of signed features, not a
trained ViT's ranking quality). Writes benchmarks/results/signed_representations.json.

    .venv/bin/python -m benchmarks.signed_representations [--samples 1000]
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from benchmarks.common import RESULTS, ROOT, write_result
from models.data.datasets import ensure_cifar10, image_folder, random_sample, subset
from models.data.transforms import eval_transform
from models.discovery.discover import discover, make_selection
from models.encoders.loading import load_encoder
from models.encoders.spec import Encoder
from models.encoders.timm_encoder import build_timm_encoder
from models.scoring.feature_set import EncoderRef
from models.scoring.qscore import q_score
from models.scoring.representations import extract_representations

RESNET20 = ROOT.parent / "shared" / "models" / "cifar10-resnet20-supervised.pt"


def measure(encoder: Encoder, fingerprint: str, root: Path, samples: int) -> dict[str, object]:
    dataset = image_folder(root / "test", eval_transform(encoder.spec))
    reference = subset(dataset, random_sample(len(dataset), samples, 0).indices)
    fs = discover(
        encoder,
        reference,
        dataset_name=f"cifar10-test-{samples}",
        encoder_ref=EncoderRef(fingerprint=fingerprint, arch=encoder.spec.arch, feature_dim=encoder.feature_dim),
        eps="auto",
        selection=make_selection(),
        sample_size=None,
        batch_size=200,
    )
    h, _ = extract_representations(encoder, reference, batch_size=200)
    q = q_score(h, fs.discriminative_indices, fs.eps).numpy()
    q_nonneg = q_score(h.clamp(min=0), fs.discriminative_indices, fs.eps).numpy()
    return {
        "arch": encoder.spec.arch,
        "feature_dim": encoder.feature_dim,
        "negative_share": fs.negative_share,
        "negative_l1_share": float(h.clamp(max=0).abs().sum() / h.abs().sum()),
        "coverage_by_eps": fs.coverage_by_eps,
        "auto_eps": fs.eps,
        "coverage": fs.coverage,
        "share_q_zero": float((q == 0).mean()),
        "q_median": float(np.median(q)),
        "q_median_negatives_zeroed": float(np.median(q_nonneg)),
        "spearman_q_vs_negatives_zeroed": float(spearmanr(q, q_nonneg).statistic),
        "signed_warning": fs.signed_warning is not None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = ensure_cifar10()
    results: dict[str, object] = {}
    if RESNET20.is_file():
        r20 = load_encoder(RESNET20, image_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        results["resnet20-torchscript-supervised"] = measure(r20.encoder, r20.fingerprint, root, args.samples)
    for name in ("test_vit", "vit_small_patch16_224"):
        torch.manual_seed(0)
        vit = build_timm_encoder(name, None, source="random initialisation", image_size=32)
        results[f"{name}-random-32px"] = measure(vit, f"random-{name}", root, args.samples)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "samples": args.samples,
        "results": results,
    }
    write_result(RESULTS / "signed_representations.json", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
