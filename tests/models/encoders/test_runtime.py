"""The inference engine (issue 18): ONNX Runtime on an export made once and cached by fingerprint,
checked against torch; ``auto`` falling back to torch, saying why; threads and providers."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models.encoders.checks import check_inputs
from models.encoders.errors import OnnxError, RuntimeUnavailable
from models.encoders.loading import load_encoder
from models.encoders.onnx_encoder import OnnxEncoder, load_onnx
from models.encoders.runtime import Runtime, export_onnx, export_path, torch_threads
from models.encoders.spec import Encoder, EncoderSpec
from models.registry.versions import Registry
from models.storage.atomic import TEMP_PREFIX

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SmallEncoder(Encoder):
    """conv-BN-ReLU, pooled: (N, 3, 16, 16) -> (N, 8); ``seed`` gives other weights."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.spec = EncoderSpec(arch="timm:small", cifar_stem=False, image_size=16, dim=8)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.train()
        with torch.no_grad():
            self.body(torch.randn(8, 3, 16, 16) + 0.5)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


class SvdEncoder(Encoder):
    """Singular values of the channel mean: torch runs it, ONNX has no SVD, so it does not export."""

    def __init__(self) -> None:
        super().__init__()
        self.spec = EncoderSpec(arch="timm:svd", cifar_stem=False, image_size=16, dim=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(x.mean(1))


FINGERPRINT = "ab" * 32


def probe(encoder: Encoder, n: int = 5) -> torch.Tensor:
    return check_inputs(n, encoder.spec.image_size, encoder.spec.mean, encoder.spec.std, seed=3)


def relative_gap(engine, encoder: Encoder) -> float:
    x = probe(encoder)
    with torch.inference_mode():
        want = encoder(x)
        return float((engine(x) - want).abs().max() / want.abs().max())


def test_the_export_is_written_atomically_once_and_reused(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    encoder = SmallEncoder()
    runtime = Runtime("onnxruntime", intra_op_threads=1, cache_dir=registry.exports_dir)
    first = runtime.engine(encoder, FINGERPRINT, CPU)
    assert (first.name, first.onnx_source, first.providers) == ("onnxruntime", "exported", ("CPUExecutionProvider",))
    path = export_path(registry.exports_dir, FINGERPRINT, encoder.spec)
    assert path.name == f"{FINGERPRINT}-timm-small-16px.onnx"
    # the folder holds the export and nothing else: written to a temporary name, renamed whole
    assert sorted(registry.exports_dir.iterdir()) == [path]
    assert relative_gap(first, encoder) <= 1e-5
    assert load_onnx(path)[0].spec.image_size == 16  # a complete ONNX file, dynamic batch
    before = path.stat()

    second = runtime.engine(encoder, FINGERPRINT, CPU)
    assert second.onnx_source == "cache"  # not exported again
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (before.st_ino, before.st_mtime_ns, before.st_size)
    assert relative_gap(second, encoder) <= 1e-5

    # another process killed mid-export leaves only a temporary file, which clean() removes
    leftover = registry.exports_dir / f"{TEMP_PREFIX}abc.onnx"
    leftover.write_bytes(b"half an export")
    assert registry.clean() == [leftover]
    assert sorted(registry.exports_dir.iterdir()) == [path]


def test_a_damaged_or_stale_cached_export_is_exported_again(tmp_path: Path, caplog) -> None:
    encoder = SmallEncoder()
    runtime = Runtime("onnxruntime", intra_op_threads=1, cache_dir=tmp_path)
    path = export_path(tmp_path, FINGERPRINT, encoder.spec)
    path.write_bytes(b"\x08\x0a\x12 truncated")
    with caplog.at_level(logging.WARNING, logger="models.encoders.runtime"):
        engine = runtime.engine(encoder, FINGERPRINT, CPU)
    assert engine.onnx_source == "exported" and "is not usable" in caplog.text
    assert relative_gap(engine, encoder) <= 1e-5
    # a loadable export of other weights under this name (a stale cache) fails the check against torch
    path.write_bytes(export_onnx(SmallEncoder(seed=1)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models.encoders.runtime"):
        engine = runtime.engine(encoder, FINGERPRINT, CPU)
    assert engine.onnx_source == "exported" and "differ from torch's" in caplog.text
    assert relative_gap(engine, encoder) <= 1e-5
    assert runtime.engine(encoder, FINGERPRINT, CPU).onnx_source == "cache"


def test_auto_falls_back_to_torch_when_the_encoder_does_not_export(tmp_path: Path) -> None:
    encoder = SvdEncoder()
    engine = Runtime("auto", cache_dir=tmp_path).engine(encoder, FINGERPRINT, CPU)
    assert engine.name == "torch" and engine.forward is encoder
    assert engine.fallback_reason is not None
    assert "does not export to ONNX" in engine.fallback_reason and "aten._linalg_svd" in engine.fallback_reason
    assert list(tmp_path.iterdir()) == []  # nothing cached
    with pytest.raises(RuntimeUnavailable, match=r"QSCORE_RUNTIME=onnxruntime cannot run encoder abababababab .*svd"):
        Runtime("onnxruntime", cache_dir=tmp_path).engine(encoder, FINGERPRINT, CPU)


def test_auto_falls_back_to_torch_without_onnxruntime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx_file = tmp_path / "small.onnx"
    onnx_file.write_bytes(export_onnx(SmallEncoder()))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when it is absent
    engine = Runtime("auto", cache_dir=tmp_path).engine(SmallEncoder(), FINGERPRINT, CPU)
    assert engine.name == "torch" and "pip install onnxruntime" in (engine.fallback_reason or "")
    with pytest.raises(RuntimeUnavailable, match="ONNX Runtime is not installed"):
        Runtime("onnxruntime").engine(SmallEncoder(), FINGERPRINT, CPU)
    with pytest.raises(OnnxError, match="pip install onnxruntime"):
        load_onnx(onnx_file)


def test_reduced_precision_stays_on_torch() -> None:
    engine = Runtime("auto").engine(SmallEncoder(), FINGERPRINT, CPU, precision="float16")
    assert engine.name == "torch" and "is a torch setting" in (engine.fallback_reason or "")


def test_onnx_encoders_always_run_on_onnxruntime_with_the_runtimes_threads(tmp_path: Path) -> None:
    onnx_file = tmp_path / "small.onnx"
    onnx_file.write_bytes(export_onnx(SmallEncoder()))
    encoder, _ = load_onnx(onnx_file)
    for kind, threads in (("torch", 1), ("onnxruntime", 2)):
        engine = Runtime(kind, intra_op_threads=threads).engine(encoder, FINGERPRINT, CPU)
        assert (engine.name, engine.onnx_source) == ("onnxruntime", "file")
        assert isinstance(engine.forward, OnnxEncoder)
        assert engine.forward.session.get_session_options().intra_op_num_threads == threads
    exported = Runtime("onnxruntime", intra_op_threads=2).engine(SmallEncoder(), FINGERPRINT, CPU)
    assert exported.forward.session.get_session_options().intra_op_num_threads == 2


def test_a_torch_export_program_is_served_by_onnxruntime(tmp_path: Path) -> None:
    small = SmallEncoder()
    x = torch.rand(2, 3, 16, 16)
    program = torch.export.export(small, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(tmp_path / "small.pt2"))
    imported = load_encoder(tmp_path / "small.pt2", image_size=16)
    engine = Runtime("onnxruntime", intra_op_threads=1, cache_dir=tmp_path).engine(
        imported.encoder, imported.fingerprint, CPU
    )
    assert (engine.name, engine.onnx_source) == ("onnxruntime", "exported")
    assert export_path(tmp_path, imported.fingerprint, imported.encoder.spec).name.endswith("-torch_export-16px.onnx")
    assert relative_gap(engine, small) <= 1e-5


def test_unknown_runtime_is_refused() -> None:
    with pytest.raises(ValueError, match="runtime must be one of torch, onnxruntime, auto, got 'tensorrt'"):
        Runtime("tensorrt")  # type: ignore[arg-type]


def test_torch_threads_sets_the_count_for_the_block_and_restores_it() -> None:
    torch.set_num_threads(2)
    try:
        with torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with torch_threads(None):
            assert torch.get_num_threads() == 2
        with pytest.raises(KeyError), torch_threads(1):
            raise KeyError("boom")
        assert torch.get_num_threads() == 2  # restored on an error too
    finally:
        torch.set_num_threads(1)


def test_only_onnxruntime_on_the_cpu_asks_torch_for_one_thread(tmp_path: Path) -> None:
    assert Runtime("torch").engine(SmallEncoder(), FINGERPRINT, CPU).torch_threads is None
    assert Runtime("onnxruntime", 2).engine(SmallEncoder(), FINGERPRINT, CPU).torch_threads == 1
    onnx_file = tmp_path / "small.onnx"
    onnx_file.write_bytes(export_onnx(SmallEncoder()))
    encoder, _ = load_onnx(onnx_file)
    assert Runtime("torch").engine(encoder, FINGERPRINT, CPU).torch_threads == 1
