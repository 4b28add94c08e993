"""POST /admin/models (issue 9): import an encoder file, then discover, switch and serve it.

Against a real uvicorn server; the shared CIFAR-10 ResNet-20 TorchScript module (supervised, a
stand-in for a strong encoder) is the file brought.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models.data.datasets import image_folder
from models.data.transforms import eval_transform
from models.discovery.discover import discover, make_selection
from models.registry.versions import Registry
from models.scoring.feature_set import EncoderRef
from models.scoring.qscore import q_score
from tests.shared_encoders import RESNET20_TORCHSCRIPT, shared_file

R20_FORM = {"version": "r20", "image_size": "32", "mean": "0,0,0", "std": "1,1,1"}


def upload(client, path: Path, form: dict[str, str], name: str | None = None):
    with open(path, "rb") as handle:
        return client.post("/admin/models", data=form, files={"file": (name or path.name, handle.read())})


class FeatureMap(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2]


class Only8(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))  # 8x8 images only


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def test_import_discover_and_serve_the_shared_resnet20(make_server, cifar_slice: Path) -> None:
    resnet20 = shared_file(RESNET20_TORCHSCRIPT)
    server = make_server()
    registry = Registry(server.settings.registry_root)
    with server.client() as client:
        response = upload(client, resnet20, R20_FORM)
        assert response.status_code == 201, response.text
        body = response.json()
        assert (body["version"], body["arch"], body["feature_dim"], body["image_size"]) == (
            "r20",
            "torchscript",
            64,
            32,
        )
        assert (body["mean"], body["std"], body["imported_from"]) == ([0, 0, 0], [1, 1, 1], resnet20.name)
        assert (registry.model_dir("r20") / "encoder.pt").read_bytes() == resnet20.read_bytes()

        # discover on the slice with the encoder the registry holds, then serve the pair
        imported = registry.load_model("r20")
        fs = discover(
            imported.encoder,
            image_folder(cifar_slice / "train", eval_transform(imported.encoder.spec)),
            dataset_name="slice-train",
            encoder_ref=EncoderRef(
                fingerprint=body["fingerprint"], arch="torchscript", feature_dim=64, model_version="r20"
            ),
            eps="auto",
            selection=make_selection(),
            sample_size=None,
            batch_size=100,
        )
        registry.add_feature_set(fs, version="r20")
        switched = client.post("/admin/switch", json={"model": "r20", "feature_set": "r20", "persist": False})
        assert switched.status_code == 200, switched.text
        assert switched.json()["feature_set"]["negative_share"] == 0.0

        images = sorted((cifar_slice / "test" / "dog").iterdir())[:5]
        files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in images]
        scored = client.post("/score", files=files)
        assert scored.status_code == 200, scored.text
        results = scored.json()["results"]
        assert scored.json()["model"]["version"] == "r20"

    # the service's q_score is eq. 3 on the module's own output for the same images
    module = torch.jit.load(str(resnet20))
    # the 32x32 JPEGs as RGB in [0, 1]: what the module takes (its normalisation is inside)
    x = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) / 255 for p in images])
    with torch.no_grad():
        expected = q_score(module(x), fs.discriminative_indices, fs.eps)
    assert [r["filename"] for r in results] == [p.name for p in images]
    assert [r["q_score"] for r in results] == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-7)
    assert any(r["q_score"] > 0 for r in results)


def test_bad_files_get_422_and_nothing_is_written(make_server, tmp_path: Path) -> None:
    server = make_server()
    registry = Registry(server.settings.registry_root)
    before = [m.version for m in registry.list_models()]
    torch.jit.save(torch.jit.script(FeatureMap()), str(tmp_path / "map.pt"))
    torch.jit.save(torch.jit.script(Only8()), str(tmp_path / "only8.pt"))
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01not a model at all")
    # torch.onnx.export's default: the tensors in map.onnx.data, which an upload of one file cannot bring
    torch.onnx.export(Small(), (torch.rand(2, 3, 8, 8),), str(tmp_path / "map.onnx"), dynamo=True)
    assert (tmp_path / "map.onnx.data").is_file()
    cases = [
        (tmp_path / "map.onnx", {"version": "external"}, "save_as_external_data=False"),
        (tmp_path / "map.pt", {"version": "map"}, r"expected (2, r)"),
        (tmp_path / "junk.bin", {"version": "junk"}, "not an encoder file qscore reads"),
        (tmp_path / "map.pt", {"version": "m3", "arch": "timm:not_a_net"}, "is a TorchScript module, not a state dict"),
        # the fix named as the form's field, not the command line's flag
        (tmp_path / "only8.pt", {"version": "o8", "image_size": "16"}, "pass it with the image_size field"),
    ]
    with server.client() as client:
        for path, form, needle in cases:
            response = upload(client, path, form)
            assert response.status_code == 422, response.text
            detail = response.json()["detail"]
            assert detail["code"] == "invalid_model", detail
            assert needle in detail["message"], detail
            assert "--image-size" not in detail["message"] and "--mean" not in detail["message"], detail
        bad_name = upload(client, tmp_path / "map.pt", {"version": "../etc"})
        assert bad_name.status_code == 422 and bad_name.json()["detail"]["code"] == "invalid_request"
        # The form's own fields are checked by the schema: a mean of two numbers never reaches the loader.
        bad_mean = upload(client, tmp_path / "map.pt", {"version": "m2", "mean": "0,0"})
        assert bad_mean.status_code == 422 and bad_mean.json()["detail"]["code"] == "invalid_request"
        assert "body.mean" in bad_mean.json()["detail"]["message"]
        taken = upload(client, tmp_path / "map.pt", {"version": "tiny"})
        assert taken.status_code == 409 and taken.json()["detail"]["code"] == "version_exists"
        assert "'tiny' already exists" in taken.json()["detail"]["message"]
    assert [m.version for m in registry.list_models()] == before
    assert not list((registry.root / "models").glob(".tmp-*"))


def test_import_needs_the_admin_key(make_server) -> None:
    resnet20 = shared_file(RESNET20_TORCHSCRIPT)
    server = make_server(api_key="s3cret")
    with server.client() as client:
        refused = upload(client, resnet20, R20_FORM)
        assert refused.status_code == 401 and refused.json()["detail"]["code"] == "unauthorized"
        client.headers["X-API-Key"] = "s3cret"
        assert upload(client, resnet20, R20_FORM).status_code == 201
    assert (
        json.loads((Path(server.settings.registry_root) / "models" / "r20" / "model.json").read_text())["spec"]["dim"]
        == 64
    )
