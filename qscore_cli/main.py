"""The ``qscore`` command: pretrain, discover, score, explain, evaluate, regularize, import, convert, serve, worker."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from models.evaluation.defaults import DEFAULT_SHIFT_SAMPLES

if TYPE_CHECKING:
    from models.encoders.loading import ImportedEncoder

# Each command imports what it uses: torch, torchvision, scikit-learn, the service and Celery take
# 6-8 s to import, which `qscore --help` and a mistyped flag should not wait for.

app = typer.Typer(
    help="Label-free quality scoring of self-supervised image representations (Q-Score).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ModelOpt = Annotated[
    Path,
    typer.Option(
        "--model",
        "-m",
        help="Encoder: a TorchScript, ONNX or torch.export (.pt2) file, safetensors, or a checkpoint "
        "(ResNet layouts, or --arch).",
    ),
]
RegistryOpt = Annotated[
    Path | None, typer.Option(help="Registry root (default: QSCORE_REGISTRY_ROOT, .qscore/registry).")
]
ArchOpt = Annotated[
    str | None,
    typer.Option(help="timm:NAME for a timm state dict (e.g. timm:vit_small_patch16_224); default: read off the file."),
]
ImageSizeOpt = Annotated[
    int | None,
    typer.Option(
        help="Input size S: resize the short side to S, centre-crop SxS (TorchScript, ONNX, .pt2 default: "
        "the file's fixed input size, else 224)."
    ),
]
MeanOpt = Annotated[str | None, typer.Option(help="Normalisation mean R,G,B (TorchScript, ONNX, .pt2: ImageNet's).")]
StdOpt = Annotated[str | None, typer.Option(help="Normalisation std R,G,B (TorchScript, ONNX, .pt2: ImageNet's).")]
FeaturesOpt = Annotated[Path, typer.Option("--features", "-f", help="Feature-set JSON from `qscore discover`.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the core's ValueError/FileNotFoundError into one clear line and exit code 2."""
    try:
        yield
    except (ValueError, FileNotFoundError) as exc:
        typer.secho(f"error: {_one_line(exc)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _one_line(exc: Exception) -> str:
    """The message of ``exc``; pydantic's ValidationError (a ValueError, many lines with links) as its
    errors' messages, each naming its field (settings by their environment variable)."""
    errors = getattr(exc, "errors", None)
    if type(exc).__name__ != "ValidationError" or not callable(errors):
        return str(exc)
    title = getattr(exc, "title", "")
    parts = []
    for error in errors():
        field = ".".join(str(p) for p in error.get("loc", ()))
        if field and title == "Settings":
            field = f"QSCORE_{field.upper()}"
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{field}: {message}" if field else message)
    return f"invalid {'settings' if title == 'Settings' else title or 'input'}: " + "; ".join(parts)


def preprocessing(image_size: int | None, mean: str | None, std: str | None) -> dict[str, Any]:
    """The ``--image-size``, ``--mean`` and ``--std`` flags, checked, as load_encoder takes them."""
    from models.encoders.spec import parse_rgb

    if image_size is not None and image_size < 8:
        raise ValueError(f"--image-size must be at least 8 pixels, got {image_size}")
    return {"image_size": image_size, "mean": parse_rgb(mean, "--mean"), "std": parse_rgb(std, "--std")}


def load_model(
    model: Path, arch: str | None, image_size: int | None, mean: str | None, std: str | None
) -> ImportedEncoder:
    """The encoder behind ``--model`` with the preprocessing flags applied."""
    from models.encoders.loading import load_encoder

    return load_encoder(model, arch=arch, **preprocessing(image_size, mean, std))


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step")


def _step_logger(log_path: Path | None, bar: Any) -> Callable[[Any, float], None]:
    handle = open(log_path, "a") if log_path else None  # closed at exit

    def on_step(record: Any, progress: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{record.loss:.3f}")
        if handle:
            handle.write(json.dumps(asdict(record)) + "\n")
            handle.flush()

    return on_step


@app.command()
def pretrain(
    data: Annotated[Path, typer.Option(help="Image folder (root/<class>/<image>); labels are ignored.")],
    out: Annotated[Path, typer.Option(help="Where to write the encoder (.safetensors).")],
    method: Annotated[str, typer.Option(help="simclr, moco_v2, byol or swav.")] = "simclr",
    arch: Annotated[str, typer.Option(help="resnet18 or resnet50.")] = "resnet18",
    width: Annotated[int, typer.Option(help="ResNet-18 base width (64 is torchvision's).")] = 64,
    cifar_stem: Annotated[bool, typer.Option(help="3x3 first convolution, no max-pool.")] = True,
    image_size: Annotated[int, typer.Option(help="Input size in pixels.")] = 32,
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 0.06,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    seed: int = 0,
    workers: Annotated[int, typer.Option(help="Data-loading processes.")] = 0,
    device: DeviceOpt = "auto",
    checkpoint: Annotated[Path | None, typer.Option(help="Resumable training state (resumed if present).")] = None,
    log: Annotated[Path | None, typer.Option(help="Append one JSON line per step here.")] = None,
) -> None:
    """Pre-train an encoder with a self-supervised objective."""
    from models.data.datasets import image_folder
    from models.encoders.device import resolve_device
    from models.encoders.loading import save_encoder
    from models.encoders.resnet import build_encoder
    from models.encoders.spec import BUILTIN_ARCHS, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec
    from models.training.loop import TrainConfig, seed_everything, train
    from models.training.objectives import METHODS, build_method

    with user_errors():
        spec_kwargs: dict[str, Any] = {"arch": arch, "width": width, "cifar_stem": cifar_stem, "image_size": image_size}
        if not cifar_stem:
            spec_kwargs.update(mean=IMAGENET_MEAN, std=IMAGENET_STD)
        if arch not in BUILTIN_ARCHS:
            raise ValueError(
                f"pretrain builds {' or '.join(BUILTIN_ARCHS)}, got --arch {arch}; an encoder of another "
                "architecture is brought as it is (see `qscore import` and --arch timm:NAME on the other commands)"
            )
        spec = EncoderSpec(**spec_kwargs)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
        config = TrainConfig(
            epochs=epochs, batch_size=batch_size, lr=lr, max_steps=max_steps, seed=seed, workers=workers
        )
        seed_everything(seed)
        encoder = build_encoder(spec)
        ssl = build_method(method, encoder)
        dataset = image_folder(data, transform=ssl.view_transform(spec))
        started = time.time()
        with _progress_bar(config.total_steps(len(dataset)), f"pretrain {method}") as bar:
            result = train(
                ssl,
                dataset,
                config,
                device=resolve_device(device),
                checkpoint=checkpoint,
                on_step=_step_logger(log, bar),
            )
        digest = save_encoder(encoder, out, {"method": method, "steps": str(result.steps)})
        typer.echo(
            json.dumps(
                {
                    "out": str(out),
                    "fingerprint": digest,
                    "steps": result.steps,
                    "seconds": round(time.time() - started, 1),
                    "final_loss": result.history[-1].loss if result.history else None,
                }
            )
        )


@app.command()
def discover(
    model: ModelOpt,
    data: Annotated[Path, typer.Option(help="Image folder of unlabelled reference images.")],
    out: Annotated[Path, typer.Option(help="Where to write the feature set (JSON).")],
    eps: Annotated[str, typer.Option(help="Dominance threshold in standard deviations, or 'auto'.")] = "4",
    lo: Annotated[float, typer.Option(help="Lower rank quantile of the band.")] = 0.25,
    hi: Annotated[float, typer.Option(help="Upper rank quantile of the band.")] = 0.75,
    size: Annotated[int | None, typer.Option(help="Select this many features instead of a band.")] = None,
    sample_size: Annotated[int, typer.Option(help="Reference samples drawn at random.")] = 5000,
    seed: int = 0,
    batch_size: int = 256,
    device: DeviceOpt = "auto",
    arch: ArchOpt = None,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
) -> None:
    """Find the discriminative features of an encoder on unlabelled images."""
    from models.discovery.discover import discover_folder, parse_eps
    from models.encoders.device import resolve_device

    with user_errors():
        feature_set = discover_folder(
            load_model(model, arch, image_size, mean, std),
            data,
            dataset_name=str(data),
            eps=parse_eps(eps),
            lo=lo,
            hi=hi,
            size=size,
            sample_size=sample_size,
            seed=seed,
            batch_size=batch_size,
            device=resolve_device(device),
            progress=True,
        )
        feature_set.save(out)
        for warning in (feature_set.coverage_warning, feature_set.selection_warning, feature_set.signed_warning):
            if warning:
                typer.secho(f"WARNING: {warning}", fg=typer.colors.RED, bold=True, err=True)
        typer.echo(
            json.dumps(
                {
                    "out": str(out),
                    "eps": feature_set.eps,
                    "discriminative": len(feature_set.discriminative),
                    "coverage": round(feature_set.coverage, 4),
                    "alpha": feature_set.alpha,
                    "coverage_by_eps": feature_set.coverage_by_eps,
                    "negative_share": feature_set.negative_share,
                }
            )
        )


@app.command()
def score(
    images: Annotated[list[Path], typer.Argument(help="Image files to score.")],
    model: ModelOpt,
    features: FeaturesOpt,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per image: the fields of /score's results.")
    ] = False,
    with_features: Annotated[
        bool,
        typer.Option(
            "--feature-lists/--no-feature-lists", help="List each image's dominant and discriminative features."
        ),
    ] = True,
    device: DeviceOpt = "auto",
    batch_size: int = 64,
    arch: ArchOpt = None,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
) -> None:
    """Q-Score images; flag those below the feature set's alpha or unlike its reference (atypical)."""
    from models.data.images import ImageDecodeError, decode_image
    from models.scoring.feature_set import FeatureSet
    from models.scoring.result import error_row
    from models.scoring.scorer import Scorer

    with user_errors():
        imported = load_model(model, arch, image_size, mean, std)
        scorer = Scorer(imported.encoder, imported.fingerprint, FeatureSet.load(features), device=device)
    failures = 0
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        rows: list[dict[str, Any] | None] = [None] * len(chunk)  # the files' order, as /score keeps it
        pixels, ok = [], []
        for i, path in enumerate(chunk):
            try:
                pixels.append(scorer.preprocess(decode_image(path.read_bytes())))
                ok.append(i)
            except (ImageDecodeError, OSError) as exc:
                failures += 1
                code = getattr(exc, "code", "unreadable_file")
                rows[i] = {"path": str(path), **error_row(code, str(exc))}
        if pixels:
            for i, result in zip(ok, scorer.score(pixels, features=with_features), strict=True):
                rows[i] = {"path": str(chunk[i]), **result.row(), "error": None}
        for row in rows:
            _emit(row, as_json)  # type: ignore[arg-type]
    if failures:
        raise typer.Exit(1)


def _emit(row: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(row))
    elif row.get("error") is not None:
        typer.echo(f"{row['path']}\terror {row['error']['code']}: {row['error']['message']}")
    else:
        flag = ",".join(row["reasons"]) or "ok"
        extra = "" if row["typicality"] is None else f"\ttypicality={row['typicality']:.3f}"
        extra += "" if row["risk"] is None else f"\trisk={row['risk']:.3f}"
        typer.echo(f"{row['path']}\tq={row['q_score']:.6f}{extra}\t{flag}")


@app.command()
def explain(
    images: Annotated[list[Path], typer.Argument(help="Image files to explain.")],
    model: ModelOpt,
    features: FeaturesOpt,
    out: Annotated[Path, typer.Option(help="Folder for the reports (JSON) and heatmap overlays (PNG).")],
    top: Annotated[int, typer.Option(help="Heatmaps of this many features per image (1 to 8).")] = 3,
    arrays: Annotated[bool, typer.Option(help="Also write each image's maps before upsampling (.maps.npz).")] = False,
    device: DeviceOpt = "auto",
    arch: ArchOpt = None,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
) -> None:
    """Explain images' Q-Scores: the decomposition and heatmaps of their top features, as files.

    Per image: ``NAME.json`` (the fields of POST /explain without the pictures), ``NAME.input.png``
    (the image as the encoder saw it) and ``NAME.feature-J.png`` (feature J's heatmap over it).
    """
    import numpy as np

    from models.data.images import ImageDecodeError, decode_image
    from models.explanation.explain import MAX_TOP, Explainer
    from models.explanation.render import display_size, enlarged
    from models.scoring.feature_set import FeatureSet
    from models.scoring.scorer import Scorer

    with user_errors():
        if not 1 <= top <= MAX_TOP:
            raise ValueError(f"--top must be between 1 and {MAX_TOP}, got {top}")
        imported = load_model(model, arch, image_size, mean, std)
        explainer = Explainer(Scorer(imported.encoder, imported.fingerprint, FeatureSet.load(features), device=device))
        out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    failures = 0
    for path in images:
        try:
            pixels = explainer.scorer.preprocess(decode_image(path.read_bytes()))
        except (ImageDecodeError, OSError) as exc:
            failures += 1
            typer.secho(
                f"{path}\terror {getattr(exc, 'code', 'unreadable_file')}: {exc}", fg=typer.colors.RED, err=True
            )
            continue
        name = path.stem
        while name in taken:
            name += "_"
        taken.add(name)
        explanation = explainer.explain(pixels, top)
        size = display_size(pixels.shape[0])
        enlarged(pixels, size).save(out / f"{name}.input.png")
        written = [f"{name}.input.png"]
        for hm, picture in zip(explanation.heatmaps, explanation.overlays(size), strict=True):
            picture.save(out / f"{name}.feature-{hm.feature.index}.png")
            written.append(f"{name}.feature-{hm.feature.index}.png")
        if arrays:
            np.savez(
                out / f"{name}.maps.npz",
                **{f"feature_{hm.feature.index}": hm.map.numpy() for hm in explanation.heatmaps},
            )
            written.append(f"{name}.maps.npz")
        report = {"path": str(path), **explanation.row(pictures=False), "files": written}
        (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
        dec = explanation.decomposition
        typer.echo(
            f"{path}\tq={dec.q_score:.6f}\tactive={len(dec.active)}\tnoisy_share={dec.noisy_share:.2f}"
            f"\theatmaps={explanation.method}\t-> {out / (name + '.json')}"
        )
    if failures:
        raise typer.Exit(1)


@app.command()
def evaluate(
    model: ModelOpt,
    features: FeaturesOpt,
    train_data: Annotated[Path, typer.Option("--train", help="Labelled training image folder.")],
    test_data: Annotated[Path, typer.Option("--test", help="Labelled test image folder.")],
    out: Annotated[Path | None, typer.Option(help="Write the full report (JSON) here.")] = None,
    calibrated_out: Annotated[
        Path | None, typer.Option(help="Write the feature set with calibrated alpha and risk here.")
    ] = None,
    train_samples: Annotated[int | None, typer.Option(help="Random training images used (all if unset).")] = None,
    test_samples: Annotated[int | None, typer.Option(help="Random test images used (all if unset).")] = None,
    target_precision: Annotated[
        float | None, typer.Option(help="Calibrate alpha at this mis-classification precision.")
    ] = None,
    compression: Annotated[bool, typer.Option(help="Also run the compression probes.")] = True,
    shift_samples: Annotated[
        int,
        typer.Option(help="Test images whose shifted copies (87 sets) the risk model also sees; 0: clean only."),
    ] = DEFAULT_SHIFT_SAMPLES,
    seed: int = 0,
    batch_size: int = 256,
    device: DeviceOpt = "auto",
    arch: ArchOpt = None,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
) -> None:
    """Linear evaluation: top-1, Q-Score AUROC/AUPRC, compression curve; the head, risk and error estimator."""
    from models.encoders.device import resolve_device
    from models.evaluation.linear_eval import run_evaluation
    from models.scoring.feature_set import FeatureSet
    from models.storage.atomic import write_json_atomic

    with user_errors():
        imported = load_model(model, arch, image_size, mean, std)
        feature_set = FeatureSet.load(features)
        report, calibrated = run_evaluation(
            imported.encoder,
            imported.fingerprint,
            feature_set,
            train_data,
            test_data,
            train_samples=train_samples,
            test_samples=test_samples,
            seed=seed,
            batch_size=batch_size,
            device=resolve_device(device),
            target_precision=target_precision,
            compression=compression,
            shift_samples=shift_samples,
            progress=True,
        )
        if out:
            write_json_atomic(out, report)
        if calibrated_out:
            calibrated.save(calibrated_out)
        summary = {k: report[k] for k in ("top1", "q_score", "alpha", "atypical_share_test") if k in report}
        if "risk" in report:
            combined = report["risk"]["combined"]
            summary["risk"] = {k: combined[k] for k in ("auroc", "auprc", "ece")}
            summary["risk"]["probe_max_softmax_auroc"] = report["risk"]["probe_max_softmax"]["auroc"]
            summary["risk"]["subsets"] = {
                k: {m: v[m] for m in ("n", "error", "mean_risk", "auroc", "ece")}
                for k, v in report["risk"].get("subsets", {}).items()
                if k in ("clean", "shifted", "gross")
            }
            summary["error_estimator"] = report["error_estimate"]["method"]
            # the fit's own mean |estimate - error| over its shifted sets (each family left out where corrected)
            summary["error_estimate_window_error"] = report["error_estimate"]["window_error"]
            summary["error_estimate_corrected"] = report["error_estimate"].get("correction", {}).get("kept", False)
            summary["risk"]["clean_weight"] = report["risk"].get("clean_weight")
        typer.echo(json.dumps(summary))


@app.command()
def regularize(
    model: ModelOpt,
    features: FeaturesOpt,
    data: Annotated[Path, typer.Option(help="Image folder to continue training on.")],
    out: Annotated[Path, typer.Option(help="Where to write the fine-tuned encoder (.safetensors).")],
    method: Annotated[str, typer.Option(help="simclr, moco_v2, byol or swav.")] = "simclr",
    lambda_: Annotated[float, typer.Option("--lambda", help="Weight of the Q-Score term (0 = control run).")] = 0.1,
    alpha: Annotated[float | None, typer.Option(help="Q threshold of the term (default: the feature set's).")] = None,
    epochs: int = 1,
    batch_size: int = 256,
    lr: float = 0.03,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    seed: int = 0,
    workers: int = 0,
    device: DeviceOpt = "auto",
    checkpoint: Annotated[Path | None, typer.Option(help="Resumable training state.")] = None,
    log: Annotated[Path | None, typer.Option(help="Append one JSON line per step here.")] = None,
    arch: ArchOpt = None,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
) -> None:
    """Continue training an encoder with the Q-Score regulariser (paper eq. 4)."""
    from models.encoders.device import resolve_device
    from models.encoders.loading import save_encoder
    from models.training.regularize import prepare_regularization

    with user_errors():
        imported = load_model(model, arch, image_size, mean, std)
        run = prepare_regularization(
            imported,
            features,
            data,
            name=str(model),
            method=method,
            lambda_=lambda_,
            alpha=alpha,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            max_steps=max_steps,
            seed=seed,
            workers=workers,
        )
        with _progress_bar(run.total_steps, f"regularize {method}") as bar:
            result = run.run(device=resolve_device(device), checkpoint=checkpoint, on_step=_step_logger(log, bar))
        digest = save_encoder(
            imported.encoder, out, {"method": method, "lambda": str(lambda_), "parent": imported.fingerprint}
        )
        typer.echo(json.dumps({"out": str(out), "fingerprint": digest, "steps": result.steps}))


@app.command("attach-head")
def attach_head(
    feature_set: Annotated[str, typer.Argument(help="Feature-set version in the registry.")],
    head: Annotated[
        Path, typer.Argument(help="Head file: linear .safetensors (weight, bias, classes) or TorchScript.")
    ],
    classes: Annotated[str | None, typer.Option(help="Comma-separated class names (required for TorchScript).")] = None,
    version: Annotated[str | None, typer.Option(help="New feature-set version name.")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Serve your own classifier head with a feature set (a new version); re-run evaluate to fit its risk."""
    from models.registry.versions import Registry
    from qscore_config.settings import get_settings

    with user_errors():
        root = registry or get_settings().registry_root
        names = [c.strip() for c in classes.split(",")] if classes else None
        typer.echo(
            json.dumps({"feature_set": Registry(root).attach_head(feature_set, head, classes=names, version=version)})
        )


@app.command("import")
def import_model(
    model: ModelOpt,
    version: Annotated[str | None, typer.Option(help="Version name (default: model-<time>-<fingerprint>).")] = None,
    registry: RegistryOpt = None,
    arch: ArchOpt = None,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
) -> None:
    """Register an encoder file once, so the service and the jobs can name it."""
    from models.registry.versions import Registry
    from qscore_config.settings import get_settings

    with user_errors():
        root = registry or get_settings().registry_root
        record = Registry(root).import_model(model, version=version, arch=arch, **preprocessing(image_size, mean, std))
        typer.echo(record.model_dump_json())


@app.command("import-features")
def import_features(
    features: Annotated[
        Path, typer.Option(help="Feature-set JSON from `qscore discover` or `evaluate --calibrated-out`.")
    ],
    version: Annotated[str | None, typer.Option(help="Version name (default: features-<time>-<fingerprint>).")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Register a feature set (with its bank and head) for a model the registry holds."""
    from models.registry.versions import Registry
    from models.scoring.feature_set import FeatureSet
    from qscore_config.settings import get_settings

    with user_errors():
        reg = Registry(registry or get_settings().registry_root)
        feature_set = FeatureSet.load(features)
        fingerprint = feature_set.encoder.fingerprint
        models = [m.version for m in reg.list_models() if m.fingerprint == fingerprint]
        if not models:
            raise ValueError(
                f"the registry {reg.root} holds no model with fingerprint {fingerprint[:12]}, the encoder this "
                "feature set was found on: register that encoder first (`qscore import --model FILE`)"
            )
        # named after the model, so that the registry checks the preprocessing fits too
        ref = feature_set.encoder.model_copy(update={"model_version": models[0]})
        added = reg.add_feature_set(feature_set.model_copy(update={"encoder": ref}), version=version)
        typer.echo(json.dumps({"feature_set": added, "model": models[0]}))


@app.command()
def activate(
    model: Annotated[str, typer.Option(help="Model version in the registry.")],
    feature_set: Annotated[str | None, typer.Option(help="Feature-set version (default: the model's latest).")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Make a model and feature set the registry's active pair: what `qscore serve` serves (a running
    service follows it with QSCORE_AUTO_SWITCH)."""
    from models.registry.versions import Registry
    from qscore_config.settings import get_settings

    with user_errors():
        reg = Registry(registry or get_settings().registry_root)
        record = reg.model_record(model)
        chosen = feature_set or reg.latest_feature_set_for(record.fingerprint)
        if chosen is None:
            raise ValueError(
                f"model {model!r} has no feature set in the registry: `qscore discover` it, then "
                "`qscore import-features`"
            )
        typer.echo(reg.set_active(model, chosen).model_dump_json(exclude_none=True))


@app.command()
def convert(
    checkpoint: Annotated[Path, typer.Option(help="Weights to convert: a checkpoint or safetensors file.")],
    out: Annotated[Path, typer.Option(help="Where to write the encoder (.safetensors, with its spec).")],
    arch: ArchOpt = None,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
) -> None:
    """Turn a checkpoint plus its architecture into a self-describing safetensors file."""
    from models.encoders.loading import save_encoder

    with user_errors():
        imported = load_model(checkpoint, arch, image_size, mean, std)
        kinds = {
            "torchscript": "a TorchScript module",
            "onnx": "an ONNX model",
            "torch_export": "a torch.export program",
        }
        if imported.encoder.spec.source in kinds:
            raise ValueError(
                f"{checkpoint} is {kinds[imported.encoder.spec.source]}: use it as it is (--model {checkpoint}); "
                "it has no architecture qscore could rebuild from a state dict"
            )
        if out.suffix != ".safetensors":
            raise ValueError(f"--out must end in .safetensors, got {out}")
        digest = save_encoder(imported.encoder, out, {"converted_from": checkpoint.name})
        typer.echo(json.dumps({"out": str(out), "fingerprint": digest, "arch": imported.encoder.spec.arch}))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
) -> None:
    """Start the scoring service (uvicorn), on the embedded demo model unless configured."""
    with user_errors():  # bad settings or a pair that cannot be served: one line, before uvicorn starts
        from qscore_config.settings import get_settings

        settings = get_settings()
        from service.server import run as run_server  # its imports read the settings too
        from service.server import startup_pair

        startup_pair(settings)
    run_server(host=host, port=port)


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option(help="Worker processes (1 per GPU).")] = 1,
    pool: Annotated[str, typer.Option(help="Celery pool: prefork (time limits work) or solo.")] = "prefork",
    loglevel: str = "INFO",
) -> None:
    """Start a Celery worker with the project's settings."""
    from worker.runner import run_worker

    run_worker(concurrency=concurrency, pool=pool, loglevel=loglevel)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
