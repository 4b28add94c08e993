"""TorchScript encoders (issue 9): loading with preprocessing flags, the probe's refusals, the
registry, and the shared CIFAR-10 ResNet-20 end to end on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from models.data.datasets import image_folder
from models.data.transforms import eval_transform
from models.encoders.errors import CheckpointError, OutputCheckError
from models.encoders.layouts import is_torchscript
from models.encoders.loading import load_encoder
from models.encoders.spec import IMAGENET_MEAN, IMAGENET_STD
from models.registry.versions import Registry, RegistryError
from models.scoring.feature_set import FeatureSet
from models.scoring.qscore import q_score
from models.scoring.representations import extract_representations
from tests.cli.runner import last_json, run_cli
from tests.shared_encoders import RESNET20_FLAGS, RESNET20_PREPROCESSING, RESNET20_TORCHSCRIPT, shared_file


class Pooled(nn.Module):
    """A tiny encoder: conv, ReLU, global average pool: (N, 3, S, S) -> (N, 6), non-negative."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


class NotPooled(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2]  # (N, 2, S, S): a feature map, not a representation


class BatchDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, : x.shape[0] * 2]  # r = 2N


class NaNs(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x.mean(dim=(2, 3)) - 10.0)  # log of a negative number


class Zeros(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 8) * x.mean()  # the same (zero) features for every image


class Only32(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))  # fixed input size: anything but 32x32 fails


