"""Reproduce the paper's claims with the project's own code (issue 5).

    python -m experiments.reproduce --config cpu            # writes docs/reproduction.md
    python -m experiments.reproduce --config gpu --work-dir experiments/runs/gpu

Stages, per objective (SimCLR, BYOL), each cached in the work folder and skipped when its file
exists (a killed run resumes; training resumes from its last checkpoint):
pre-training (with encoder snapshots for the training-progress sensitivity) -> representations
of the probe-train and test samples -> discriminative features at every eps -> linear probe ->
Q-Score and the simpler scores against mis-classification -> compression curve -> Q-Score
regularisation and its control -> figures, ``results.json`` and ``reproduction.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.baselines import label_free_scores
from experiments.cache import Stages, clean
from experiments.config import PRESETS, Config, get_config
from experiments.figures import make_figures
from experiments.report import write_report
from models.data.datasets import ensure_cifar10, image_folder, random_sample, subset
from models.data.transforms import eval_transform
from models.discovery.discover import build_feature_set, count_pass, make_selection, q_pass, select_per_eps
from models.encoders.device import resolve_device
from models.encoders.loading import load_encoder, save_encoder
from models.encoders.resnet import build_encoder
from models.encoders.spec import EncoderSpec
from models.evaluation.metrics import compression_curve, linear_probe, score_power
from models.scoring.feature_set import DataProvenance, EncoderRef, FeatureSet
from models.scoring.qscore import q_score
from models.scoring.representations import extract_representations
from models.storage.atomic import write_json_atomic
from models.training.loop import Regularizer, StepRecord, TrainConfig, train
from models.training.objectives import build_method

log = logging.getLogger("experiments.reproduce")

REPO_ROOT = Path(__file__).resolve().parent.parent
FINETUNE_KINDS = ("regularized", "control")


@dataclass(frozen=True)
class Data:
    train_root: Path
    test_root: Path
    pretrain_indices: list[int]
    probe_indices: list[int]
    test_indices: list[int]
    n_train: int
    n_test: int


def encoder_spec(config: Config) -> EncoderSpec:
    return EncoderSpec(arch="resnet18", cifar_stem=True, width=config.width, image_size=32)


def load_data(config: Config, data_root: Path) -> Data:
    train_root, test_root = data_root / "train", data_root / "test"
    n_train = len(image_folder(train_root))
    n_test = len(image_folder(test_root))
    # Seeded uniform samples: the folders are sorted by class (SPEC section 2).
    return Data(
        train_root,
        test_root,
        random_sample(n_train, config.pretrain_samples, config.seed).indices,
        random_sample(n_train, config.probe_train_samples, config.seed + 1).indices,
        random_sample(n_test, config.test_samples, config.seed + 2).indices,
        n_train,
        n_test,
    )


def safe_power(scores: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    try:
        return score_power(scores, correct)
    except ValueError as exc:  # all correct or none: AUROC undefined
        log.warning("score power undefined: %s", exc)
        return {
            k: float("nan")
            for k in (
                "auroc",
                "auprc",
                "base_rate",
                "auroc_misclassified",
                "auprc_misclassified",
                "base_rate_misclassified",
            )
        }


class Pipeline:
    def __init__(self, config: Config, work_dir: Path, data_root: Path) -> None:
        self.config = config
        self.work_dir = work_dir
        self.stages = Stages(work_dir)
        self.data = load_data(config, data_root)
        self.spec = encoder_spec(config)
        self.device = resolve_device(config.device)
        self.selection = make_selection(config.band_lo, config.band_hi)

    # ---------------------------------------------------------------- training
    def total_steps(self, epochs: int) -> int:
        n = len(self.data.pretrain_indices)
        return (n // self.config.batch_size) * epochs

    def snapshot_steps(self) -> dict[str, int]:
        total = self.total_steps(self.config.pretrain_epochs)
        return {f"progress_{p:g}": max(1, round(p * total)) for p in self.config.progress_points}

    def ssl_dataset(self, method_name: str) -> Any:
        transform = build_method(method_name, build_encoder(self.spec)).view_transform(self.spec)
        return subset(image_folder(self.data.train_root, transform), self.data.pretrain_indices)

    def train_config(self, epochs: int, lr: float) -> TrainConfig:
        c = self.config
        return TrainConfig(
            epochs=epochs,
            batch_size=c.batch_size,
            lr=lr,
            seed=c.seed,
            workers=c.workers,
            checkpoint_every=c.checkpoint_every,
        )

    def pretrain(self, m: str) -> None:
        snapshots = {
            step: self.stages.path(f"{m}/encoders/{tag}.safetensors") for tag, step in self.snapshot_steps().items()
        }
        history_path = self.stages.path(f"{m}/pretrain-history.jsonl")

        def run(target: Path) -> None:
            torch.manual_seed(self.config.seed)
            method = build_method(m, build_encoder(self.spec))
            total = self.total_steps(self.config.pretrain_epochs)
            started = time.perf_counter()

            def on_step(record: StepRecord, progress: float) -> None:
                _append_jsonl(history_path, asdict(record))
                if record.step in snapshots and not snapshots[record.step].is_file():
                    save_encoder(method.encoder, snapshots[record.step])
                if record.step % max(1, total // 20) == 0:
                    rate = record.step * self.config.batch_size / max(time.perf_counter() - started, 1e-9)
                    log.info(
                        "%s pretrain step %d/%d loss %.4f (%.0f images/s this session)",
                        m,
                        record.step,
                        total,
                        record.loss,
                        rate,
                    )

            train(
                method,
                self.ssl_dataset(m),
                self.train_config(self.config.pretrain_epochs, self.config.lr),
                device=self.device,
                checkpoint=self.stages.path(f"{m}/pretrain.ckpt"),
                on_step=on_step,
            )
            save_encoder(method.encoder, target)

        self.stages.run_file(f"{m}/pretrain", f"{m}/encoders/baseline.safetensors", run)

    def finetune(self, m: str, kind: str, features: FeatureSet) -> None:
        history_path = self.stages.path(f"{m}/{kind}-history.jsonl")

        def run(target: Path) -> None:
            torch.manual_seed(self.config.seed)
            method = build_method(m, build_encoder(self.spec))
            # Continue from the end of pre-training: encoder, heads and momentum networks.
            state = torch.load(self.stages.path(f"{m}/pretrain.ckpt"), map_location="cpu", weights_only=True)
            method.load_state_dict(state["method"])
            regularizer = None
            if kind == "regularized":
                # D and alpha fixed from the pre-trained model (SPEC section 4), at its eps.
                regularizer = Regularizer(
                    discriminative=features.discriminative_indices,
                    alpha=features.alpha,
                    weight=self.config.reg_lambda,
                    eps=features.eps,
                )
            train(
                method,
                self.ssl_dataset(m),
                self.train_config(self.config.reg_epochs, self.config.reg_lr),
                device=self.device,
                regularizer=regularizer,
                checkpoint=self.stages.path(f"{m}/{kind}.ckpt"),
                on_step=lambda record, _: _append_jsonl(history_path, asdict(record)),
            )
            save_encoder(method.encoder, target)

        self.stages.run_file(f"{m}/{kind}", f"{m}/encoders/{kind}.safetensors", run)

    # ---------------------------------------------------------------- representations
    def representations(self, m: str, tag: str) -> dict[str, torch.Tensor]:
        def run() -> dict[str, torch.Tensor]:
            imported = load_encoder(self.stages.path(f"{m}/encoders/{tag}.safetensors"))
            encoder = imported.encoder
            transform = eval_transform(self.spec)
            out: dict[str, Any] = {}
            for split, root, indices in (
                ("train", self.data.train_root, self.data.probe_indices),
                ("test", self.data.test_root, self.data.test_indices),
            ):
                h, y = extract_representations(
                    encoder,
                    subset(image_folder(root, transform), indices),
                    batch_size=self.config.eval_batch_size,
                    device=self.device,
                    workers=self.config.eval_workers,
                )
                out[f"{split}_h"], out[f"{split}_y"] = h, y
            out["fingerprint"] = torch.tensor(list(bytes.fromhex(imported.fingerprint)), dtype=torch.uint8)
            return out

        return self.stages.tensors(f"{m}/{tag}/representations", f"{m}/reps/{tag}.pt", run)

    def feature_sets(self, m: str, tag: str, reps: dict[str, torch.Tensor]) -> dict[str, FeatureSet]:
        """Feature sets at every eps of the grid and at ``auto``, from one counting pass."""

        def run() -> dict[str, Any]:
            train_h = reps["train_h"]
            sample = random_sample(len(train_h), self.config.reference_samples, self.config.seed + 3)
            h_ref = train_h[sample.indices]
            batches = list(torch.split(h_ref, 1024))
            counts = count_pass(batches, self.config.all_eps)
            selections = select_per_eps(counts, self.selection)
            q_by_eps = q_pass(batches, selections)
            ref = EncoderRef(
                fingerprint=bytes(reps["fingerprint"].tolist()).hex(),
                arch="resnet18",
                feature_dim=self.spec.feature_dim,
                model_version=f"{m}/{tag}",
            )
            provenance = DataProvenance(
                dataset="cifar10/train (probe-train sample)",
                n_available=sample.n_available,
                n_reference=len(sample.indices),
                sampling=sample.description,
                seed=self.config.seed + 3,
            )
            out = {}
            for eps in [*self.config.all_eps, "auto"]:
                fs = build_feature_set(
                    counts=counts,
                    selections=selections,
                    q_by_eps=q_by_eps,
                    eps=eps,
                    selection=self.selection,
                    encoder=ref,
                    data=provenance,
                )
                out[f"{eps:g}" if eps != "auto" else "auto"] = fs.model_dump(mode="json")
            return out

        raw = self.stages.json(f"{m}/{tag}/features", f"{m}/features/{tag}.json", run)
        return {k: FeatureSet.model_validate(v) for k, v in raw.items()}

    def main_features(self, sets: dict[str, FeatureSet]) -> FeatureSet:
        return sets["auto"] if self.config.eps == "auto" else sets[f"{float(self.config.eps):g}"]

    def probe(self, m: str, tag: str, reps: dict[str, torch.Tensor]) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            result = linear_probe(
                reps["train_h"],
                reps["train_y"],
                reps["test_h"],
                reps["test_y"],
                max_iter=self.config.probe_max_iter,
                seed=self.config.seed,
            )
            return {
                "top1": result.top1,
                "correct": result.correct.tolist(),
                "predictions": result.predictions.tolist(),
                "max_probability": result.max_probability.tolist(),
            }

        return self.stages.json(f"{m}/{tag}/probe", f"{m}/probes/{tag}.json", run)

    # ---------------------------------------------------------------- analyses
    def eps_sensitivity(
        self, reps: dict[str, torch.Tensor], sets: dict[str, FeatureSet], correct: np.ndarray
    ) -> list[dict[str, Any]]:
        rows = []
        for key, fs in sets.items():
            if key != "auto" and float(key) not in self.config.eps_grid:
                continue
            q = q_score(reps["test_h"], fs.discriminative_indices, fs.eps).numpy()
            power = safe_power(q, correct)
            rows.append(
                {
                    "eps": key,
                    "eps_value": fs.eps,
                    "coverage_reference": fs.coverage,
                    "coverage_test": float((q > 0).mean()),
                    "n_discriminative": len(fs.discriminative),
                    "auroc": power["auroc"],
                    "auprc": power["auprc"],
                }
            )
        return rows

    def analyse_method(self, m: str) -> dict[str, Any]:
        c = self.config
        self.pretrain(m)
        base_reps = self.representations(m, "baseline")
        base_sets = self.feature_sets(m, "baseline", base_reps)
        fs = self.main_features(base_sets)
        base_probe = self.probe(m, "baseline", base_reps)
        correct = np.asarray(base_probe["correct"], dtype=bool)

        def scores_stage() -> dict[str, Any]:
            scores = label_free_scores(
                base_reps["test_h"],
                fs.discriminative_indices,
                fs.eps,
                base_reps["train_h"],
                c.knn_k,
            )
            scores["max_softmax"] = np.asarray(base_probe["max_probability"])
            return {
                "power": {name: safe_power(s, correct) for name, s in scores.items()},
                "scores": {name: s.tolist() for name, s in scores.items()},
            }

        scores = self.stages.json(f"{m}/scores", f"{m}/metrics/scores.json", scores_stage)

        def compression_stage() -> dict[str, Any]:
            counts = np.asarray(fs.counts)
            largest = max(1, int(round(max(c.compression_fractions) * len(counts))))
            # The band is drawn among features dominant at least once; when fewer than the
            # largest subset are (a weak encoder, a high eps), every feature gets one extra count
            # so the band centres on the middle of all features (same sorted order, no gap).
            padded = int((counts > 0).sum()) < largest
            points = compression_curve(
                base_reps["train_h"],
                base_reps["train_y"],
                base_reps["test_h"],
                base_reps["test_y"],
                counts + 1 if padded else counts,
                fractions=c.compression_fractions,
                random_seeds=c.random_seeds,
                max_iter=c.probe_max_iter,
            )
            return {"padded": padded, "points": [asdict(p) for p in points]}

        compression = self.stages.json(f"{m}/compression", f"{m}/metrics/compression.json", compression_stage)
        eps_rows = self.stages.json(
            f"{m}/eps-sensitivity",
            f"{m}/metrics/eps.json",
            lambda: self.eps_sensitivity(base_reps, base_sets, correct),
        )

        # Training progress: the snapshots, then the finished encoder.
        progress_rows = []
        total = self.total_steps(c.pretrain_epochs)
        for tag, step in [*self.snapshot_steps().items(), ("baseline", total)]:
            reps = base_reps if tag == "baseline" else self.representations(m, tag)
            sets = base_sets if tag == "baseline" else self.feature_sets(m, tag, reps)
            probe = base_probe if tag == "baseline" else self.probe(m, tag, reps)

            def progress_stage(reps=reps, sets=sets, probe=probe, step=step) -> dict[str, Any]:
                ok = np.asarray(probe["correct"], dtype=bool)
                row: dict[str, Any] = {
                    "step": step,
                    "fraction": step / total,
                    "epochs": step / total * c.pretrain_epochs,
                    "top1": probe["top1"],
                }
                for key in ("4", "auto"):
                    q = q_score(reps["test_h"], sets[key].discriminative_indices, sets[key].eps).numpy()
                    power = safe_power(q, ok)
                    row[f"eps_{key}"] = sets[key].eps
                    row[f"coverage_reference_{key}"] = sets[key].coverage
                    row[f"coverage_test_{key}"] = float((q > 0).mean())
                    row[f"auroc_{key}"], row[f"auprc_{key}"] = power["auroc"], power["auprc"]
                return row

            progress_rows.append(
                self.stages.json(f"{m}/{tag}/progress", f"{m}/metrics/progress-{tag}.json", progress_stage)
            )

        # Regularisation (table 1) and the sparsity it brings (fig. A.6).
        finetuned: dict[str, Any] = {}
        for kind in FINETUNE_KINDS:
            self.finetune(m, kind, fs)
            reps = self.representations(m, kind)
            probe = self.probe(m, kind, reps)

            def finetune_stage(reps=reps, probe=probe, kind=kind) -> dict[str, Any]:
                q = q_score(reps["test_h"], fs.discriminative_indices, fs.eps).numpy()
                ok = np.asarray(probe["correct"], dtype=bool)
                sparsity = label_free_scores(
                    reps["test_h"], fs.discriminative_indices, fs.eps, reps["train_h"][:10], 1
                )["hoyer_sparsity"]
                return {
                    "top1": probe["top1"],
                    "mean_q_fixed_d": float(q.mean()),
                    "share_below_alpha": float((q < fs.alpha).mean()),
                    "coverage_test_fixed_d": float((q > 0).mean()),
                    "auroc_q_fixed_d": safe_power(q, ok)["auroc"],
                    "hoyer": sparsity.tolist(),
                }

            finetuned[kind] = self.stages.json(f"{m}/{kind}/summary", f"{m}/metrics/{kind}.json", finetune_stage)

        base_q = np.asarray(scores["scores"]["q_score"])
        finetuned["baseline"] = {
            "top1": base_probe["top1"],
            "mean_q_fixed_d": float(base_q.mean()),
            "share_below_alpha": float((base_q < fs.alpha).mean()),
            "coverage_test_fixed_d": float((base_q > 0).mean()),
            "auroc_q_fixed_d": scores["power"]["q_score"]["auroc"],
            "hoyer": scores["scores"]["hoyer_sparsity"],
        }
        return {
            "features": fs,
            "reps": base_reps,
            "probe": base_probe,
            "scores": scores,
            "compression": compression["points"],
            "compression_padded": compression["padded"],
            "eps": eps_rows,
            "progress": progress_rows,
            "finetuned": finetuned,
        }


# -------------------------------------------------------------------- summary and entry point
def summarise(m: str, a: dict[str, Any], config: Config) -> dict[str, Any]:
    fs: FeatureSet = a["features"]
    r = len(fs.counts)
    half = max(1, int(round(0.5 * r)))
    comp = a["compression"]

    def at(name: str) -> list[float]:
        return [p["top1"] for p in comp if p["subset"] == name and p["size"] == half]

    power = a["scores"]["power"]
    out: dict[str, Any] = {
        "feature_dim": r,
        "eps": fs.eps,
        "eps_mode": fs.eps_mode,
        "coverage_reference": fs.coverage,
        "n_discriminative": len(fs.discriminative),
        "alpha": fs.alpha,
        "top1_full": a["probe"]["top1"],
        "top1_discriminative_50": (at("discriminative") or [float("nan")])[0],
        "top1_random_50": float(np.mean(at("random"))) if at("random") else float("nan"),
        "top1_random_50_std": float(np.std(at("random"))) if at("random") else float("nan"),
        "top1_lower_tail_50": (at("lower_tail") or [float("nan")])[0],
        "top1_upper_tail_50": (at("upper_tail") or [float("nan")])[0],
        "auroc_q": power["q_score"]["auroc"],
        "auprc_q": power["q_score"]["auprc"],
        "auroc_q_misclassified": power["q_score"]["auroc_misclassified"],
        "auprc_q_misclassified": power["q_score"]["auprc_misclassified"],
        "accuracy_base_rate": power["q_score"]["base_rate"],
        "top1_baseline": a["finetuned"]["baseline"]["top1"],
        "top1_regularized": a["finetuned"]["regularized"]["top1"],
        "top1_control": a["finetuned"]["control"]["top1"],
        "scores": {name: {"auroc": p["auroc"], "auprc": p["auprc"]} for name, p in power.items()},
        "compression": comp,
        "compression_band_padded": a["compression_padded"],
        "eps_sensitivity": a["eps"],
        "training_progress": a["progress"],
        "regularization": {
            k: {kk: vv for kk, vv in v.items() if kk != "hoyer"} | {"hoyer_mean": float(np.mean(v["hoyer"]))}
            for k, v in a["finetuned"].items()
        },
    }
    return out


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        info["name"] = _cpu_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(clean(record)) + "\n")


def setup_logging(log_path: Path) -> logging.Handler:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        stream = logging.StreamHandler()
        stream.setFormatter(handler.formatter)
        root.addHandler(stream)
    root.setLevel(logging.INFO)
    return handler


def run(config: Config, out_dir: Path, work_dir: Path, data_root: Path | None = None) -> dict[str, Any]:
    """Run (or resume) the whole reproduction; return the content of ``results.json``."""

    out_dir, work_dir = Path(out_dir), Path(work_dir)
    handler = setup_logging(out_dir / "reproduction.log")
    try:
        started = time.perf_counter()
        if config.threads:
            torch.set_num_threads(config.threads)
        data_root = Path(data_root) if data_root else ensure_cifar10()
        pipeline = Pipeline(config, work_dir, data_root)
        write_json_atomic(work_dir / "config.json", config.model_dump(mode="json"))
        log.info(
            "reproduction preset %s on %s, work dir %s, out dir %s",
            config.name,
            pipeline.device,
            work_dir,
            out_dir,
        )
        analyses = {m: pipeline.analyse_method(m) for m in config.methods}
        figures = make_figures(analyses, config, out_dir / "figures")
        device = device_info(pipeline.device)
        session_s = time.perf_counter() - started
        results: dict[str, Any] = {
            "preset": config.name,
            "config": config.model_dump(mode="json"),
            "device": device,
            "data": {
                "root": str(data_root),
                "n_train_available": pipeline.data.n_train,
                "n_test_available": pipeline.data.n_test,
                "n_pretrain": len(pipeline.data.pretrain_indices),
                "n_probe_train": len(pipeline.data.probe_indices),
                "n_test": len(pipeline.data.test_indices),
            },
            "durations_s": {
                "stages": dict(pipeline.stages.timings),
                "total_compute": round(sum(pipeline.stages.timings.values()), 1),
                "this_session": round(session_s, 1),
            },
            "stages_skipped": pipeline.stages.skipped,
            "figures": sorted(p.name for p in figures),
            "objectives": list(config.methods),
        }
        for m, a in analyses.items():
            results[m] = summarise(m, a, config) | {"device": device["name"]}
        results = clean(results)
        write_json_atomic(out_dir / "results.json", results)
        write_report(results, out_dir / "reproduction.md")
        log.info(
            "done in %.1f s this session (%d stages run, %d skipped); report at %s",
            session_s,
            len(pipeline.stages.ran),
            len(pipeline.stages.skipped),
            out_dir / "reproduction.md",
        )
        return results
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="cpu", choices=sorted(PRESETS))
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where reproduction.md, results.json, figures/ and the log go "
        "(default docs/ for cpu, docs/gpu/ for gpu, docs/gpu-short/ for gpu_short, "
        "experiments/runs/<preset>/out otherwise)",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="cache (default experiments/runs/<preset>)")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder with train/ and test/ (default: the extracted ../shared/data archive)",
    )
    parser.add_argument("--device", default=None, help="override the preset's device")
    args = parser.parse_args(argv)
    overrides = {"device": args.device} if args.device else {}
    config = get_config(args.config, **overrides)
    default_out = {
        "cpu": REPO_ROOT / "docs",
        "gpu": REPO_ROOT / "docs" / "gpu",
        "gpu_short": REPO_ROOT / "docs" / "gpu-short",
    }
    out_dir = args.out_dir or default_out.get(config.name, REPO_ROOT / "experiments" / "runs" / config.name / "out")
    work_dir = args.work_dir or REPO_ROOT / "experiments" / "runs" / config.name
    run(config, out_dir, work_dir, args.data_root)


if __name__ == "__main__":
    main()
