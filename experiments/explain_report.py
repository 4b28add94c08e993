"""The paper's interpretability claims, measured: writes ``docs/explanations.md`` (issue 16).

    python -m experiments.explain_report [--reference 5000] [--test 1000] [--steps 40] [--out docs]

For the demo SimCLR ResNet-18 (``models/weights``, self-supervised) and the shared *supervised*
TorchScript ResNet-20 (``../shared/models``, trained with labels):

1. **Class purity** (paper figures 1 and 2, "discriminative features correspond to unique
   physical attributes"): the feature atlas (``models/explanation/atlas.py``) over a seeded
   sample of CIFAR-10 train images gives, for every feature dominant at least once, the classes
   of the images it is dominant for. Per group (discriminative, upper tail, lower tail, and
   random features drawn from all of them): the share of the top class (purity), the purity of
   random image sets of the same sizes (chance), and how many classes cover 80% of the images.
2. **Correct against mis-classified** (figures 5 and 6): a linear probe on the reference sample,
   then on test images the decomposition of the Q-Score (``models/explanation/decompose.py``):
   the mean of the dominant discriminative features and the noisy share of the L1 norm, and
   heatmaps of seeded random correct and mis-classified images.
3. **Before and after regularisation** (figure 8), demo only (a TorchScript encoder is not
   fine-tuned): a short Q-Score-regularised SimCLR run on the CPU (``--steps`` steps of 128
   images, lambda 0.1, ``D`` and alpha of the shipped feature set), then the same images' heatmaps
   and the test set's Q-Scores before and after.

Everything is cached under ``experiments/runs/explain/`` (delete it to start over).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision import transforms

from experiments.cache import clean
from models.data.datasets import ensure_cifar10, image_folder, random_sample
from models.data.transforms import eval_transform
from models.discovery.discover import discover, make_selection
from models.encoders.loading import ImportedEncoder, load_encoder, save_encoder
from models.evaluation.metrics import linear_probe, score_power
from models.explanation.atlas import AtlasConfig, chance_purity, compute_atlas, read_atlas, write_atlas
from models.explanation.decompose import decompose
from models.explanation.explain import Explainer
from models.explanation.heatmaps import for_display
from models.explanation.render import display_size, enlarged, overlay
from models.scoring.feature_set import EncoderRef, FeatureSet, Preprocessing
from models.scoring.scorer import Scorer
from models.training.loop import Regularizer, TrainConfig, train
from models.training.objectives import build_method

log = logging.getLogger("experiments.explain_report")

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "experiments" / "runs" / "explain"
SUPERVISED = REPO.parent / "shared" / "models" / "cifar10-resnet20-supervised.pt"
DEMO_WEIGHTS = REPO / "models" / "weights" / "demo-encoder.safetensors"
DEMO_FEATURES = REPO / "models" / "weights" / "demo-feature-set.json"
GROUP_ORDER = ("discriminative", "upper_tail", "lower_tail", "random")
#: Features dominant for fewer images than this are left out of the purity medians (a feature
#: dominant for 1 or 2 images is pure by construction); the table says how many.
MIN_IMAGES = 5


@dataclass
class Subject:
    name: str
    label: str
    imported: ImportedEncoder
    feature_set: FeatureSet | None  # None: discovered here


def subjects(reference: int) -> list[Subject]:
    out = [
        Subject(
            "demo",
            "demo SimCLR ResNet-18 (width 16, self-supervised, models/weights), its shipped feature set",
            load_encoder(DEMO_WEIGHTS),
            FeatureSet.load(DEMO_FEATURES),
        )
    ]
    if SUPERVISED.is_file():
        out.append(
            Subject(
                "resnet20",
                "supervised CIFAR ResNet-20 (TorchScript, ../shared/models, trained WITH labels), features "
                f"discovered here on the same {reference} reference images (eps auto)",
                load_encoder(SUPERVISED, image_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
                None,
            )
        )
    return out


def feature_set_of(subject: Subject, train_dir: Path, reference: int) -> FeatureSet:
    if subject.feature_set is not None:
        return subject.feature_set
    path = RUNS / subject.name / "feature_set.json"
    if path.is_file():
        return FeatureSet.load(path)
    encoder, spec = subject.imported.encoder, subject.imported.encoder.spec
    fs = discover(
        encoder,
        image_folder(train_dir, eval_transform(spec)),
        dataset_name="cifar10/train",
        encoder_ref=EncoderRef(
            fingerprint=subject.imported.fingerprint,
            arch=spec.arch,
            feature_dim=spec.feature_dim,
            preprocessing=Preprocessing.of(spec),
        ),
        eps="auto",
        selection=make_selection(),
        sample_size=reference,
        seed=0,
        typicality=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fs.save(path)
    return fs


# -- 1. class purity -----------------------------------------------------------------------
def purity_table(
    features: dict[str, Any], labels: np.ndarray, n_classes: int, seed: int = 0
) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """Per group: features, median images, median purity, median chance purity, median lift, classes for 80%.

    ``features``: an atlas's entries (``atlas.json``); ``labels``: the classes of its reference sample.
    """
    per_feature: dict[int, dict[str, Any]] = {}
    for key, f in features.items():
        j = int(key)
        if f["n_dominant"] == 0:
            continue
        per_feature[j] = {
            "group": f["group"],
            "n": f["n_dominant"],
            "purity": f["purity"],
            "chance": chance_purity(labels, f["n_dominant"], n_classes, draws=100, seed=seed + j),
            "classes_for_80": f["classes_for_80"],
        }
    d = [j for j, f in per_feature.items() if f["group"] == "discriminative"]
    rng = np.random.default_rng(seed)
    everyone = sorted(per_feature)
    random_pick = sorted(rng.choice(everyone, size=min(len(d), len(everyone)), replace=False).tolist())
    rows = []
    for group in GROUP_ORDER:
        members = random_pick if group == "random" else [j for j in everyone if per_feature[j]["group"] == group]
        kept = [per_feature[j] for j in members if per_feature[j]["n"] >= MIN_IMAGES]
        row: dict[str, Any] = {"group": group, "features": len(members), "kept": len(kept)}
        if kept:
            row.update(
                median_images=float(np.median([k["n"] for k in kept])),
                median_purity=float(np.median([k["purity"] for k in kept])),
                median_chance=float(np.median([k["chance"] for k in kept])),
                median_lift=float(np.median([k["purity"] - k["chance"] for k in kept])),
                above_chance_share=float(np.mean([k["purity"] > k["chance"] + 0.05 for k in kept])),
                median_classes_for_80=float(np.median([k["classes_for_80"] for k in kept])),
            )
        rows.append(row)
    return rows, per_feature


def atlas_figure(atlas_dir: Path, chosen: list[tuple[int, str]], out: Path, title: str) -> None:
    """Contact sheets of the chosen features stacked, each under a caption line (paper figure 2)."""
    sheets = [(Image.open(atlas_dir / "sheets" / f"{j}.png").convert("RGB"), caption) for j, caption in chosen]
    width = max(s.width for s, _ in sheets)
    font = ImageFont.load_default(size=12)
    height = 22 + sum(s.height + 16 for s, _ in sheets)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill="black", font=font)
    y = 22
    for sheet, caption in sheets:
        draw.text((4, y), caption, fill=(40, 40, 120), font=font)
        canvas.paste(sheet, (0, y + 14))
        y += sheet.height + 16
    small_png(canvas, out)


def small_png(picture: Image.Image, out: Path) -> None:
    """A palette PNG (256 colours, no dithering): a third of the RGB file, for docs/figures."""
    picture.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(out, optimize=True)


def save_figure(fig: Any, out: Path, dpi: int = 80) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    plt.close(fig)
    small_png(Image.open(buffer), out)


# -- 2. correct against mis-classified ----------------------------------------------------
def test_images(test_dir: Path, n: int, size: int) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    folder = image_folder(test_dir)
    picked = random_sample(len(folder), n, seed=1).indices
    geometry = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])
    pixels = [np.asarray(geometry(Image.open(folder.samples[i][0]).convert("RGB")), dtype=np.uint8) for i in picked]
    return pixels, np.array([folder.samples[i][1] for i in picked]), folder.classes


def representations(scorer: Scorer, pixels: list[np.ndarray], batch: int = 250) -> torch.Tensor:
    return torch.cat([scorer.infer(pixels[s : s + batch]).h.cpu() for s in range(0, len(pixels), batch)])


def explanation_figure(
    explainer: Explainer,
    pixels: list[np.ndarray],
    cases: list[tuple[int, str]],
    out: Path,
    title: str,
    top: int = 2,
) -> None:
    """One row per image: the image, then the heatmaps of its top features."""
    fig, axes = plt.subplots(len(cases), top + 1, figsize=(1.6 * (top + 1), 1.75 * len(cases)), squeeze=False)
    size = display_size(pixels[0].shape[0])
    for row, (i, caption) in enumerate(cases):
        e = explainer.explain(pixels[i], top)
        axes[row][0].imshow(enlarged(pixels[i], size))
        axes[row][0].set_title(caption, fontsize=6.5)
        for k, (hm, picture) in enumerate(zip(e.heatmaps, e.overlays(size), strict=True), 1):
            axes[row][k].imshow(picture)
            kind = hm.feature.group.replace("_", " ").replace("discriminative", "D")
            axes[row][k].set_title(f"f{hm.feature.index} {kind}\nh={hm.feature.value:.2f}", fontsize=6.5)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)


def correctness(fs: FeatureSet, groups: np.ndarray, h_test: torch.Tensor, correct: np.ndarray) -> dict:
    decs = decompose(h_test, fs.discriminative_indices, groups, fs.eps)
    signals = {
        "q_score": np.array([d.q_score for d in decs]),
        "mean_active": np.array([d.mean_active for d in decs]),
        "noisy_share": np.array([d.noisy_share for d in decs]),
        "n_active": np.array([len(d.active) for d in decs], dtype=float),
    }
    out: dict[str, Any] = {"n": int(correct.size), "accuracy": float(correct.mean())}
    for name, values in signals.items():
        power = score_power(-values if name == "noisy_share" else values, correct)
        out[name] = {
            "median_correct": float(np.median(values[correct])),
            "median_misclassified": float(np.median(values[~correct])),
            "auroc": power["auroc"],  # positive = correct, as the paper; noisy_share negated (low = correct)
        }
    return out


# -- 3. before and after regularisation (demo) ---------------------------------------------
def regularized_demo(fs: FeatureSet, train_dir: Path, steps: int) -> ImportedEncoder:
    path = RUNS / "demo" / f"regularized-{steps}.safetensors"
    if not path.is_file():
        imported = load_encoder(DEMO_WEIGHTS)  # a fresh copy: trained in place
        ssl = build_method("simclr", imported.encoder)
        ssl.train()
        dataset = image_folder(train_dir, ssl.view_transform(imported.encoder.spec))
        regularizer = Regularizer(fs.discriminative_indices, fs.alpha, 0.1, fs.eps)
        started = time.time()
        result = train(
            ssl,
            dataset,
            TrainConfig(epochs=1, batch_size=128, lr=0.03, max_steps=steps, seed=0),
            regularizer=regularizer,
        )
        log.info("regularized the demo for %d steps in %.0f s", result.steps, time.time() - started)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_encoder(imported.encoder, path, {"steps": str(result.steps), "seconds": f"{time.time() - started:.0f}"})
    return load_encoder(path)


def q_summary(fs: FeatureSet, groups: np.ndarray, h: torch.Tensor) -> dict[str, float]:
    decs = decompose(h, fs.discriminative_indices, groups, fs.eps)
    return {
        "median_q": float(np.median([d.q_score for d in decs])),
        "low_quality_share": float(np.mean([d.q_score < fs.alpha for d in decs])),
        "median_noisy_share": float(np.median([d.noisy_share for d in decs])),
        "coverage": float(np.mean([len(d.active) > 0 for d in decs])),
    }


# -- the report ------------------------------------------------------------------------------
def run_subject(subject: Subject, args: argparse.Namespace, root: Path, figures: Path) -> dict[str, Any]:
    started = time.time()
    train_dir, test_dir = root / "train", root / "test"
    fs = feature_set_of(subject, train_dir, args.reference)
    encoder = subject.imported.encoder.eval()
    scorer = Scorer(encoder, subject.imported.fingerprint, fs, device="cpu")
    explainer = Explainer(scorer)
    groups = explainer.groups
    atlas_dir = RUNS / subject.name / f"atlas-{args.reference}"
    reference_file = RUNS / subject.name / f"reference-{args.reference}.pt"
    cached: list[str] = []
    if atlas_dir.is_dir() and reference_file.is_file():
        cached.append("atlas")
    else:
        sample = random_sample(len(image_folder(train_dir)), args.reference, 0)
        atlas = compute_atlas(
            encoder, fs, train_dir, sample.indices, AtlasConfig(top_k=8, tail_sample=encoder.feature_dim, seed=0)
        )
        shutil.rmtree(atlas_dir, ignore_errors=True)
        write_atlas(atlas, atlas_dir)
        torch.save({"h": atlas.h, "labels": torch.from_numpy(atlas.labels)}, reference_file)
    data = read_atlas(atlas_dir)
    reference = torch.load(reference_file, weights_only=True)
    h_ref, y_ref = reference["h"], reference["labels"].numpy()
    rows, per_feature = purity_table(data["features"], y_ref, len(data["classes"]))

    # figure 2: the three purest discriminative features (chosen by purity: the best case, said so),
    # one random discriminative feature, and the most frequent upper-tail feature
    d = [(j, f) for j, f in per_feature.items() if f["group"] == "discriminative" and f["n"] >= MIN_IMAGES]
    purest = sorted(d, key=lambda jf: -(jf[1]["purity"] - jf[1]["chance"]))[:3]
    rng = np.random.default_rng(2)
    plain = d[int(rng.integers(len(d)))]
    upper = sorted([(j, f) for j, f in per_feature.items() if f["group"] == "upper_tail"], key=lambda jf: -jf[1]["n"])[
        :1
    ]
    chosen = [(j, f"purest D feature: {f['purity']:.0%} one class (chance {f['chance']:.0%})") for j, f in purest]
    chosen += [(plain[0], f"a D feature drawn at random: {plain[1]['purity']:.0%} (chance {plain[1]['chance']:.0%})")]
    chosen += [(j, f"most frequent upper-tail feature: {f['purity']:.0%} (chance {f['chance']:.0%})") for j, f in upper]
    fig2 = figures / f"explain-{subject.name}-atlas.png"
    title = f"{subject.name}: the 8 images with the largest h_j where feature j is dominant"
    atlas_figure(atlas_dir, chosen, fig2, title)

    # figures 5/6: a probe on the reference sample, then test images
    pixels, y_test, classes = test_images(test_dir, args.test, encoder.spec.image_size)
    h_test = representations(scorer, pixels)
    probe = linear_probe(h_ref, y_ref, h_test, y_test)
    correct = probe.correct
    stats = correctness(fs, groups, h_test, correct)
    rng = np.random.default_rng(3)
    right = rng.choice(np.flatnonzero(correct), size=4, replace=False)
    wrong = rng.choice(np.flatnonzero(~correct), size=4, replace=False)
    cases = [(int(i), f"correct: {classes[y_test[i]]}") for i in right]
    cases += [(int(i), f"wrong: {classes[y_test[i]]} as {classes[probe.predictions[i]]}") for i in wrong]
    fig5 = figures / f"explain-{subject.name}-correct-wrong.png"
    explanation_figure(explainer, pixels, cases, fig5, f"{subject.name}: seeded random test images, top 2 features")

    result: dict[str, Any] = {
        "label": subject.label,
        "heatmaps": explainer.method,
        "eps": fs.eps,
        "n_discriminative": len(fs.discriminative),
        "feature_dim": encoder.feature_dim,
        "reference": args.reference,
        "purity": rows,
        "figure_features": [j for j, _ in chosen],
        "correctness": stats,
        "probe_top1": float(probe.top1),
        "figures": {"atlas": fig2.name, "correct_wrong": fig5.name},
    }

    if subject.name == "demo" and args.steps > 0:
        if (RUNS / "demo" / f"regularized-{args.steps}.safetensors").is_file():
            cached.append("regularize run")
        tuned = regularized_demo(fs, train_dir, args.steps)
        # the regularizer keeps D and alpha of the original feature set: measure the tuned encoder with them
        tuned_fs = fs.model_copy(deep=True)
        tuned_fs.encoder.fingerprint = tuned.fingerprint
        tuned_explainer = Explainer(Scorer(tuned.encoder.eval(), tuned.fingerprint, tuned_fs, device="cpu"))
        h_after = representations(tuned_explainer.scorer, pixels)
        before, after = q_summary(fs, groups, h_test), q_summary(fs, groups, h_after)
        picks = [int(i) for i in np.random.default_rng(4).choice(len(pixels), size=4, replace=False)]
        fig8 = figures / "explain-demo-regularize.png"
        before_after_figure(explainer, tuned_explainer, pixels, picks, fig8, args.steps)
        result["regularize"] = {
            "steps": args.steps,
            "batch_size": 128,
            "lambda": 0.1,
            "before": before,
            "after": after,
            "figure": fig8.name,
        }
    result["seconds"] = round(time.time() - started, 1)
    result["cached"] = cached
    return result


def before_after_figure(
    before: Explainer, after: Explainer, pixels: list[np.ndarray], picks: list[int], out: Path, steps: int
) -> None:
    """Each image's strongest feature (ranked by the original encoder) before and after (figure 8)."""
    size = display_size(pixels[0].shape[0])
    fig, axes = plt.subplots(len(picks), 3, figsize=(4.8, 1.75 * len(picks)), squeeze=False)
    for row, i in enumerate(picks):
        e0, e1 = before.explain(pixels[i], 1), after.explain(pixels[i], 1)
        j = e0.heatmaps[0].feature.index
        heat = after.maps_of(pixels[i], [j])
        axes[row][0].imshow(enlarged(pixels[i], size))
        axes[row][0].set_title(f"q {e0.score.q_score:.4f} -> {e1.score.q_score:.4f}", fontsize=6.5)
        axes[row][1].imshow(overlay(pixels[i], for_display(e0.heatmaps[0].map, e0.method), size))
        axes[row][1].set_title(f"before: f{j} h={e0.heatmaps[0].feature.value:.2f}", fontsize=6.5)
        axes[row][2].imshow(overlay(pixels[i], for_display(heat.maps[0, 0], heat.method), size))
        axes[row][2].set_title(f"after: f{j} h={float(heat.h[0, j]):.2f}", fontsize=6.5)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"demo, before and after {steps} regularised steps", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out)


