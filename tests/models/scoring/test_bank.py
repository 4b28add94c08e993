"""The reference bank: k-NN search by chunked matrix products, safetensors round trip."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.scoring.bank import ReferenceBank, normalise

AXES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])


def test_search_four_vectors_known_neighbours() -> None:
    bank = ReferenceBank(AXES.clone())
    dist, idx = bank.search(torch.tensor([[2.0, 1.0]]), k=2)
    assert idx.tolist() == [[0, 1]]
    assert dist[0, 0].item() == pytest.approx(1 - 2 / math.sqrt(5), abs=1e-6)
    assert dist[0, 1].item() == pytest.approx(1 - 1 / math.sqrt(5), abs=1e-6)
    # chunks of one vector find the same
    d1, i1 = bank.search(torch.tensor([[2.0, 1.0]]), k=2, chunk_size=1)
    assert i1.tolist() == [[0, 1]] and torch.allclose(d1, dist)


def test_search_excludes_the_query_itself() -> None:
    bank = ReferenceBank(AXES.clone())
    dist, idx = bank.search(AXES.clone(), k=1, exclude=torch.arange(4))
    assert (idx != torch.arange(4).view(-1, 1)).all()
    assert dist.flatten().tolist() == pytest.approx([1.0] * 4)  # the orthogonal neighbours
    assert bank.leave_one_out_distance(k=3, batch_size=3).tolist() == pytest.approx([4 / 3] * 4)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_search_matches_brute_force(chunk: int) -> None:
    g = torch.Generator().manual_seed(chunk)
    h, q = torch.randn(300, 16, generator=g), torch.randn(20, 16, generator=g)
    bank = ReferenceBank.from_representations(h, dtype=torch.float32)
    dist, idx = bank.search(q, k=5, chunk_size=chunk)
    full = 1 - normalise(q) @ normalise(h).T
    ref_dist, ref_idx = full.topk(5, dim=1, largest=False)
    assert torch.allclose(dist, ref_dist.clamp_min(0), atol=1e-5)
    assert torch.equal(idx, ref_idx)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    h = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    bank = ReferenceBank.from_representations(h, fingerprint="abc").with_prototypes((4,))
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]  # no temporary left behind
    loaded = ReferenceBank.load(path)
    assert loaded.size == 50 and loaded.dim == 8 and loaded.fingerprint == "abc"
    assert loaded.vectors.dtype == torch.float32  # upcast on the CPU
    assert torch.allclose(loaded.vectors, normalise(h), atol=1e-3)
    assert set(loaded.prototypes) == {4}
    assert loaded.nbytes == (50 + 4) * 8 * 4
    conf = loaded.prototype_confidence(h)["proto_conf_4"]
    assert conf.shape == (50,) and bool(((conf > 0.25) & (conf <= 1)).all())


def test_load_refuses_other_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({"conv1.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="not a reference bank"):
        ReferenceBank.load(path)
    with pytest.raises(FileNotFoundError):
        ReferenceBank.load(tmp_path / "missing.safetensors")


def test_bad_queries_and_k_are_refused() -> None:
    bank = ReferenceBank(AXES.clone())
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        bank.search(torch.zeros(3, 5), k=1)
    with pytest.raises(ValueError, match="k must be between 1 and 4"):
        bank.search(torch.zeros(1, 2), k=5)
    with pytest.raises(ValueError, match="k must be between 1 and 3"):
        bank.search(torch.zeros(1, 2), k=4, exclude=torch.tensor([0]))
    with pytest.raises(ValueError, match="N >= 1"):
        ReferenceBank(torch.zeros(0, 2))
