"""The service with ONNX Runtime as the engine (issue 18), against real uvicorn servers.

One registry holds the packaged demo ResNet, a timm encoder and the shared TorchScript ResNet-20,
each with features discovered on CIFAR-10 images; a server with ``QSCORE_RUNTIME=torch`` and one
with ``onnxruntime`` score the same real images, which must get the same scores within 1e-5
relative. The ONNX Runtime server exports the demo at start-up and the others when it switches
to them (the hot swap), and its export of the demo is then brought back as an ONNX encoder:
uploaded, discovered by a job, served, and refused for fine-tuning.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from service_helpers import LiveServer, make_settings

from models.data.datasets import image_folder
from models.data.transforms import eval_transform
from models.discovery.discover import discover, make_selection
from models.encoders.runtime import export_path
from models.registry.versions import Registry
from models.scoring.feature_set import EncoderRef
from qscore_config.settings import Settings, usable_cores
from service.state import load_state
from tests.shared_encoders import RESNET20_PREPROCESSING, RESNET20_TORCHSCRIPT

SCORES = ("q_score", "l1_norm", "typicality", "risk")


def add_discovered(registry: Registry, version: str, cifar_slice: Path) -> None:
    """Features of model ``version`` found on the slice's training images, as feature set ``version``."""
    imported = registry.load_model(version)
    spec = imported.encoder.spec
    fs = discover(
        imported.encoder,
        image_folder(cifar_slice / "train", eval_transform(spec)),
        dataset_name="slice-train",
        encoder_ref=EncoderRef(
            fingerprint=imported.fingerprint, arch=spec.arch, feature_dim=spec.feature_dim, model_version=version
        ),
        eps="auto",
        selection=make_selection(),
        sample_size=None,
        batch_size=100,
    )
    registry.add_feature_set(fs, version=version)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, cifar_slice: Path) -> Registry:
    """demo (active), 'timm' (a seeded timm test_resnet at 32 px) and 'r20' (TorchScript, when shared)."""
    root = tmp_path_factory.mktemp("runtime")
    registry = Registry(root / "registry")
    registry.seed_demo()
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "timm.safetensors"))
    registry.import_model(root / "timm.safetensors", version="timm", arch="timm:test_resnet", image_size=32)
    add_discovered(registry, "timm", cifar_slice)
    if RESNET20_TORCHSCRIPT.is_file():
        registry.import_model(RESNET20_TORCHSCRIPT, version="r20", **RESNET20_PREPROCESSING)
        add_discovered(registry, "r20", cifar_slice)
    return registry


@pytest.fixture(scope="module")
def servers(registry: Registry, cifar_slice: Path) -> Iterator[dict[str, LiveServer]]:
    datasets = {"slice-train": cifar_slice / "train"}
    started: dict[str, LiveServer] = {}
    try:
        for runtime in ("torch", "onnxruntime"):
            settings = make_settings(
                registry.root,
                runtime=runtime,
                intra_op_threads=1,
                datasets=datasets,
                max_files=16,
                job_checkpoint_dir=registry.root.parent / f"checkpoints-{runtime}",
            )
            started[runtime] = LiveServer(settings).__enter__()
        yield started
    finally:
        for live in started.values():
            live.__exit__()


def client(server: LiveServer) -> httpx.Client:
    # an export at a switch takes seconds to tens of seconds on a busy 2-core machine
    return httpx.Client(base_url=server.url, timeout=600)


def score(server: LiveServer, images: list[Path]) -> list[dict]:
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in images]
    with client(server) as c:
        response = c.post("/score", files=files)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_the_onnxruntime_server_starts_ready_on_an_export_of_the_demo(servers, registry: Registry) -> None:
    with client(servers["onnxruntime"]) as c:
        assert c.get("/readyz").status_code == 200
        serving = c.get("/admin/active").json()["serving"]
    assert (serving["runtime"], serving["providers"], serving["signal_graph"]) == (
        "onnxruntime",
        ["CPUExecutionProvider"],
        True,
    )
    record = registry.model_record("demo")
    assert export_path(registry.exports_dir, record.fingerprint, record.spec).is_file()
    with client(servers["torch"]) as c:
        serving = c.get("/admin/active").json()["serving"]
    assert (serving["runtime"], serving["signal_graph"]) == ("torch", False)


