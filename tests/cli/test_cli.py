"""The ``qscore`` command end to end on the CIFAR-10 slice (CPU, width 8): in this process, and the
installed script once (:mod:`tests.cli.runner`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.encoders.loading import load_encoder
from models.evaluation.defaults import DEFAULT_SHIFT_SAMPLES
from models.scoring.feature_set import FeatureSet
from service.schemas import ScoreResult
from tests.cli.runner import last_json, run_cli, run_installed


@pytest.fixture(scope="module")
def pipeline(cifar_slice: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """pretrain (2 steps) -> discover --eps auto, shared by the tests below."""
    out = tmp_path_factory.mktemp("cli")
    model = out / "model.safetensors"
    pretrain = last_json(
        run_cli(
            "pretrain",
            "--data",
            cifar_slice / "train",
            "--out",
            model,
            "--width",
            "8",
            "--max-steps",
            "2",
            "--batch-size",
            "32",
            "--epochs",
            "1",
            "--device",
            "cpu",
            "--seed",
            "0",
            "--log",
            out / "log.jsonl",
        ).stdout
    )
    features = out / "features.json"
    discovered = last_json(
        run_cli(
            "discover",
            "--model",
            model,
            "--data",
            cifar_slice / "train",
            "--out",
            features,
            "--eps",
            "auto",
            "--sample-size",
            "300",
            "--batch-size",
            "100",
            "--device",
            "cpu",
        ).stdout
    )
    return {
        "dir": out,
        "model": model,
        "features": features,
        "pretrain": pretrain,
        "discover": discovered,
    }


def test_pretrain_writes_a_loadable_encoder(pipeline):
    info = pipeline["pretrain"]
    assert info["steps"] == 2 and info["out"] == str(pipeline["model"])
    imported = load_encoder(pipeline["model"])
    assert imported.fingerprint == info["fingerprint"]
    assert imported.encoder.spec.width == 8 and imported.encoder.feature_dim == 64
    log_lines = (pipeline["dir"] / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log_lines] == [1, 2]


def test_discover_auto_writes_feature_set(pipeline):
    info = pipeline["discover"]
    fs = FeatureSet.load(pipeline["features"])
    assert fs.encoder.fingerprint == pipeline["pretrain"]["fingerprint"]
    assert fs.eps_mode == "auto" and info["eps"] == fs.eps
    assert set(info["coverage_by_eps"]) == {"4", "3.5", "3", "2.5", "2", "1.5"}
    # the largest eps reaching 90% coverage, or the best-covered one
    reaching = [float(e) for e, c in fs.coverage_by_eps.items() if c >= 0.9]
    if reaching:
        assert fs.eps == max(reaching)
    assert info["discriminative"] == len(fs.discriminative) and fs.alpha > 0
    assert fs.data.n_reference == 300


def test_score_json_lines(pipeline, cifar_slice, tmp_path):
    images = sorted((cifar_slice / "test").glob("*/*"))[:3]
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    result = run_cli(
        "score",
        images[0],
        bad,
        *images[1:],
        "--model",
        pipeline["model"],
        "--features",
        pipeline["features"],
        "--json",
        "--device",
        "cpu",
        check=False,
    )
    # a file that is not an image gets its own error line, and the exit status says so
    assert result.returncode == 1, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [row["path"] for row in rows] == [str(p) for p in [images[0], bad, *images[1:]]]  # as given
    err = next(row for row in rows if row["path"] == str(bad))
    assert err["error"]["code"] == "not_an_image"
    scored = [row for row in rows if row["path"] != str(bad)]
    assert [row["path"] for row in scored] == [str(p) for p in images]
    # the CLI row is /score's result entry, with the path in place of the file name
    http_fields = set(ScoreResult.model_fields) - {"filename"}
    assert all(set(row) == {"path"} | http_fields for row in rows)
    assert err["q_score"] is None and err["reasons"] is None
    assert all(row["error"] is None and isinstance(row["dominant"], list) for row in scored)
    alpha = FeatureSet.load(pipeline["features"]).alpha
    for row in scored:
        assert 0.0 <= row["q_score"] <= 1.0
        assert row["low_quality"] == (row["q_score"] < alpha)
        assert row["l1_norm"] > 0
        # typicality from the bank written beside features.json by discover
        assert row["typicality"] > 0 and row["atypical"] == (row["typicality"] > 1)
        assert row["reasons"] == (["q_below_alpha"] if row["low_quality"] else []) + (
            ["atypical"] if row["atypical"] else []
        )
        assert row["risk"] is None  # not calibrated by an evaluation


def test_explain_writes_decomposition_and_heatmaps(pipeline, cifar_slice, tmp_path):
    images = sorted((cifar_slice / "test").glob("*/*"))[:2]
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    out = tmp_path / "explained"
    common = ["--model", pipeline["model"], "--features", pipeline["features"], "--out", out, "--device", "cpu"]
    result = run_cli("explain", *images, bad, *common, "--top", "2", "--arrays", check=False)
    assert result.returncode == 1  # one file was not an image; the others were explained
    assert "notes.jpg\terror not_an_image" in result.stderr
    assert len(result.stdout.strip().splitlines()) == 2
    scores = [json.loads(line) for line in run_cli("score", *images, *common[:4], "--json").stdout.splitlines()]
    for image, scored in zip(images, scores, strict=True):
        report = json.loads((out / f"{image.stem}.json").read_text())
        assert (
            report["score"]["q_score"] == scored["q_score"] and report["decomposition"]["q_score"] == scored["q_score"]
        )
        features = report["heatmaps"]["features"]
        assert len(features) == 2 and report["heatmaps"]["method"] == "channel_map"
        maps = np.load(out / f"{image.stem}.maps.npz")
        for f in features:
            overlay = Image.open(out / f"{image.stem}.feature-{f['index']}.png")
            assert overlay.size == (96, 96)  # 32 px images drawn at 3x
            assert maps[f"feature_{f['index']}"].mean() == pytest.approx(f["value"], rel=1e-4, abs=1e-6)
        assert Image.open(out / f"{image.stem}.input.png").size == (96, 96)
        assert sorted(report["files"]) == sorted(p.name for p in out.glob(f"{image.stem}.*") if p.suffix != ".json")
    too_many = run_cli("explain", images[0], *common, "--top", "9", check=False)
    assert too_many.returncode == 2 and "--top must be between 1 and 8, got 9" in too_many.stderr


def test_score_bad_model_is_one_line_error(pipeline, cifar_slice, tmp_path):
    model = tmp_path / "model.pth"
    model.write_text("hello")
    image = sorted((cifar_slice / "test").glob("*/*"))[0]
    result = run_installed(
        "score",
        image,
        "--model",
        model,
        "--features",
        pipeline["features"],
        "--device",
        "cpu",
    )
    # the installed script, as a user runs it (main()'s logging included): one line, no traceback
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(model) in lines[0]


def test_evaluate_writes_report(pipeline, cifar_slice):
    report_path = pipeline["dir"] / "report.json"
    calibrated_path = pipeline["dir"] / "calibrated.json"
    summary = last_json(
        run_cli(
            "evaluate",
            "--model",
            pipeline["model"],
            "--features",
            pipeline["features"],
            "--train",
            cifar_slice / "train",
            "--test",
            cifar_slice / "test",
            "--out",
            report_path,
            "--calibrated-out",
            calibrated_path,
            "--no-compression",
            "--shift-samples",
            "20",
            "--batch-size",
            "100",
            "--device",
            "cpu",
        ).stdout
    )
    report = json.loads(report_path.read_text())
    assert 0.0 <= report["top1"] <= 1.0 and summary["top1"] == report["top1"]
    assert summary["risk"]["auroc"] == report["risk"]["combined"]["auroc"]
    assert summary["risk"]["clean_weight"] == report["risk"]["clean_weight"]
    assert summary["error_estimator"] == report["error_estimate"]["method"] in ("mean_risk", "atc", "cott")
    assert summary["error_estimate_window_error"] == report["error_estimate"]["window_error"]
    # the set-level correction is kept exactly where the report says so, and then it goes with the feature set
    assert summary["error_estimate_corrected"] == report["error_estimate"]["correction"]["kept"]
    assert 0.0 <= report["q_score"]["auroc"] <= 1.0
    assert report["n_train"] == 300 and report["n_test"] == 100
    calibrated = FeatureSet.load(calibrated_path)
    assert calibrated.risk_model is not None and calibrated.alpha == report["alpha"]
    assert (calibrated.error_estimator.correction is not None) == summary["error_estimate_corrected"]
    assert set(report["risk"]) >= {"per_signal", "combined", "probe_max_softmax"}
    assert calibrated.bank is not None  # the bank is written beside the calibrated copy too


def test_regularize_produces_a_new_model(pipeline, cifar_slice):
    out = pipeline["dir"] / "regularized.safetensors"
    info = last_json(
        run_cli(
            "regularize",
            "--model",
            pipeline["model"],
            "--features",
            pipeline["features"],
            "--data",
            cifar_slice / "train",
            "--out",
            out,
            "--max-steps",
            "2",
            "--batch-size",
            "32",
            "--lambda",
            "0.1",
            "--device",
            "cpu",
        ).stdout
    )
    assert info["steps"] == 2
    assert info["fingerprint"] != pipeline["pretrain"]["fingerprint"]
    assert load_encoder(out).fingerprint == info["fingerprint"]


def test_attach_head_makes_a_new_feature_set_version(tiny_registry, tmp_path):
    """The command's success path (its errors: tests/models/registry/test_attach_head.py)."""
    import torch

    dim = tiny_registry.load_feature_set("tiny").encoder.feature_dim
    names = [f"c{i}" for i in range(10)]
    torch.jit.save(torch.jit.script(torch.nn.Linear(dim, 10)), str(tmp_path / "head.pt"))
    out = run_cli("attach-head", "tiny", tmp_path / "head.pt", "--classes", ",".join(names), "--version", "tiny-mine",
                  "--registry", tiny_registry.root)  # fmt: skip
    assert last_json(out.stdout) == {"feature_set": "tiny-mine"}
    fs = tiny_registry.load_feature_set("tiny-mine")
    assert fs.head.kind == "torchscript" and fs.head.registered and fs.head.classes == names