def write_markdown(results: dict[str, Any], out: Path, total_s: float) -> None:
    lines = ["# Explanations: what the features look at, measured", ""]
    lines += [
        "Written by `python -m experiments.explain_report` (issue 16). It measures the paper's interpretability "
        "claims on CIFAR-10 with the project's own code: the feature atlas (`models/explanation/atlas.py`, what "
        "`POST /jobs/atlas` runs), the per-image decomposition and heatmaps (`models/explanation/decompose.py`, "
        "`heatmaps.py`: what `POST /explain` returns).",
        f"Run time {total_s:.0f} s on a 2-core CPU shared with other work"
        + (
            "; read from the cache (`experiments/runs/explain/`): "
            + "; ".join(f"{name}: {', '.join(r['cached'])}" for name, r in results.items() if r["cached"])
            if any(r["cached"] for r in results.values())
            else ""
        )
        + ".",
        "",
    ]
    for r in results.values():
        lines += [f"## {r['label']}", ""]
        lines += [
            f"{r['feature_dim']} features, eps {r['eps']:g}, {r['n_discriminative']} discriminative; reference "
            f"{r['reference']} seeded random CIFAR-10 train images; heatmaps: `{r['heatmaps']}`"
            + (
                " (exact: channel j of the last feature map, whose mean is h_j)"
                if r["heatmaps"] == "channel_map"
                else " (gradient x input: the TorchScript module is opaque)"
            )
            + ".",
            "",
            "### Class purity of the images each feature is dominant for",
            "",
            "Purity: share of the most common of 10 classes among the images a feature is dominant for; chance: the "
            "purity of random sets of as many reference images (balanced classes, so 10% for large sets, more for "
            f"small ones); lift = purity - chance. Medians over the features dominant for at least {MIN_IMAGES} "
            "images (kept). 'Random' is as many features as D drawn at random (seeded) from all features dominant "
            "at least once.",
            "",
            "| features | count | kept | median images | median purity | median chance | median lift | "
            "lift > 5 points | classes for 80% |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in r["purity"]:
            if row["kept"]:
                lines.append(
                    f"| {row['group'].replace('_', ' ')} | {row['features']} | {row['kept']} | "
                    f"{row['median_images']:.0f} | {row['median_purity']:.1%} | {row['median_chance']:.1%} | "
                    f"{row['median_lift'] * 100:+.1f} pts | {row['above_chance_share']:.0%} | "
                    f"{row['median_classes_for_80']:.1f} |"
                )
            else:
                lines.append(f"| {row['group'].replace('_', ' ')} | {row['features']} | 0 | | | | | | |")
        lines += ["", f"![atlas](figures/{r['figures']['atlas']})", ""]
        c = r["correctness"]
        lines += [
            "### Correct against mis-classified test images",
            "",
            f"A linear probe on the reference representations, tested on {c['n']} seeded random CIFAR-10 test images: "
            f"top-1 {c['accuracy']:.1%}. AUROC: how well the signal alone separates correct (positive) from "
            "mis-classified images (the noisy share negated: lower is better).",
            "",
            "| signal | median, correct | median, mis-classified | AUROC |",
            "| --- | --- | --- | --- |",
        ]
        for key, text in (
            ("q_score", "Q-Score"),
            ("mean_active", "mean of dominant discriminative features"),
            ("n_active", "number of dominant discriminative features"),
            ("noisy_share", "noisy share of the L1 norm (outside D)"),
        ):
            s = c[key]
            lines.append(f"| {text} | {s['median_correct']:.4g} | {s['median_misclassified']:.4g} | {s['auroc']:.3f} |")
        lines += ["", f"![correct and mis-classified](figures/{r['figures']['correct_wrong']})", ""]
        if "regularize" in r:
            g = r["regularize"]
            b, a = g["before"], g["after"]
            lines += [
                "### Before and after Q-Score regularisation",
                "",
                f"A short run, sized for this CPU: {g['steps']} steps of {g['batch_size']} images (about "
                f"{g['steps'] * g['batch_size'] / 50000:.2f} epochs of CIFAR-10 train; the paper runs 100 epochs), "
                f"SimCLR plus the Q-Score term (lambda {g['lambda']}), D and alpha of the shipped feature set kept. "
                "Measured on the same test images with that D and eps:",
                "",
                "| | median Q-Score | Q < alpha | median noisy share | coverage |",
                "| --- | --- | --- | --- | --- |",
                f"| before | {b['median_q']:.4f} | {b['low_quality_share']:.1%} | {b['median_noisy_share']:.3f} | "
                f"{b['coverage']:.1%} |",
                f"| after | {a['median_q']:.4f} | {a['low_quality_share']:.1%} | {a['median_noisy_share']:.3f} | "
                f"{a['coverage']:.1%} |",
                "",
                f"![before and after](figures/{g['figure']})",
                "",
            ]
    lines += ["## Where the claim holds and where it does not", ""]
    lines += verdicts(results)
    out.write_text("\n".join(lines) + "\n")


def verdicts(results: dict[str, Any]) -> list[str]:
    """The plain reading of the numbers above, per encoder (written from them, not by hand)."""
    out = []
    for name, r in results.items():
        by = {row["group"]: row for row in r["purity"] if row["kept"]}
        d, rnd = by.get("discriminative"), by.get("random")
        if d and rnd:
            gap = d["median_lift"] - rnd["median_lift"]
            reading = (
                "the claim holds: discriminative features are purer than random ones"
                if gap > 0.02
                else "the claim does not hold here: discriminative features are no purer than random ones"
                if gap > -0.02
                else "the claim does not hold here: discriminative features are less pure than random ones"
            )
            tails = ", ".join(
                f"{g.replace('_', ' ')} {by[g]['median_lift'] * 100:+.1f}"
                for g in ("upper_tail", "lower_tail")
                if g in by
            )
            out.append(
                f"- {name}, class purity: median lift over chance {d['median_lift'] * 100:+.1f} points for D against "
                f"{rnd['median_lift'] * 100:+.1f} for random features ({tails}): {reading}. Every group is purer "
                "than chance, so the features do follow classes somewhat; D is not special in it."
            )
        c = r["correctness"]
        noisy, active = c["noisy_share"]["auroc"], c["mean_active"]["auroc"]
        noisy_reading = (
            "mis-classified images do have more noisy mass"
            if noisy > 0.53
            else "correct images have the larger noisy share, the opposite of the claim"
            if noisy < 0.47
            else "no difference in noisy mass"
        )
        active_reading = "weaker" if active > 0.53 else "not weaker"
        out.append(
            f"- {name}, mis-classified images: their dominant discriminative features are {active_reading} "
            f"(median {c['mean_active']['median_misclassified']:.3g} against {c['mean_active']['median_correct']:.3g}, "
            f"AUROC {active:.3f}); noisy share {c['noisy_share']['median_misclassified']:.3f} against "
            f"{c['noisy_share']['median_correct']:.3f} (AUROC {noisy:.3f}): {noisy_reading}."
        )
        if "regularize" in r:
            g = r["regularize"]
            out.append(
                f"- {name}, regularisation ({g['steps']} steps of {g['batch_size']} only): median Q-Score "
                f"{g['before']['median_q']:.4f} -> {g['after']['median_q']:.4f}, Q < alpha "
                f"{g['before']['low_quality_share']:.1%} -> {g['after']['low_quality_share']:.1%}, noisy share "
                f"{g['before']['median_noisy_share']:.3f} -> {g['after']['median_noisy_share']:.3f}; see the "
                "heatmaps above. A run this short says nothing about the paper's 100 epochs: it shows the pipeline, "
                "not the effect."
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=int, default=5000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=40, help="regularize steps (batches of 128) on the demo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    matplotlib.use("Agg")
    torch.set_num_threads(args.threads)
    root = ensure_cifar10()
    figures = args.out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {}
    for subject in subjects(args.reference):
        log.info("subject %s", subject.name)
        results[subject.name] = run_subject(subject, args, root, figures)
    (args.out / "explanations.json").write_text(json.dumps(clean(results), indent=1) + "\n")
    write_markdown(results, args.out / "explanations.md", time.time() - started)
    log.info("wrote %s in %.0f s", args.out / "explanations.md", time.time() - started)


if __name__ == "__main__":
    main()
