"""The reproduction pipeline end to end on the tiny preset (issue 5)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from experiments.config import PRESETS, get_config
from experiments.figures import FIGURES
from experiments.reproduce import run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REQUIRED = (
    "top1_full",
    "top1_discriminative_50",
    "top1_random_50",
    "auroc_q",
    "auprc_q",
    "accuracy_base_rate",
    "top1_baseline",
    "top1_regularized",
    "top1_control",
)


def _unit(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_tiny_pipeline_writes_every_figure_and_number_and_resumes(tmp_path: Path, cifar_root: Path) -> None:
    config = get_config("tiny")
    out, work = tmp_path / "out", tmp_path / "work"

    start = time.perf_counter()
    results = run(config, out, work, cifar_root)
    first = time.perf_counter() - start

    for stem in FIGURES:
        png = out / "figures" / f"{stem}.png"
        assert png.is_file(), f"missing figure {png.name}"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
    report = (out / "reproduction.md").read_text()
    for stem in FIGURES:
        assert f"figures/{stem}.png" in report
    assert "Side by side with the paper" in report and "90.83" in report
    assert (out / "reproduction.log").stat().st_size > 0

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["preset"] == "tiny" and on_disk["config"]["name"] == "tiny"
    assert on_disk["device"]["type"] == "cpu" and on_disk["device"]["name"]
    assert on_disk["durations_s"]["total_compute"] > 0
    for m in ("simclr", "byol"):
        r = on_disk[m]
        for key in REQUIRED:
            assert _unit(r[key]), f"{m}.{key} = {r.get(key)!r}"
        assert r["device"]
        for name, power in r["scores"].items():
            assert _unit(power["auroc"]) and _unit(power["auprc"]), name
        assert {row["eps"] for row in r["eps_sensitivity"]} == {"2", "4", "auto"}
        assert len(r["training_progress"]) == len(config.progress_points) + 1
        assert {"baseline", "regularized", "control"} <= set(r["regularization"])

    # A second run finds every stage cached: it skips them all and writes the same numbers.
    start = time.perf_counter()
    again = run(config, out, work, cifar_root)
    second = time.perf_counter() - start
    assert len(again["stages_skipped"]) >= 20
    assert second < first / 2
    for m in ("simclr", "byol"):
        for key in REQUIRED:
            assert again[m][key] == results[m][key]
    assert "skip simclr/pretrain (cached)" in (out / "reproduction.log").read_text()


def test_presets_are_complete_and_cpu_is_budgeted() -> None:
    assert {"tiny", "cpu", "gpu"} <= set(PRESETS)
    cpu, gpu = PRESETS["cpu"], PRESETS["gpu"]
    assert cpu.device == "cpu" and cpu.width <= 32
    assert gpu.width == 64 and gpu.pretrain_epochs >= 200 and gpu.reg_epochs == 100 and gpu.reg_lambda == 0.1
    assert get_config("cpu", seed=3).seed == 3
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("huge")