def test_help_answers_without_importing_torch():
    """`qscore --help` and every command's help come from the command line alone: each command
    imports torch, the service or Celery when it runs, not when the command line is read."""
    commands = ["pretrain", "discover", "score", "explain", "evaluate", "regularize", "attach-head", "import",
                "import-features", "activate", "convert", "serve", "worker"]  # fmt: skip
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from qscore_cli.main import app\n"
        f"for args in [['--help']] + [[c, '--help'] for c in {commands!r}]:\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
        "    print(repr(result.output))\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'sklearn', 'fastapi', 'celery') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    *helps, loaded = done.stdout.strip().splitlines()
    assert loaded == "[]"
    assert all(c in helps[0] for c in commands)
    evaluate_help = helps[1 + commands.index("evaluate")]
    assert f"default: {DEFAULT_SHIFT_SAMPLES}" in evaluate_help


def test_a_registry_made_on_the_command_line_is_served(pipeline, tmp_path, monkeypatch):
    """import -> (serve refuses in one line) -> import-features -> activate -> the pair serve loads."""
    from models.registry.versions import Registry
    from qscore_config.settings import Settings
    from service.server import startup_pair

    root = tmp_path / "registry"
    run_cli("import", "--model", pipeline["model"], "--version", "mine", "--registry", root)
    monkeypatch.setenv("QSCORE_REGISTRY_ROOT", str(root))
    monkeypatch.setenv("QSCORE_MODEL_VERSION", "mine")
    refused = run_installed("serve", "--port", "1")  # the check comes before uvicorn binds the port
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    lines = [line for line in refused.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "no feature set for model 'mine'" in lines[0] and "qscore import-features" in lines[0]
    monkeypatch.delenv("QSCORE_MODEL_VERSION")
    no_pair = run_cli("activate", "--model", "mine", "--registry", root, check=False)
    assert no_pair.returncode == 2 and "`qscore import-features`" in no_pair.stderr
    added = last_json(run_cli("import-features", "--features", pipeline["features"], "--registry", root).stdout)
    assert added["model"] == "mine"
    active = last_json(run_cli("activate", "--model", "mine", "--registry", root).stdout)
    assert active == {"model": "mine", "feature_set": added["feature_set"]}
    assert startup_pair(Settings(registry_root=root)) == ("mine", added["feature_set"])
    fs = Registry(root).load_feature_set(added["feature_set"])
    assert fs.encoder.model_version == "mine" and fs.bank is not None  # the bank came along
    # a feature set whose encoder the registry does not hold
    other = tmp_path / "other"
    wrong = run_cli("import-features", "--features", pipeline["features"], "--registry", other, check=False)
    assert wrong.returncode == 2 and "holds no model with fingerprint" in wrong.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"QSCORE_DRIFT_EVERY": "1000"},
            "invalid settings: QSCORE_DRIFT_EVERY (1000) must not exceed QSCORE_MONITOR_WINDOW",
        ),
        (
            {"QSCORE_DRIFT_PERMUTATIONS": "299"},
            "invalid settings: QSCORE_DRIFT_PERMUTATIONS: Input should be greater than or equal to 300",
        ),
    ],
)
def test_serve_refuses_bad_settings_in_one_line(monkeypatch, tmp_path, env, message):
    """Read where the service's modules are first imported (the Celery app reads them): one line, exit 2."""
    monkeypatch.setenv("QSCORE_REGISTRY_ROOT", str(tmp_path / "registry"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    refused = run_installed("serve", "--port", "1")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    lines = [line for line in refused.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
