"""Importing the checkpoints users bring (FIELD-NOTES "Checkpoints users will bring").

Each layout is built from a real encoder, imported with ``load_encoder``, and must give the same
``h`` on the same input and the same fingerprint.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from models.encoders.errors import CheckpointError
from models.encoders.layouts import infer_spec, read_metadata, read_tensors, to_torchvision_layout, unwrap_state_dict
from models.encoders.loading import load_encoder, save_encoder
from models.encoders.resnet import ResNetEncoder
from models.encoders.spec import EncoderSpec, fingerprint


class NotAWeight:
    """An arbitrary object a pickle may carry; weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.payload = "anything"


def _sd(encoder: ResNetEncoder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in encoder.backbone_state_dict().items()}


def _noise_like(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        out[k] = torch.randn_like(v) if v.is_floating_point() else v.clone()
    return out


def _head(prefix: str, r: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}0.weight": torch.randn(r, r),
        f"{prefix}0.bias": torch.randn(r),
        f"{prefix}2.weight": torch.randn(16, r),
    }


# Each builder writes one layout into ``folder`` and returns the path.


def _plain_torchvision(enc: ResNetEncoder, folder: Path) -> Path:
    sd = _sd(enc)
    r = enc.feature_dim
    sd.update({"fc.weight": torch.randn(10, r), "fc.bias": torch.randn(10)})  # torchvision's classifier
    path = folder / "resnet.pth"
    torch.save(sd, path)
    return path


def _solo_learn(enc: ResNetEncoder, folder: Path) -> Path:
    sd = {f"backbone.{k}": v for k, v in _sd(enc).items()}
    sd.update(_head("projector.", enc.feature_dim))
    sd.update({"classifier.weight": torch.randn(10, enc.feature_dim), "classifier.bias": torch.randn(10)})
    ckpt = {
        "state_dict": sd,
        "epoch": 399,
        "global_step": 1000,
        "pytorch-lightning_version": "2.2.0",
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
    }
    path = folder / "solo.ckpt"
    torch.save(ckpt, path)
    return path


def _solo_learn_old_encoder(enc: ResNetEncoder, folder: Path) -> Path:
    sd = {f"encoder.{k}": v for k, v in _sd(enc).items()}
    sd.update(_head("projector.", enc.feature_dim))
    path = folder / "solo-old.ckpt"
    torch.save({"state_dict": sd, "epoch": 10}, path)
    return path


class _LightlyModel(nn.Module):
    """lightly's examples: ``backbone = nn.Sequential(*list(resnet.children())[:-1])``."""

    def __init__(self, resnet: nn.Module, r: int) -> None:
        super().__init__()
        self.backbone = nn.Sequential(*list(resnet.children())[:-1])
        self.projection_head = nn.Sequential(nn.Linear(r, r), nn.ReLU(), nn.Linear(r, 16))


def _lightly(enc: ResNetEncoder, folder: Path) -> Path:
    model = _LightlyModel(copy.deepcopy(enc.resnet), enc.feature_dim)
    sd = model.state_dict()
    assert "backbone.0.weight" in sd and "backbone.4.0.conv1.weight" in sd and "backbone.7.1.bn2.running_var" in sd
    path = folder / "lightly.ckpt"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    return path


def _moco(enc: ResNetEncoder, folder: Path) -> Path:
    sd = {f"module.encoder_q.{k}": v for k, v in _sd(enc).items()}
    # the key encoder has other weights: importing it instead would change h
    sd.update({f"module.encoder_k.{k}": v for k, v in _noise_like(_sd(enc)).items()})
    r = enc.feature_dim
    sd.update(
        {
            "module.encoder_q.fc.0.weight": torch.randn(r, r),
            "module.encoder_q.fc.0.bias": torch.randn(r),
            "module.encoder_q.fc.2.weight": torch.randn(16, r),
            "module.encoder_q.fc.2.bias": torch.randn(16),
            "module.encoder_k.fc.0.weight": torch.randn(r, r),
            "module.encoder_k.fc.2.weight": torch.randn(16, r),
            "module.queue": torch.randn(16, 64),
            "module.queue_ptr": torch.zeros(1, dtype=torch.long),
        }
    )
    path = folder / "moco_checkpoint_0199.pth.tar"
    torch.save(
        {
            "epoch": 200,
            "arch": "resnet18",
            "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9}]},
        },
        path,
    )
    return path


