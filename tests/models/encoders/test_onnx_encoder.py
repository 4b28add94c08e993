"""ONNX and torch.export encoders (issue 18): loading, the probe's refusals, the registry, the
command line; their representations against the torch module's on real CIFAR-10 images."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from models.data.datasets import image_folder
from models.data.transforms import eval_transform
from models.encoders.errors import CheckpointError, ExportProgramError, OnnxError, OutputCheckError
from models.encoders.layouts import is_export_program, is_onnx, is_torchscript
from models.encoders.loading import load_encoder
from models.encoders.spec import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from models.registry.versions import Registry
from models.scoring.representations import extract_representations
from tests.cli.runner import run_cli

CIFAR = {"mean": CIFAR_MEAN, "std": CIFAR_STD}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny modules gain nothing from two threads, and spin-waiting threads on a shared machine lose much.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Small(nn.Module):
    """conv-BN-ReLU twice, global average pool: (N, 3, S, S) -> (N, 16), with trained BN statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


class FeatureMap(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2] * 2.0  # (N, 2, S, S): a feature map, not a representation


class TwoOutputs(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.mean(dim=(2, 3)), x.amax(dim=(2, 3))


def small_module() -> Small:
    torch.manual_seed(0)
    module = Small().train()
    with torch.no_grad():  # running statistics unlike the defaults, so that folding them matters
        for _ in range(3):
            module(torch.randn(8, 3, 32, 32) * 1.5 + 0.3)
    return module.eval()


def to_onnx(module: nn.Module, path: Path, dynamic: bool = True, size: int = 32) -> Path:
    x = torch.rand(2, 3, size, size)
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    program = torch.onnx.export(module.eval(), (x,), dynamo=True, dynamic_shapes=shapes, verbose=False)
    program.save(str(path), external_data=False)
    return path


def to_pt2(module: nn.Module, path: Path, dynamic: bool = True, size: int = 32) -> Path:
    x = torch.rand(2, 3, size, size)
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    torch.export.save(torch.export.export(module.eval(), (x,), dynamic_shapes=shapes), str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The small module, exported once to ONNX and to a torch.export archive (dynamic batch)."""
    folder = tmp_path_factory.mktemp("exports")
    module = small_module()
    torch.save(module.state_dict(), folder / "small-state.pt")
    return {"onnx": to_onnx(module, folder / "small.onnx"), "pt2": to_pt2(module, folder / "small.pt2")}


def test_kinds_are_told_apart_by_their_bytes(files: dict[str, Path], tmp_path: Path) -> None:
    renamed = tmp_path / "upload"  # an upload without a suffix: the bytes say what it is
    renamed.write_bytes(files["onnx"].read_bytes())
    assert is_onnx(files["onnx"]) and is_onnx(renamed)
    assert not is_export_program(renamed) and not is_torchscript(renamed)
    assert is_export_program(files["pt2"]) and not is_onnx(files["pt2"]) and not is_torchscript(files["pt2"])
    assert not is_export_program(files["pt2"].parent / "small-state.pt")  # a torch.save zip
    assert not is_onnx(files["pt2"].parent / "small-state.pt")
    assert load_encoder(renamed).source_layout == "onnx"


@pytest.mark.parametrize("kind", ["onnx", "pt2"])
def test_exported_encoders_give_the_modules_h_on_cifar_images(files, kind, cifar_slice: Path) -> None:
    imported = load_encoder(files[kind], **CIFAR)
    spec = imported.encoder.spec
    # the input size is the file's own (fixed at 32 by the export); mean and std as passed
    assert (spec.arch, spec.image_size, spec.dim, spec.mean, spec.std) == (
        {"onnx": "onnx", "pt2": "torch_export"}[kind], 32, 16, CIFAR_MEAN, CIFAR_STD,
    )  # fmt: skip
    assert imported.source_layout == {"onnx": "onnx", "pt2": "torch_export"}[kind]
    assert imported.encoder.not_trainable_reason() is not None
    dataset = image_folder(cifar_slice / "test", eval_transform(spec))
    h, _ = extract_representations(imported.encoder, dataset, batch_size=37)  # batches of 37 and 26
    want, _ = extract_representations(small_module(), dataset, batch_size=100)
    assert h.shape == want.shape == (100, 16)
    gap = float((h - want).abs().max() / want.abs().max())
    assert gap <= 1e-5, gap


@pytest.mark.parametrize("kind", ["onnx", "pt2"])
def test_defaults_are_imagenet_statistics_and_the_files_size(files, kind) -> None:
    spec = load_encoder(files[kind]).encoder.spec
    assert (spec.image_size, spec.mean, spec.std) == (32, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(OutputCheckError, match=r"takes 32x32 images, not 64x64: pass --image-size 32"):
        load_encoder(files[kind], image_size=64)


def test_fixed_batch_exports_are_refused_naming_the_fix(tmp_path: Path) -> None:
    onnx_path = to_onnx(small_module(), tmp_path / "fixed.onnx", dynamic=False)
    with pytest.raises(OutputCheckError, match=r"fixed batch size of 2 .*dynamic_shapes=\(\{0: torch.export.Dim"):
        load_encoder(onnx_path)
    pt2_path = to_pt2(small_module(), tmp_path / "fixed.pt2", dynamic=False)
    with pytest.raises(OutputCheckError, match=r"fixed batch size of 2 .*torch.export.export\(model, \(x,\), dynamic"):
        load_encoder(pt2_path)
    registry = Registry(tmp_path / "registry")
    with pytest.raises(OutputCheckError, match="fixed batch size"):
        registry.import_model(onnx_path, version="fixed")
    assert registry.list_models() == []


@pytest.mark.parametrize("export", [to_onnx, to_pt2])
def test_a_feature_map_is_refused(tmp_path: Path, export) -> None:
    path = export(FeatureMap(), tmp_path / "map.bin")
    needle = r"maps a \(2, 3, 32, 32\) batch to shape \(2, 2, 32, 32\), expected \(2, r\)"
    with pytest.raises(OutputCheckError, match=needle):
        load_encoder(path)


def test_other_bad_onnx_files_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(OutputCheckError, match=r"returns 2 outputs .*expected one \(N, r\) tensor"):
        load_encoder(to_onnx(TwoOutputs(), tmp_path / "two.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x0a\x12\x07garbage")
    with pytest.raises(OnnxError, match="is not a loadable ONNX model"):
        load_encoder(tmp_path / "junk.onnx")
    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pt")
    with pytest.raises(OnnxError, match="is not an ONNX model"):
        load_encoder(tmp_path / "sd.pt", arch="onnx")
    with pytest.raises(CheckpointError, match="is an ONNX model, not a state dict"):
        load_encoder(tmp_path / "junk.onnx", arch="timm:test_resnet")


def test_pt2_archives_with_pickled_parts_are_refused_before_loading(files, tmp_path: Path) -> None:
    # torch.export.load would torch.load(weights_only=False) a weight marked use_pickle
    tampered = tmp_path / "pickled.pt2"
    with zipfile.ZipFile(files["pt2"]) as source, zipfile.ZipFile(tampered, "w") as out:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"]))
                config["config"][first]["use_pickle"] = True
                data = json.dumps(config).encode()
            out.writestr(item, data)
    needle = r"parts torch.export.load would unpickle \(data/weights/.*: body\.0\.weight"
    with pytest.raises(ExportProgramError, match=needle):
        load_encoder(tampered)


@pytest.mark.parametrize(("kind", "file_name"), [("onnx", "encoder.onnx"), ("pt2", "encoder.pt2")])
def test_registry_keeps_the_file_and_its_preprocessing(files, kind, file_name, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    record = registry.import_model(files[kind], version="small", **CIFAR)
    folder = registry.model_dir("small")
    assert sorted(p.name for p in folder.iterdir()) == [file_name, "model.json"]
    assert (folder / file_name).read_bytes() == files[kind].read_bytes()
    assert (record.spec.image_size, record.spec.dim, record.spec.mean) == (32, 16, CIFAR_MEAN)
    assert record.imported_from == files[kind].name
    loaded = registry.load_model("small")
    assert loaded.fingerprint == record.fingerprint and loaded.encoder.spec == record.spec
    # an encoder object is written back in its own format (what a job that re-saves would do)
    again = registry.add_model(loaded.encoder, version="small-again")
    assert again.fingerprint == record.fingerprint
    assert (registry.model_dir("small-again") / file_name).is_file()


def test_regularize_and_convert_refuse_onnx_and_pt2_with_exit_2(files, tmp_path: Path) -> None:
    for kind, needle in (("onnx", "ONNX encoders are inference exports"), ("pt2", "torch.export programs are")):
        out = tmp_path / f"{kind}-tuned.safetensors"
        result = run_cli(
            "regularize",
            "--model",
            files[kind],
            "--features",
            tmp_path / "f.json",
            "--data",
            tmp_path,
            "--out",
            out,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert "cannot regularize" in result.stderr and needle in result.stderr
        assert not out.exists()
    converted = run_cli("convert", "--checkpoint", files["onnx"], "--out", tmp_path / "c.safetensors", check=False)
    assert converted.returncode == 2 and "is an ONNX model: use it as it is" in converted.stderr


def external_export(folder: Path, module: nn.Module | None = None) -> Path:
    """The small module as ``torch.onnx.export`` saves it by default: ``small.onnx`` beside ``small.onnx.data``."""
    folder.mkdir(parents=True, exist_ok=True)
    x = torch.rand(2, 3, 32, 32)
    shapes = ({0: torch.export.Dim("batch", min=1)},)
    module = module if module is not None else small_module()
    torch.onnx.export(module, (x,), str(folder / "small.onnx"), dynamo=True, dynamic_shapes=shapes)
    assert (folder / "small.onnx.data").is_file()  # torch's default: the tensors apart
    return folder / "small.onnx"


def test_external_data_is_read_in_and_kept_as_one_file(files, tmp_path: Path) -> None:
    path = external_export(tmp_path / "export")
    imported = load_encoder(path)
    one_file = load_encoder(files["onnx"])
    x = torch.rand(5, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(imported.encoder(x), one_file.encoder(x), rtol=1e-5, atol=1e-6)
    assert load_encoder(path).fingerprint == imported.fingerprint  # the same bytes every time
    registry = Registry(tmp_path / "registry")
    record = registry.import_model(path, version="external")
    assert record.fingerprint == imported.fingerprint
    assert sorted(p.name for p in registry.model_dir("external").iterdir()) == ["encoder.onnx", "model.json"]
    (tmp_path / "export" / "small.onnx.data").unlink()  # the registry's copy needs nothing beside the original
    with torch.inference_mode():
        assert torch.allclose(registry.load_model("external").encoder(x), one_file.encoder(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(OnnxError, match=r"keeps tensor .* in 'small.onnx.data', which is not beside it"):
        load_encoder(path)


def test_external_data_outside_the_models_folder_is_refused(tmp_path: Path) -> None:
    import onnx

    path = external_export(tmp_path / "inner" / "export")
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    (tmp_path / "inner" / "outside.data").write_bytes((path.parent / "small.onnx.data").read_bytes())
    onnx.save_model(model, str(path))
    registry = Registry(tmp_path / "registry")
    with pytest.raises(OnnxError, match=r"names external data '../outside.data' outside its own folder"):
        registry.import_model(path, version="escape")
    assert registry.list_models() == []


def test_the_fingerprint_of_an_external_data_model_sees_its_tensors(tmp_path: Path) -> None:
    # the graph files of two exports of the same architecture are the same bytes; the weights are not
    first = external_export(tmp_path / "a")
    other = small_module()
    with torch.no_grad():
        other.body[3].weight.mul_(-1.0)  # a large tensor, kept in the .data file
    second = external_export(tmp_path / "b", other)
    assert first.read_bytes() == second.read_bytes()
    assert load_encoder(first).fingerprint != load_encoder(second).fingerprint
