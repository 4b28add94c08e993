"""The paper's figures, redrawn from the reproduction's cached results (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: the backend is chosen before pyplot is imported
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from experiments.baselines import SCORE_NAMES
from experiments.config import Config
from models.scoring.qscore import dominant_mask

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
LABELS = {"simclr": "SimCLR", "byol": "BYOL"}

#: Every figure the pipeline writes (file stem -> paper figure), checked by the test.
FIGURES: dict[str, str] = {
    "fig1_representations": "fig. 1",
    "fig2_class_distribution": "fig. 2",
    "fig3_dominance_counts": "fig. 3",
    "fig4_compression": "figs. 4 and A.2",
    "fig5_correct_vs_misclassified": "fig. 5",
    "fig7_pr_roc": "fig. 7",
    "figA3_q_histograms": "fig. A.3",
    "figA4_components": "fig. A.4",
    "figA6_sparsity": "fig. A.6",
    "fig_scores": "label-free scores compared",
    "fig_eps_sensitivity": "coverage and AUROC against eps",
    "fig_training_progress": "coverage and AUROC against training progress",
}


def _panels(n: int, ncols_per: int = 1, size: tuple[float, float] = (5.0, 3.6)) -> tuple[Any, np.ndarray]:
    fig, axes = plt.subplots(1, n * ncols_per, figsize=(size[0] * n * ncols_per, size[1]), squeeze=False)
    return fig, axes[0]


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_figures(analyses: dict[str, dict[str, Any]], config: Config, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    makers: dict[str, Callable[[dict[str, dict[str, Any]], Config], Any]] = {
        "fig1_representations": fig_representations,
        "fig2_class_distribution": fig_class_distribution,
        "fig3_dominance_counts": fig_dominance_counts,
        "fig4_compression": fig_compression,
        "fig5_correct_vs_misclassified": fig_correct_vs_misclassified,
        "fig7_pr_roc": lambda a, c: fig_curves(a, ["q_score"], "Q-Score predicting correct classification"),
        "figA3_q_histograms": fig_q_histograms,
        "figA4_components": lambda a, c: fig_curves(
            a, ["mean_discriminative", "inverse_l1", "q_score"], "Q-Score components alone"
        ),
        "figA6_sparsity": fig_sparsity,
        "fig_scores": fig_scores,
        "fig_eps_sensitivity": fig_eps_sensitivity,
        "fig_training_progress": fig_training_progress,
    }
    assert set(makers) == set(FIGURES)
    return [_save(maker(analyses, config), out / f"{name}.png") for name, maker in makers.items()]


def _sorted_order(counts: np.ndarray) -> np.ndarray:
    return np.argsort(counts, kind="stable")


def fig_representations(analyses: dict[str, dict[str, Any]], config: Config) -> Any:
    """Fig. 1: the representations of random test samples, one row each."""
    fig, axes = _panels(len(analyses), size=(6.5, 4.0))
    rng = np.random.default_rng(config.seed)
    for ax, (m, a) in zip(axes, analyses.items(), strict=True):
        h = a["reps"]["test_h"].numpy()
        rows = rng.choice(len(h), size=min(config.heatmap_rows, len(h)), replace=False)
        im = ax.imshow(h[rows], aspect="auto", cmap="Greys", interpolation="nearest")
        ax.set(title=f"{LABELS[m]}: {len(rows)} random test samples", xlabel="feature", ylabel="sample")
        fig.colorbar(im, ax=ax, fraction=0.04)
    return fig


def fig_class_distribution(analyses: dict[str, dict[str, Any]], config: Config) -> Any:
    """Fig. 2: share of each class's test samples for which a feature is dominant.

    Features picked without labels: the four discriminative features dominant most often on the
    reference set, and the most often dominant feature overall (an upper-tail one, like the
    paper's feature 175).
    """
    fig, axes = plt.subplots(len(analyses), 5, figsize=(17, 3.2 * len(analyses)), squeeze=False)
    for row, (m, a) in zip(axes, analyses.items(), strict=True):
        fs = a["features"]
        counts = np.asarray(fs.counts)
        disc = np.asarray(fs.discriminative, dtype=int)
        picks = list(disc[np.argsort(-counts[disc], kind="stable")][:4]) if disc.size else []
        top = int(np.argmax(counts))
        picks = [(int(j), "discriminative") for j in picks] + [(top, "highest count")]
        dominant = dominant_mask(a["reps"]["test_h"], fs.eps).numpy()
        y = a["reps"]["test_y"].numpy()
        for ax, (j, kind) in zip(row, picks + [(None, "")] * (5 - len(picks)), strict=False):
            if j is None:
                ax.axis("off")
                continue
            share = [100 * dominant[y == c, j].mean() if (y == c).any() else 0 for c in range(len(CLASSES))]
            ax.bar(
                range(len(CLASSES)),
                share,
                color="tab:blue" if kind == "discriminative" else "tab:gray",
            )
            ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=60, fontsize=7)
            ax.set(title=f"{LABELS[m]} feature {j} ({kind})", ylabel="% of class dominant")
    return fig


def fig_dominance_counts(analyses: dict[str, dict[str, Any]], config: Config) -> Any:
    """Fig. 3: dominance counts sorted ascending, with the discriminative band shaded."""
    fig, axes = _panels(len(analyses))
    for ax, (m, a) in zip(axes, analyses.items(), strict=True):
        fs = a["features"]
        counts = np.asarray(fs.counts)
        order = _sorted_order(counts)
        ax.plot(np.arange(len(counts)), counts[order], color="black", lw=1.2)
        positions = np.flatnonzero(np.isin(order, fs.discriminative))
        if positions.size:
            ax.axvspan(
                positions.min(),
                positions.max(),
                color="tab:green",
                alpha=0.2,
                label=f"discriminative band ({positions.size} features)",
            )
            for x in (positions.min(), positions.max()):
                ax.axvline(x, color="black", ls=":", lw=1)
        ax.set(
            title=f"{LABELS[m]}: eps = {fs.eps:g}, {fs.data.n_reference} reference samples",
            xlabel="feature (sorted by count)",
            ylabel="samples where dominant",
        )
        ax.legend(fontsize=8, loc="upper left")
    return fig


def fig_compression(analyses: dict[str, dict[str, Any]], config: Config) -> Any:
    """Figs. 4 and A.2: linear top-1 against the number of features kept."""
    fig, axes = _panels(len(analyses))
    styles = {
        "discriminative": ("tab:green", "o"),
        "lower_tail": ("tab:red", "v"),
        "upper_tail": ("tab:purple", "^"),
    }
    for ax, (m, a) in zip(axes, analyses.items(), strict=True):
        points = a["compression"]
        for name, (color, marker) in styles.items():
            pts = sorted((p["size"], p["top1"]) for p in points if p["subset"] == name)
            if pts:
                ax.plot(
                    *zip(*pts, strict=True),
                    marker=marker,
                    color=color,
                    label=name.replace("_", " "),
                )
        sizes = sorted({p["size"] for p in points if p["subset"] == "random"})
        rand = [[p["top1"] for p in points if p["subset"] == "random" and p["size"] == s] for s in sizes]
        mean, std = np.array([np.mean(v) for v in rand]), np.array([np.std(v) for v in rand])
        ax.plot(
            sizes,
            mean,
            marker="s",
            color="tab:blue",
            label=f"random (mean of {config.random_seeds})",
        )
        ax.fill_between(sizes, mean - std, mean + std, color="tab:blue", alpha=0.2)
        full = [p["top1"] for p in points if p["subset"] == "all"][0]
        ax.axhline(full, color="black", ls="--", lw=1, label="all features")
        ax.set(title=f"{LABELS[m]}: compression", xlabel="features kept", ylabel="linear top-1")
        ax.legend(fontsize=8)
    return fig


def fig_correct_vs_misclassified(analyses: dict[str, dict[str, Any]], config: Config) -> Any:
    """Fig. 5: class-average representations of correct and mis-classified test samples."""
    fig, axes = plt.subplots(len(analyses), 2, figsize=(12, 3.4 * len(analyses)), squeeze=False)
    for row, (m, a) in zip(axes, analyses.items(), strict=True):
        h = a["reps"]["test_h"].numpy()
        y = a["reps"]["test_y"].numpy()
        correct = np.asarray(a["probe"]["correct"], dtype=bool)
        order = _sorted_order(np.asarray(a["features"].counts))
        mats = []
        for ok in (True, False):
            rows = [
                h[(y == c) & (correct == ok)].mean(axis=0)
                if ((y == c) & (correct == ok)).any()
                else np.zeros(h.shape[1])
                for c in range(len(CLASSES))
            ]
            mats.append(np.stack(rows)[:, order])
        vmax = max(float(mat.max()) for mat in mats)
        for ax, mat, title in zip(row, mats, ("correct", "mis-classified"), strict=True):
            im = ax.imshow(mat, aspect="auto", cmap="Greys", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_yticks(range(len(CLASSES)), CLASSES, fontsize=7)
            ax.set(
                title=f"{LABELS[m]}: class averages, {title}",
                xlabel="feature (sorted by dominance count)",
            )
            fig.colorbar(im, ax=ax, fraction=0.04)
    return fig


def fig_curves(analyses: dict[str, dict[str, Any]], names: list[str], title: str) -> Any:
    """Figs. 7 and A.4: ROC and PR curves (positive class = correctly classified)."""
    fig, axes = plt.subplots(len(analyses), 2, figsize=(10, 4 * len(analyses)), squeeze=False)
    for (ax_roc, ax_pr), (m, a) in zip(axes, analyses.items(), strict=True):
        correct = np.asarray(a["probe"]["correct"], dtype=bool)
        for name in names:
            s = np.asarray(a["scores"]["scores"][name], dtype=float)
            if correct.all() or not correct.any():
                continue
            fpr, tpr, _ = roc_curve(correct, s)
            prec, rec, _ = precision_recall_curve(correct, s)
            short = name.replace("_", " ")
            ls = "--" if name == "q_score" and len(names) > 1 else "-"
            ax_roc.plot(fpr, tpr, ls=ls, label=f"{short} (AUROC {roc_auc_score(correct, s):.3f})")
            ax_pr.plot(rec, prec, ls=ls, label=f"{short} (AUPRC {average_precision_score(correct, s):.3f})")
        ax_roc.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":")
        ax_pr.axhline(correct.mean(), color="gray", lw=0.8, ls=":", label=f"base rate {correct.mean():.3f}")
        ax_roc.set(title=f"{LABELS[m]}: ROC", xlabel="false positive rate", ylabel="true positive rate")
        ax_pr.set(title=f"{LABELS[m]}: precision-recall", xlabel="recall", ylabel="precision")
        ax_roc.legend(fontsize=8, loc="lower right")
        ax_pr.legend(fontsize=8, loc="lower left")
    fig.suptitle(title)
    return fig


def fig_q_histograms(analyses: dict[str, dict[str, Any]], config: Config) -> Any:
    """Fig. A.3: Q-Score distributions of correct and mis-classified test samples."""
    fig, axes = _panels(len(analyses))
    for ax, (m, a) in zip(axes, analyses.items(), strict=True):
        q = np.asarray(a["scores"]["scores"]["q_score"], dtype=float)
        correct = np.asarray(a["probe"]["correct"], dtype=bool)
        bins = np.linspace(0, max(float(q.max()), 1e-6), 40)
        ax.hist(
            q[correct],
            bins=bins,
            density=True,
            alpha=0.5,
            color="tab:green",
            label=f"correct ({correct.sum()})",
        )
        ax.hist(
            q[~correct],
            bins=bins,
            density=True,
            alpha=0.5,
            color="tab:red",
            label=f"mis-classified ({(~correct).sum()})",
        )
        ax.set(
            title=f"{LABELS[m]}: Q-Score (eps = {a['features'].eps:g}; {(q == 0).mean():.0%} at 0)",
            xlabel="Q-Score",
            ylabel="density",
        )
        ax.legend(fontsize=8)
    return fig


def fig_sparsity(analyses: dict[str, dict[str, Any]], config: Config) -> Any:
    """Fig. A.6: Hoyer sparsity of test representations before and after regularisation."""
    fig, axes = _panels(len(analyses))
    colors = {"baseline": "tab:blue", "control": "tab:gray", "regularized": "tab:orange"}
    for ax, (m, a) in zip(axes, analyses.items(), strict=True):
        values = {k: np.asarray(a["finetuned"][k]["hoyer"], dtype=float) for k in colors}
        lo = min(v.min() for v in values.values())
        hi = max(v.max() for v in values.values())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 40)
        for kind, v in values.items():
            ax.hist(
                v,
                bins=bins,
                density=True,
                histtype="step",
                lw=1.6,
                color=colors[kind],
                label=f"{kind} (mean {v.mean():.3f})",
            )
        ax.set(
            title=f"{LABELS[m]}: sparsity of test representations",
            xlabel="Hoyer sparsity",
            ylabel="density",
        )
        ax.legend(fontsize=8)
    return fig


def fig_scores(analyses: dict[str, dict[str, Any]], config: Config) -> Any:
    """AUROC of each score for predicting correct classification, per objective."""
    names = list(SCORE_NAMES)
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(analyses)
    for i, (m, a) in enumerate(analyses.items()):
        vals = [a["scores"]["power"][n]["auroc"] or np.nan for n in names]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=LABELS[m])
    ax.axhline(0.5, color="gray", ls=":", lw=1)
    ax.set_xticks(
        np.arange(len(names)) + width * (len(analyses) - 1) / 2,
        [n.replace("_", " ") for n in names],
        rotation=20,
        fontsize=8,
    )
    ax.set(ylabel="AUROC (positive = correct)", title="Per-sample scores against mis-classification")
    ax.legend()
    return fig


def fig_eps_sensitivity(analyses: dict[str, dict[str, Any]], config: Config) -> Any:
    fig, (ax_cov, ax_auc) = plt.subplots(1, 2, figsize=(11, 4))
    for m, a in analyses.items():
        rows = sorted((r for r in a["eps"] if r["eps"] != "auto"), key=lambda r: r["eps_value"])
        eps = [r["eps_value"] for r in rows]
        line = ax_cov.plot(eps, [r["coverage_test"] for r in rows], marker="o", label=LABELS[m])[0]
        ax_auc.plot(
            eps,
            [r["auroc"] if r["auroc"] is not None else np.nan for r in rows],
            marker="o",
            color=line.get_color(),
            label=LABELS[m],
        )
        auto = next(r for r in a["eps"] if r["eps"] == "auto")
        ax_cov.plot(
            [auto["eps_value"]],
            [auto["coverage_test"]],
            marker="*",
            ms=14,
            color=line.get_color(),
            ls="none",
            label=f"{LABELS[m]} auto (eps = {auto['eps_value']:g})",
        )
        ax_auc.plot(
            [auto["eps_value"]],
            [auto["auroc"]],
            marker="*",
            ms=14,
            color=line.get_color(),
            ls="none",
        )
    ax_cov.axhline(0.5, color="red", ls=":", lw=1, label="50% (low-coverage warning)")
    ax_auc.axhline(0.5, color="gray", ls=":", lw=1)
    ax_cov.set(xlabel="eps", ylabel="test coverage (non-empty L ∩ D)", title="Coverage against eps")
    ax_auc.set(xlabel="eps", ylabel="Q-Score AUROC", title="Q-Score AUROC against eps")
    ax_cov.legend(fontsize=8)
    ax_auc.legend(fontsize=8)
    return fig


def fig_training_progress(analyses: dict[str, dict[str, Any]], config: Config) -> Any:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for m, a in analyses.items():
        rows = sorted(a["progress"], key=lambda r: r["step"])
        x = [r["epochs"] for r in rows]
        line = axes[0].plot(x, [r["top1"] for r in rows], marker="o", label=LABELS[m])[0]
        c = line.get_color()
        axes[1].plot(
            x,
            [r["coverage_test_4"] for r in rows],
            marker="o",
            color=c,
            label=f"{LABELS[m]} eps = 4",
        )
        axes[1].plot(
            x,
            [r["coverage_test_auto"] for r in rows],
            marker="s",
            ls="--",
            color=c,
            label=f"{LABELS[m]} eps = auto",
        )
        axes[2].plot(
            x,
            [r["auroc_4"] if r["auroc_4"] is not None else np.nan for r in rows],
            marker="o",
            color=c,
            label=f"{LABELS[m]} eps = 4",
        )
        axes[2].plot(
            x,
            [r["auroc_auto"] if r["auroc_auto"] is not None else np.nan for r in rows],
            marker="s",
            ls="--",
            color=c,
            label=f"{LABELS[m]} eps = auto",
        )
    axes[0].set(xlabel="pre-training epochs", ylabel="linear top-1", title="Linear top-1")
    axes[1].set(xlabel="pre-training epochs", ylabel="test coverage", title="Coverage")
    axes[2].set(xlabel="pre-training epochs", ylabel="Q-Score AUROC", title="Q-Score AUROC")
    axes[1].axhline(0.5, color="red", ls=":", lw=1)
    axes[2].axhline(0.5, color="gray", ls=":", lw=1)
    for ax in axes:
        ax.legend(fontsize=8)
    return fig