def test_a_served_onnxruntime_session_gets_every_usable_core_by_default(servers, registry: Registry) -> None:
    """torch keeps a core for the event loop; ONNX Runtime's idle threads sleep, so it gets them all."""
    settings = make_settings(registry.root, runtime="onnxruntime", intra_op_threads=None, torch_threads=None)
    state = load_state(registry, "demo", "demo", settings)  # the export the server made, from the cache
    assert state.scorer.engine.onnx_source == "cache"
    options = state.scorer.engine.forward.session.get_session_options()
    assert options.intra_op_num_threads == usable_cores() == settings.onnxruntime_threads
    pinned = make_settings(registry.root, runtime="onnxruntime", intra_op_threads=1)
    session = load_state(registry, "demo", "demo", pinned).scorer.engine.forward.session
    assert session.get_session_options().intra_op_num_threads == 1


@pytest.mark.parametrize("version", ["demo", "timm", "r20"])
def test_scores_are_the_same_with_either_runtime(servers, registry: Registry, cifar_slice: Path, version) -> None:
    if version == "r20" and not RESNET20_TORCHSCRIPT.is_file():
        pytest.skip(f"{RESNET20_TORCHSCRIPT} is absent (the shared folder ../shared/models beside the checkout)")
    for server in servers.values():  # the hot swap; the onnxruntime server exports the encoder now
        with client(server) as c:
            switched = c.post("/admin/switch", json={"model": version, "feature_set": version, "persist": False})
        assert switched.status_code == 200, switched.text
    assert switched.json()["runtime"] == "onnxruntime"
    record = registry.model_record(version)
    assert export_path(registry.exports_dir, record.fingerprint, record.spec).is_file()

    images = [p for cls in ("cat", "ship", "frog", "truck") for p in sorted((cifar_slice / "test" / cls).iterdir())[:4]]
    by_torch, by_ort = score(servers["torch"], images), score(servers["onnxruntime"], images)
    assert [r["filename"] for r in by_ort] == [p.name for p in images]
    for name in SCORES:
        want = [r[name] for r in by_torch]
        got = [r[name] for r in by_ort]
        if want[0] is None:  # a feature set without that score (risk before an evaluation)
            assert got == want, name
            continue
        assert got == pytest.approx(want, rel=1e-5, abs=1e-9), name
    assert [r["low_quality"] for r in by_ort] == [r["low_quality"] for r in by_torch]
    assert any(r["q_score"] > 0 for r in by_torch)