def script(module: nn.Module, path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def test_torchscript_gets_its_preprocessing_from_flags_and_defaults(tmp_path):
    path = script(Pooled(), tmp_path / "pooled.pt")
    assert is_torchscript(path)
    default = load_encoder(path)
    assert default.source_layout == "torchscript"
    spec = default.encoder.spec
    assert (spec.arch, spec.image_size, spec.mean, spec.std, spec.dim) == (
        "torchscript",
        224,
        IMAGENET_MEAN,
        IMAGENET_STD,
        6,
    )
    custom = load_encoder(path, image_size=40, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert (custom.encoder.spec.image_size, custom.encoder.spec.mean, custom.encoder.spec.std) == (
        40,
        (0.5, 0.5, 0.5),
        (0.25, 0.25, 0.25),
    )
    # the fingerprint hashes the tensors only: the same module with other flags is the same weights
    assert custom.fingerprint == default.fingerprint
    x = torch.rand(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(custom.encoder(x), torch.jit.load(str(path))(x))


@pytest.mark.parametrize(
    ("module", "flags", "needle"),
    [
        (NotPooled(), {}, r"maps a \(2, 3, 224, 224\) batch to shape \(2, 2, 224, 224\), expected \(2, r\)"),
        (
            BatchDependent(),
            {},
            r"different number of features per batch size \(4 for a batch of 2, 6 for a batch of 3\)",
        ),
        (NaNs(), {}, "outputs NaN or infinite values"),
        (Zeros(), {}, r"gives the same 8 features to 2 different random images \(the first: \[0, 0, 0, 0, \.\.\.\]\)"),
        (Only32(), {"image_size": 64}, r"fails on a probe batch of shape \(2, 3, 64, 64\).*--image-size"),
    ],
)
def test_bad_torchscript_modules_are_refused_and_nothing_is_registered(tmp_path, module, flags, needle):
    path = script(module, tmp_path / "bad.pt")
    with pytest.raises(OutputCheckError, match=needle):
        load_encoder(path, **flags)
    registry = Registry(tmp_path / "registry")
    with pytest.raises(OutputCheckError, match=needle):
        registry.import_model(path, version="bad", **flags)
    assert registry.list_models() == []
    assert not (tmp_path / "registry" / "models").exists() or not any((tmp_path / "registry" / "models").iterdir())


def test_fixed_size_module_loads_at_its_size(tmp_path):
    path = script(Only32(), tmp_path / "only32.pt")
    assert load_encoder(path, image_size=32).encoder.spec.dim == 4


def test_not_torchscript_is_refused_when_torchscript_is_asked_for(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="is not a TorchScript archive .*torch.jit.save"):
        load_encoder(tmp_path / "sd.pt", arch="torchscript")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="not an encoder file qscore reads"):
        load_encoder(tmp_path / "junk.pt")


def test_registry_keeps_the_module_and_its_preprocessing(tmp_path):
    path = script(Pooled(), tmp_path / "pooled.pt")
    registry = Registry(tmp_path / "registry")
    record = registry.import_model(path, version="pooled", image_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    folder = registry.model_dir("pooled")
    assert sorted(p.name for p in folder.iterdir()) == ["encoder.pt", "model.json"]
    assert (folder / "encoder.pt").read_bytes() == path.read_bytes()
    assert record.spec.image_size == 16 and record.spec.dim == 6 and record.imported_from == "pooled.pt"
    loaded = registry.load_model("pooled")
    assert loaded.fingerprint == record.fingerprint
    assert loaded.encoder.spec == record.spec
    with pytest.raises(RegistryError, match="model version 'pooled' already exists"):
        registry.import_model(path, version="pooled")


def test_regularize_refuses_torchscript_with_exit_2(tmp_path):
    path = script(Pooled(), tmp_path / "pooled.pt")
    result = run_cli(
        "regularize", "--model", path, "--features", tmp_path / "f.json", "--data", tmp_path, "--out",
        tmp_path / "out.safetensors", check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "cannot regularize" in result.stderr and "TorchScript encoders are inference exports" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


# -- the shared CIFAR-10 ResNet-20 (supervised; a stand-in for a strong encoder) ----------------
@pytest.fixture(scope="module")
def resnet20() -> Path:
    return shared_file(RESNET20_TORCHSCRIPT)


def test_shared_resnet20_loads_with_its_preprocessing(resnet20):
    imported = load_encoder(resnet20, **RESNET20_PREPROCESSING)
    spec = imported.encoder.spec
    assert (spec.arch, spec.image_size, spec.dim, spec.mean, spec.std) == (
        "torchscript", 32, 64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
    )  # fmt: skip
    # a 32x32 image passes unchanged: resize to 32, crop 32, ToTensor, normalise by (0, 1)
    from PIL import Image

    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    assert torch.equal(eval_transform(spec)(image), pixels.permute(2, 0, 1).float() / 255)


def test_shared_resnet20_import_discover_score_on_the_command_line(resnet20, cifar_slice, tmp_path):
    registry = tmp_path / "registry"
    imported = json.loads(
        run_cli("import", "--model", resnet20, *RESNET20_FLAGS, "--registry", registry, "--version", "r20").stdout
    )
    assert imported["version"] == "r20" and imported["spec"]["dim"] == 64 and imported["spec"]["image_size"] == 32
    features = tmp_path / "features.json"
    discovered = last_json(
        run_cli(
            "discover", "--model", resnet20, *RESNET20_FLAGS, "--data", cifar_slice / "test", "--out", features,
            "--eps", "auto", "--sample-size", "100", "--device", "cpu",
        ).stdout
    )  # fmt: skip
    assert discovered["negative_share"] == 0.0  # post-ReLU features
    assert discovered["coverage"] >= 0.9
    fs = FeatureSet.load(features)
    assert fs.encoder.fingerprint == imported["fingerprint"] and fs.encoder.feature_dim == 64
    assert fs.signed_warning is None

    images = sorted((cifar_slice / "test" / "cat").iterdir())[:4]
    rows = [
        json.loads(line)
        for line in run_cli(
            "score", *images, "--model", resnet20, *RESNET20_FLAGS, "--features", features, "--json", "--device", "cpu"
        ).stdout.splitlines()
    ]
    # the same Q-Scores as eq. 3 on the module's own output for the same images
    module = torch.jit.load(str(resnet20))
    from PIL import Image

    x = torch.stack([eval_transform(load_encoder(resnet20, **RESNET20_PREPROCESSING).encoder.spec)(
        Image.open(p).convert("RGB")) for p in images])  # fmt: skip
    with torch.no_grad():
        expected = q_score(module(x), fs.discriminative_indices, fs.eps)
    assert [r["path"] for r in rows] == [str(p) for p in images]
    assert [r["q_score"] for r in rows] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-7)

    # without the flags the module would run at 224 with ImageNet normalisation: other
    # representations of the same weights (same fingerprint), so the feature set is refused
    wrong = run_cli(
        "score", images[0], "--model", resnet20, "--features", features, "--json", "--device", "cpu", check=False
    )
    assert wrong.returncode == 2
    assert "found on images preprocessed with --image-size 32 --mean 0,0,0 --std 1,1,1" in wrong.stderr
    assert "but the encoder is fed --image-size 224 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225" in wrong.stderr


def test_shared_resnet20_coverage_on_a_slice(resnet20, cifar_slice):
    """The figures quoted in the report: coverage per eps of a strong (supervised) encoder."""
    from models.discovery.discover import discover, make_selection
    from models.scoring.feature_set import EncoderRef

    imported = load_encoder(resnet20, **RESNET20_PREPROCESSING)
    dataset = image_folder(cifar_slice / "test", eval_transform(imported.encoder.spec))
    fs = discover(
        imported.encoder,
        dataset,
        dataset_name="slice-test",
        encoder_ref=EncoderRef(fingerprint=imported.fingerprint, arch="torchscript", feature_dim=64),
        eps="auto",
        selection=make_selection(),
        sample_size=None,
        batch_size=100,
    )
    h, _ = extract_representations(imported.encoder, dataset, batch_size=100)
    assert h.shape == (100, 64) and bool((h >= 0).all())
    assert fs.negative_share == 0.0
    # eps=4 covers few images of this encoder (README of ../shared/models: about 2%); auto picks lower
    assert fs.coverage_by_eps["4"] < 0.2
    assert fs.eps < 4 and fs.coverage >= 0.9


def test_shared_resnet20_evaluates_on_the_command_line(resnet20, cifar_slice, tmp_path):
    features = tmp_path / "features.json"
    run_cli("discover", "--model", resnet20, *RESNET20_FLAGS, "--data", cifar_slice / "train", "--out", features,
            "--eps", "auto", "--device", "cpu")  # fmt: skip
    report = last_json(
        run_cli("evaluate", "--model", resnet20, *RESNET20_FLAGS, "--features", features, "--train",
                cifar_slice / "train", "--test", cifar_slice / "test", "--no-compression", "--shift-samples", "20",
                "--device", "cpu").stdout
    )  # fmt: skip
    # a strong (supervised) encoder: a linear probe on 300 images is far above chance (10%)
    assert report["top1"] > 0.6
    assert 0.0 <= report["q_score"]["auroc"] <= 1.0


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--mean", "0,0"], "--mean takes three comma-separated numbers R,G,B"),
        (["--std", "1,0,1"], "std must be positive for every channel"),
        (["--image-size", "4"], "--image-size must be at least 8 pixels, got 4"),
    ],
)
def test_bad_preprocessing_flags_exit_2(tmp_path, flags, needle):
    path = script(Pooled(), tmp_path / "pooled.pt")
    result = run_cli("import", "--model", path, *flags, "--registry", tmp_path / "registry", check=False)
    assert result.returncode == 2
    assert needle in result.stderr
    assert not (tmp_path / "registry" / "models").exists()


def test_a_feature_set_is_refused_for_the_same_weights_fed_otherwise(tmp_path, cifar_slice):
    from models.discovery.discover import discover, make_selection
    from models.scoring.compatibility import FeatureSetMismatch
    from models.scoring.feature_set import EncoderRef
    from models.scoring.scorer import Scorer

    path = script(Pooled(), tmp_path / "pooled.pt")
    registry = Registry(tmp_path / "registry")
    at32 = registry.import_model(path, version="at32", image_size=32)
    at48 = registry.import_model(path, version="at48", image_size=48)
    assert at32.fingerprint == at48.fingerprint  # tensors only
    encoder = registry.load_model("at32").encoder
    fs = discover(
        encoder,
        image_folder(cifar_slice / "test", eval_transform(encoder.spec)),
        dataset_name="slice",
        encoder_ref=EncoderRef(fingerprint=at32.fingerprint, arch="torchscript", feature_dim=6, model_version="at32"),
        eps="auto",
        sample_size=None,
        selection=make_selection(),
    )
    assert fs.encoder.preprocessing is not None and fs.encoder.preprocessing.image_size == 32
    registry.add_feature_set(fs, version="f32")
    registry.check_pair("at32", "f32")
    with pytest.raises(RegistryError, match="found on images preprocessed with --image-size 32 .* fed --image-size 48"):
        registry.check_pair("at48", "f32")
    with pytest.raises(FeatureSetMismatch, match="Use the same preprocessing flags as at discovery"):
        Scorer(registry.load_model("at48").encoder, at48.fingerprint, fs, device="cpu")
    from models.evaluation.linear_eval import run_evaluation

    with pytest.raises(ValueError, match="Use the same preprocessing flags as at discovery"):
        run_evaluation(registry.load_model("at48").encoder, at48.fingerprint, fs, cifar_slice / "train", tmp_path)