def _swav(enc: ResNetEncoder, folder: Path, wrapped: bool) -> Path:
    sd = {f"module.{k}": v for k, v in _sd(enc).items()}
    sd.update(_head("module.projection_head.", enc.feature_dim))
    sd["module.prototypes.weight"] = torch.randn(30, 16)
    path = folder / ("swav-wrapped.pth" if wrapped else "swav.pth")
    torch.save({"state_dict": sd, "epoch": 800} if wrapped else sd, path)
    return path


def _vissl(enc: ResNetEncoder, folder: Path) -> Path:
    trunk = {f"_feature_blocks.{k}": v for k, v in _sd(enc).items()}
    heads = {"0.clf.0.weight": torch.randn(10, enc.feature_dim)}
    ckpt = {
        "phase_idx": 3,
        "iteration": 100,
        "type": "consolidated",
        "classy_state_dict": {"base_model": {"model": {"trunk": trunk, "heads": heads}}},
    }
    path = folder / "model_final_checkpoint_phase199.torch"
    torch.save(ckpt, path)
    return path


def _data_parallel(enc: ResNetEncoder, folder: Path) -> Path:
    path = folder / "dp.pt"
    torch.save({f"module.{k}": v for k, v in _sd(enc).items()}, path)
    return path


def _safetensors_plain(enc: ResNetEncoder, folder: Path) -> Path:
    path = folder / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in _sd(enc).items()}, str(path))
    return path


def _safetensors_other_suffix(enc: ResNetEncoder, folder: Path) -> Path:
    # safetensors is recognised by its header, not only by its suffix
    path = folder / "weights.bin"
    save_file({k: v.contiguous() for k, v in _sd(enc).items()}, str(path))
    return path


def _ours(enc: ResNetEncoder, folder: Path) -> Path:
    path = folder / "ours.safetensors"
    save_encoder(enc, path)
    return path