def wait_for_job(c: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = c.get(f"/jobs/{job_id}").json()
        if record["state"] in ("succeeded", "failed", "cancelled"):
            return record
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def test_an_onnx_encoder_is_imported_discovered_served_and_not_fine_tuned(servers, registry: Registry) -> None:
    demo = registry.model_record("demo")
    exported = export_path(registry.exports_dir, demo.fingerprint, demo.spec)  # written at start-up
    server = servers["torch"]  # ONNX encoders run on ONNX Runtime whatever QSCORE_RUNTIME says
    with client(server) as c:
        form = {
            "version": "demo-onnx",
            "mean": ",".join(map(str, demo.spec.mean)),
            "std": ",".join(map(str, demo.spec.std)),
        }
        uploaded = c.post("/admin/models", data=form, files={"file": ("demo.onnx", exported.read_bytes())})
        assert uploaded.status_code == 201, uploaded.text
        body = uploaded.json()
        # the export's fixed 32x32 input is the default image size; 128 features like the demo
        assert (body["arch"], body["image_size"], body["feature_dim"]) == ("onnx", 32, 128)
        assert (registry.model_dir("demo-onnx") / "encoder.onnx").read_bytes() == exported.read_bytes()

        refused = c.post(
            "/jobs/regularize", json={"dataset": "slice-train", "model": "demo-onnx", "feature_set": "demo"}
        )
        assert refused.status_code == 422, refused.text
        detail = refused.json()["detail"]
        assert detail["code"] == "invalid_request" and detail["errors"][0]["loc"] == ["body", "model"]
        assert "cannot regularize model 'demo-onnx'" in detail["message"]
        assert "ONNX encoders are inference exports" in detail["message"]
        assert c.get("/jobs").json() == {"jobs": []}  # nothing was queued

        job = c.post(
            "/jobs/discover", json={"dataset": "slice-train", "model": "demo-onnx", "eps": "auto", "sample_size": 300}
        )
        assert job.status_code == 202, job.text
        record = wait_for_job(c, job.json()["job_id"])
        assert record["state"] == "succeeded", record
        feature_set = record["artifacts"]["feature_set"]
        switched = c.post("/admin/switch", json={"model": "demo-onnx", "feature_set": feature_set, "persist": False})
        assert switched.status_code == 200, switched.text
        assert (switched.json()["runtime"], switched.json()["model"]["arch"]) == ("onnxruntime", "onnx")


def test_thread_and_runtime_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("QSCORE_INTRA_OP_THREADS", "QSCORE_TORCH_THREADS", "QSCORE_RUNTIME", "QSCORE_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    assert Settings(_env_file=None).inference_threads == max(1, usable_cores() - 1)
    assert Settings(_env_file=None).onnxruntime_threads == usable_cores()  # its idle threads sleep
    assert usable_cores() == len(os.sched_getaffinity(0))
    assert Settings(_env_file=None).runtime == "torch"
    monkeypatch.setenv("QSCORE_TORCH_THREADS", "3")  # the deprecated name still works
    assert Settings(_env_file=None).inference_threads == 3
    assert Settings(_env_file=None).onnxruntime_threads == 3
    monkeypatch.setenv("QSCORE_INTRA_OP_THREADS", "2")  # and the new one wins
    assert (Settings(_env_file=None).inference_threads, Settings(_env_file=None).onnxruntime_threads) == (2, 2)
    monkeypatch.setenv("QSCORE_RUNTIME", "onnxruntime")
    monkeypatch.setenv("QSCORE_PRECISION", "float16")
    with pytest.raises(ValueError, match="QSCORE_PRECISION=float16 is a torch setting"):
        Settings(_env_file=None)
    monkeypatch.setenv("QSCORE_RUNTIME", "tensorrt")
    with pytest.raises(ValueError, match="runtime"):
        Settings(_env_file=None)


def test_the_monitor_keeps_the_class_probabilities_the_signal_graph_computed(
    servers, registry: Registry, cifar_slice: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ONNX Runtime the head's probabilities come out of the signal graph with the verdicts, and
    the monitor's window (COTT's input) keeps them in place of running the head again."""
    server = servers["onnxruntime"]  # in this process: a head run by the monitor fails the batch
    monkeypatch.setattr("models.monitoring.monitor.head_probabilities", lambda *a: pytest.fail("the head ran"))
    with client(server) as c:
        switched = c.post("/admin/switch", json={"model": "demo", "feature_set": "demo", "persist": False})
    assert switched.status_code == 200 and switched.json()["signal_graph"] is True
    images = sorted((cifar_slice / "test" / "horse").iterdir())[:6]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in images]
    with client(server) as c:
        response = c.post("/score?predict=true", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    window = server.app.state.monitor._models["demo"].window
    kept = window.probabilities[[(window.seen - len(images) + i) % window.capacity for i in range(len(images))]]
    classes = registry.load_feature_set("demo").classifier.classes
    assert kept.shape == (len(images), len(classes))
    np.testing.assert_allclose(kept.sum(axis=1), 1.0, rtol=1e-5)
    assert [classes[i] for i in kept.argmax(axis=1)] == [r["predicted_class"] for r in results]
    assert kept.max(axis=1) == pytest.approx([r["confidence"] for r in results], rel=1e-5)
