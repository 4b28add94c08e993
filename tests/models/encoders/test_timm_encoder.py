"""timm architectures (issue 9): small random ViT, ConvNeXt and ResNet saved by the test, read back
as encoders whose ``h`` is timm's pooled pre-logits; preprocessing, refusals, signed features,
regularisation and the registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from models.data.datasets import image_folder
from models.data.transforms import eval_transform
from models.discovery.discover import discover, make_selection
from models.encoders.errors import CheckpointError, TimmError
from models.encoders.layouts import read_metadata
from models.encoders.loading import load_encoder, save_encoder
from models.registry.versions import Registry
from models.scoring.feature_set import SIGNED_SHARE, EncoderRef
from models.scoring.qscore import q_score
from models.scoring.representations import extract_representations
from tests.cli.runner import last_json, run_cli

# (name, image size the test trains for, feature dimension of timm's pre-logits)
ARCHS = [("test_vit", 32, 64), ("test_convnext", 32, 64), ("test_resnet", 32, 96)]


def random_timm(name: str, image_size: int, seed: int = 0, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    extra = {"img_size": image_size} if name.startswith("test_vit") else {}
    return timm.create_model(name, pretrained=False, num_classes=10, **extra, **kwargs).eval()


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    return path


@pytest.mark.parametrize(("name", "size", "dim"), ARCHS)
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_encoder_is_the_pooled_pre_logits(tmp_path, name, size, dim, suffix):
    model = random_timm(name, size)
    path = save_weights(model, tmp_path / f"w{suffix}")
    imported = load_encoder(path, arch=f"timm:{name}", image_size=size)
    assert imported.source_layout == "timm"
    assert imported.encoder.spec.arch == f"timm:{name}" and imported.encoder.feature_dim == dim
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.allclose(imported.encoder(x), expected, atol=1e-6)
        assert imported.encoder(x).shape == (3, dim)


def test_timm_preprocessing_is_the_data_config_unless_overridden(tmp_path):
    path = save_weights(random_timm("test_convnext", 32), tmp_path / "cnx.safetensors")
    default = load_encoder(path, arch="timm:test_convnext").encoder.spec
    config = timm.data.resolve_model_data_config(timm.create_model("test_convnext", pretrained=False))
    assert (
        (default.image_size, default.mean, default.std)
        == (
            config["input_size"][-1],
            tuple(config["mean"]),
            tuple(config["std"]),
        )
        == (160, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    )
    custom = load_encoder(path, arch="timm:test_convnext", image_size=32, mean=(0.4, 0.4, 0.4)).encoder.spec
    assert (custom.image_size, custom.mean, custom.std) == (32, (0.4, 0.4, 0.4), (0.5, 0.5, 0.5))


def test_saved_timm_encoder_describes_itself(tmp_path):
    path = save_weights(random_timm("test_vit", 32), tmp_path / "vit.safetensors")
    imported = load_encoder(path, arch="timm:test_vit", image_size=32)
    digest = save_encoder(imported.encoder, tmp_path / "ours.safetensors")
    assert digest == imported.fingerprint
    assert read_metadata(tmp_path / "ours.safetensors")["qscore.encoder"]["arch"] == "timm:test_vit"
    again = load_encoder(tmp_path / "ours.safetensors")  # no --arch, no --image-size: the spec is in the file
    assert again.encoder.spec == imported.encoder.spec and again.fingerprint == digest


def test_unknown_timm_name_is_refused(tmp_path):
    path = save_weights(random_timm("test_convnext", 32), tmp_path / "cnx.safetensors")
    with pytest.raises(TimmError, match=r"unknown timm architecture 'test_convnex' .*Close names: .*test_convnext"):
        load_encoder(path, arch="timm:test_convnex")


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    state = random_timm("test_resnet", 32).state_dict()
    state.pop("layer1.0.conv1.weight")
    state["layer9.weight"] = torch.zeros(1)
    state["layer1.0.conv2.weight"] = torch.zeros(1, 2, 3, 3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(TimmError) as caught:
        load_encoder(tmp_path / "bad.safetensors", arch="timm:test_resnet")
    message = str(caught.value)
    assert "do not fit timm architecture 'test_resnet'" in message
    assert "Missing keys (1): layer1.0.conv1.weight" in message
    assert "Unexpected keys (1): layer9.weight" in message
    assert "Shape mismatches (1): layer1.0.conv2.weight: checkpoint (1, 2, 3, 3) vs model" in message


def test_vit_at_another_image_size_says_to_pass_it(tmp_path):
    path = save_weights(random_timm("test_vit", 32), tmp_path / "vit.safetensors")
    with pytest.raises(
        TimmError, match=r"pos_embed: checkpoint \(1, 5, 64\) vs model \(1, 101, 64\)(.|\n)*--image-size"
    ):
        load_encoder(path, arch="timm:test_vit")  # built at timm's default 160


def test_classifier_keys_are_ignored_and_any_class_count_fits(tmp_path):
    for classes in (10, 1000):
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", pretrained=False, num_classes=classes)
        path = save_weights(model, tmp_path / f"r{classes}.safetensors")
        assert load_encoder(path, arch="timm:test_resnet", image_size=32).encoder.feature_dim == 96


def test_vit_representation_is_signed_and_discovery_says_so(tmp_path, cifar_slice, caplog):
    """ViT pre-logits have no ReLU: about half of h is negative; ReLU networks have none."""
    shares = {}
    for name, size, _ in ARCHS:
        imported = load_encoder(save_weights(random_timm(name, size), tmp_path / f"{name}.safetensors"),
                                arch=f"timm:{name}", image_size=size)  # fmt: skip
        dataset = image_folder(cifar_slice / "test", eval_transform(imported.encoder.spec))
        ref = EncoderRef(fingerprint=imported.fingerprint, arch=name, feature_dim=imported.encoder.feature_dim)
        fs = discover(
            imported.encoder, dataset, dataset_name="slice", encoder_ref=ref, eps="auto",
            selection=make_selection(), sample_size=None, batch_size=100,
        )  # fmt: skip
        h, _ = extract_representations(imported.encoder, dataset, batch_size=100)
        assert fs.negative_share == pytest.approx(float((h < 0).float().mean()))
        shares[name] = fs.negative_share
        if fs.negative_share > SIGNED_SHARE:
            assert "SIGNED REPRESENTATION" in fs.signed_warning
            assert f"{fs.negative_share:.0%} of the entries of h are negative" in fs.signed_warning
        else:
            assert fs.signed_warning is None
    assert 0.3 < shares["test_vit"] < 0.7
    assert shares["test_resnet"] == 0.0  # pooled after a ReLU
    assert any("SIGNED REPRESENTATION" in r.getMessage() for r in caplog.records)


def test_signed_h_q_score_counts_negative_mass_in_the_norm():
    """Hand-worked: the same positive evidence, plus negative entries, gives a smaller Q (eq. 3)."""
    d = torch.tensor([0])
    pos = torch.tensor([[10.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    signed = torch.tensor([[10.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]])
    # pos: mu = 11/8, sigma = sqrt(mean(h^2) - mu^2) = sqrt(101/8 - 121/64) = 3.2786; 10 > mu + 2 sigma
    assert q_score(pos, d, 2.0).item() == pytest.approx(10 / 11)
    # signed: mu = 5/8, mean(h^2) = 107/8, sigma = 3.6037; 10 > 0.625 + 2 * 3.6037 = 7.83; ||h||_1 = 17
    assert q_score(signed, d, 2.0).item() == pytest.approx(10 / 17)


def test_regularize_a_timm_encoder_and_reload_it(tmp_path, cifar_slice):
    weights = save_weights(random_timm("test_convnext", 32), tmp_path / "cnx.safetensors")
    flags = ["--arch", "timm:test_convnext", "--image-size", "32"]
    features = tmp_path / "f.json"
    run_cli("discover", "--model", weights, *flags, "--data", cifar_slice / "test", "--out", features,
            "--eps", "auto", "--sample-size", "100", "--device", "cpu")  # fmt: skip
    out = tmp_path / "tuned.safetensors"
    info = last_json(
        run_cli(
            "regularize",
            "--model",
            weights,
            *flags,
            "--features",
            features,
            "--data",
            cifar_slice / "test",
            "--out",
            out,
            "--max-steps",
            "2",
            "--batch-size",
            "16",
            "--device",
            "cpu",
        ).stdout  # fmt: skip
    )
    assert info["steps"] == 2
    before, after = load_encoder(weights, arch="timm:test_convnext", image_size=32), load_encoder(out)
    assert after.encoder.spec == before.encoder.spec  # arch and preprocessing travel in the file
    assert after.fingerprint == info["fingerprint"] != before.fingerprint  # the weights moved


def test_registry_imports_a_timm_state_dict_once(tmp_path):
    path = save_weights(random_timm("test_vit", 32), tmp_path / "vit.pth")
    registry = Registry(tmp_path / "registry")
    record = json.loads(
        run_cli(
            "import",
            "--model",
            path,
            "--arch",
            "timm:test_vit",
            "--image-size",
            "32",
            "--registry",
            registry.root,
            "--version",
            "vit",
        ).stdout  # fmt: skip
    )
    assert record["spec"]["arch"] == "timm:test_vit" and record["spec"]["dim"] == 64
    loaded = registry.load_model("vit")
    assert loaded.fingerprint == record["fingerprint"] and loaded.encoder.spec.image_size == 32
    bad = run_cli("import", "--model", path, "--arch", "timm:nope_net", "--registry", registry.root,
                  "--version", "nope", check=False)  # fmt: skip
    assert bad.returncode == 2 and "unknown timm architecture 'nope_net'" in bad.stderr
    assert [m.version for m in registry.list_models()] == ["vit"]


def test_convert_turns_a_checkpoint_into_self_describing_safetensors(tmp_path):
    path = save_weights(random_timm("test_resnet", 32), tmp_path / "r.pth")
    out = tmp_path / "r.safetensors"
    info = last_json(run_cli("convert", "--checkpoint", path, "--arch", "timm:test_resnet", "--image-size", "32",
                             "--out", out).stdout)  # fmt: skip
    assert info["arch"] == "timm:test_resnet"
    assert (
        load_encoder(out).fingerprint
        == info["fingerprint"]
        == load_encoder(path, arch="timm:test_resnet", image_size=32).fingerprint
    )
    assert np.isfinite(load_encoder(out).encoder(torch.rand(2, 3, 32, 32)).detach().numpy()).all()


def test_state_dict_is_not_read_as_torchscript(tmp_path):
    path = save_weights(random_timm("test_resnet", 32), tmp_path / "r.pth")
    with pytest.raises(CheckpointError, match="is not a TorchScript archive"):
        load_encoder(path, arch="torchscript")


def test_pretrain_builds_only_resnets(tmp_path):
    result = run_cli("pretrain", "--data", tmp_path, "--out", tmp_path / "p.safetensors", "--arch", "timm:test_vit",
                     check=False)  # fmt: skip
    assert result.returncode == 2
    assert "pretrain builds resnet18 or resnet50, got --arch timm:test_vit" in result.stderr
    assert not (tmp_path / "p.safetensors").exists()