LAYOUTS: dict[str, Callable[[ResNetEncoder, Path], Path]] = {
    "torchvision": _plain_torchvision,
    "solo-learn": _solo_learn,
    "solo-learn-encoder": _solo_learn_old_encoder,
    "lightly": _lightly,
    "moco": _moco,
    "swav": lambda e, f: _swav(e, f, wrapped=False),
    "swav-state-dict": lambda e, f: _swav(e, f, wrapped=True),
    "vissl": _vissl,
    "data-parallel": _data_parallel,
    "safetensors": _safetensors_plain,
    "safetensors-sniffed": _safetensors_other_suffix,
    "save_encoder": _ours,
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_checkpoint_layout_round_trips(layout, bn_encoder, probe_images, tmp_path):
    path = LAYOUTS[layout](bn_encoder, tmp_path)
    imported = load_encoder(path)
    assert imported.encoder.spec.arch == "resnet18"
    assert imported.encoder.spec.width == 8
    assert imported.encoder.spec.cifar_stem is True
    assert imported.fingerprint == fingerprint(bn_encoder.backbone_state_dict())
    assert not imported.encoder.training
    with torch.inference_mode():
        expected = bn_encoder(probe_images)
        got = imported.encoder(probe_images)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("layout", ["torchvision", "lightly", "moco", "vissl"])
def test_imagenet_stem_round_trips_and_infers_inputs(layout, make_bn_encoder, tmp_path):
    spec = EncoderSpec(arch="resnet18", cifar_stem=False, width=8, image_size=64)
    enc = make_bn_encoder(spec, seed=2)
    imported = load_encoder(LAYOUTS[layout](enc, tmp_path))
    assert imported.encoder.spec.cifar_stem is False
    # the stem decides the default input: ImageNet inputs are 224 pixels with ImageNet statistics
    assert imported.encoder.spec.image_size == 224
    assert imported.encoder.spec.mean == (0.485, 0.456, 0.406)
    assert imported.fingerprint == fingerprint(enc.backbone_state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.equal(imported.encoder(x), enc(x))


def test_spec_overrides_apply(bn_encoder, tmp_path):
    imported = load_encoder(_plain_torchvision(bn_encoder, tmp_path), image_size=40)
    assert imported.encoder.spec.image_size == 40
    ours = load_encoder(_ours(bn_encoder, tmp_path), image_size=48)
    assert ours.encoder.spec.image_size == 48


def test_save_encoder_keeps_spec_and_metadata(make_bn_encoder, tmp_path):
    spec = EncoderSpec(arch="resnet18", cifar_stem=True, width=8, image_size=40, mean=(0.1, 0.2, 0.3))
    enc = make_bn_encoder(spec, seed=1)
    digest = save_encoder(enc, tmp_path / "m.safetensors", {"method": "simclr"})
    meta = read_metadata(tmp_path / "m.safetensors")
    assert meta["fingerprint"] == digest and meta["method"] == "simclr"
    assert meta["qscore.encoder"]["image_size"] == 40
    # the spec is read back as saved, not inferred from the weights
    assert load_encoder(tmp_path / "m.safetensors").encoder.spec == spec
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_missing_batchnorm_counters_are_filled(bn_encoder, probe_images, tmp_path):
    sd = {k: v for k, v in _sd(bn_encoder).items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "no-counters.pth")
    imported = load_encoder(tmp_path / "no-counters.pth")
    with torch.inference_mode():
        assert torch.equal(imported.encoder(probe_images), bn_encoder(probe_images))


# --- errors ---------------------------------------------------------------------------------


def test_mismatched_weights_name_missing_and_unexpected_keys(bn_encoder, tmp_path):
    sd = _sd(bn_encoder)
    del sd["layer2.0.conv1.weight"]
    sd["layer2.0.conv9.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        load_encoder(tmp_path / "bad.pth")
    message = str(info.value)
    assert "do not fit a resnet18 encoder" in message
    assert "Missing keys (1): layer2.0.conv1.weight" in message
    assert "Unexpected keys (1): layer2.0.conv9.weight" in message


def test_shape_mismatch_is_named(bn_encoder, tmp_path):
    path = _plain_torchvision(bn_encoder, tmp_path)
    with pytest.raises(
        CheckpointError,
        match=r"Shape mismatches \(\d+\): .*"
        r"conv1.weight: checkpoint \(8, 3, 3, 3\) vs encoder \(16, 3, 3, 3\)",
    ):
        load_encoder(path, width=16)


def test_many_missing_keys_are_summarised(bn_encoder, tmp_path):
    sd = {k: v for k, v in _sd(bn_encoder).items() if not k.startswith("layer4.")}
    torch.save(sd, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match=r"Missing keys \(\d+\): layer4\..* and \d+ more"):
        load_encoder(tmp_path / "short.pth")


def test_arbitrary_pickled_object_is_refused(bn_encoder, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _sd(bn_encoder), "hook": NotAWeight()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True and will not unpickle"):
        load_encoder(path)


def test_argparse_namespace_is_refused_too(bn_encoder, tmp_path):
    # common in research checkpoints; still not a plain container
    path = tmp_path / "args.pth"
    torch.save({"state_dict": _sd(bn_encoder), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match="will not unpickle"):
        load_encoder(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "not an encoder file qscore reads|will not unpickle"),
        (b"hello, this is a text file\n", "not an encoder file qscore reads|will not unpickle"),
        (b"PK\x03\x04garbage-zip", "not an encoder file qscore reads|will not unpickle"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(range(256)) * 4, "not an encoder file qscore reads"),
        (np.random.default_rng(0).bytes(5000), "not an encoder file qscore reads"),
    ],
    ids=["empty", "text", "broken-zip", "jpeg", "random-bytes"],
)
def test_not_a_checkpoint_is_refused(tmp_path, content, match):
    path = tmp_path / "x.pt2"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as info:
        load_encoder(path)
    # never torch's advice to load with weights_only=False (unsafe, and no help for a file that is no checkpoint)
    assert "weights_only=False" not in str(info.value) and "arbitrary code" not in str(info.value)


def test_corrupt_safetensors_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_encoder(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file at"):
        load_encoder(tmp_path / "absent.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError, match="holds a Tensor, not a state dict"):
        load_encoder(tmp_path / "tensor.pth")
    torch.save({"epoch": 3, "name": "x"}, tmp_path / "no-tensors.pth")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        load_encoder(tmp_path / "no-tensors.pth")


def test_not_a_resnet_is_refused(tmp_path):
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "vit.pth")
    with pytest.raises(CheckpointError, match="no conv1.weight"):
        load_encoder(tmp_path / "vit.pth")


def test_vissl_without_trunk_is_refused(tmp_path):
    torch.save({"classy_state_dict": {"base_model": {"model": {}}}}, tmp_path / "v.torch")
    with pytest.raises(CheckpointError, match="VISSL checkpoint without"):
        load_encoder(tmp_path / "v.torch")


def test_layout_helpers(bn_encoder, tmp_path):
    path = _moco(bn_encoder, tmp_path)
    raw, meta = read_tensors(path)
    assert meta == {}
    tensors = unwrap_state_dict(raw)
    renamed, prefix = to_torchvision_layout(tensors)
    assert prefix == "module.encoder_q."
    assert set(renamed) == set(bn_encoder.backbone_state_dict())
    assert infer_spec(renamed).width == 8


# -- pickles that hold more than tensors (issue 9, item 4) ---------------------------------------
def test_numpy_scalars_beside_the_weights_are_allowed(bn_encoder, tmp_path):
    import numpy as np

    path = tmp_path / "with-numpy.th"
    torch.save({"best_prec1": np.float64(91.7), "epoch": np.int64(3), "state_dict": _sd(bn_encoder)}, path)
    raw, _ = read_tensors(path)
    assert raw["best_prec1"] == pytest.approx(91.7)
    assert load_encoder(path).fingerprint == fingerprint(bn_encoder.backbone_state_dict())


def test_other_pickled_objects_are_refused_with_the_conversion(bn_encoder, tmp_path):
    import argparse

    path = tmp_path / "with-args.pth"
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": _sd(bn_encoder)}, path)
    with pytest.raises(CheckpointError) as caught:
        load_encoder(path)
    message = str(caught.value)
    assert "(it needs argparse.Namespace)" in message
    assert "will not unpickle them" in message
    assert f"torch.load('{path}', map_location='cpu', weights_only=False)" in message
    assert "'with-args.safetensors'" in message


def test_the_published_resnet20_checkpoint_says_what_to_do(tmp_path):
    """``resnet20-12fca82f.th``: readable tensors (a float beside them), but an architecture
    (CIFAR ResNet-20, option A shortcuts) that no ResNet layout nor timm has."""
    from tests.shared_encoders import RESNET20_CHECKPOINT, shared_file

    path = shared_file(RESNET20_CHECKPOINT)
    raw, _ = read_tensors(path)
    assert set(raw) == {"best_prec1", "state_dict"}
    with pytest.raises(CheckpointError) as caught:
        load_encoder(path)
    message = str(caught.value)
    assert "read as layout 'module.'" in message
    assert "Missing keys (35)" in message and "Unexpected keys (32): layer1.2.bn1.bias" in message
    assert "--arch timm:NAME" in message and "TorchScript export" in message
