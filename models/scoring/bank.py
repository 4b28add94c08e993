"""The reference bank: L2-normalised reference representations and their k-nearest-neighbour search.

Stored as a safetensors file (float16 by default: 5,000 x 512 features = 5 MB) beside the
feature set, written atomically. Loaded onto the serving device; a query batch is searched by
matrix products with the bank, ``chunk_size`` bank rows at a time, keeping a running top-k, so
memory is ``O(B * chunk_size)`` whatever the bank's size (Sun et al., ICML 2022: deep k-NN on
normalised features).

The bank also holds label-free *prototypes*: k-means centroids of the bank at a few
granularities (8, 16, 32, 64 clusters). How confidently a representation falls to one prototype
(the maximum of a softmax over cosine similarities, temperature 0.1) is a label-free stand-in for
a classifier's confidence; the risk model weighs the granularities on labelled held-out data.

On a GPU the bank stays in float16 and the products run in float16; on the CPU it is upcast
to float32 once at load (CPU float16 matrix products are slow).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sklearn.cluster import KMeans

from models.storage.atomic import atomic_path

BANK_FORMAT = "qscore.reference_bank/v1"


DEFAULT_CHUNK = 8192


PROTOTYPE_COUNTS = (8, 16, 32, 64)


PROTOTYPE_TEMPERATURE = 0.1


def normalise(h: torch.Tensor) -> torch.Tensor:
    """Rows of ``h`` (N, r) scaled to unit L2 norm (an all-zero row stays zero)."""
    if h.dim() != 2:
        raise ValueError(f"representations must have shape (N, r), got {tuple(h.shape)}")
    return F.normalize(h.float(), dim=1)


class ReferenceBank:
    """``vectors``: (N, r) unit-norm reference representations, on ``device``.

    Build it with :meth:`from_representations` (normalises) or :meth:`load`.
    """

    def __init__(
        self,
        vectors: torch.Tensor,
        *,
        fingerprint: str | None = None,
        prototypes: dict[int, torch.Tensor] | None = None,
    ) -> None:
        if vectors.dim() != 2 or vectors.shape[0] == 0:
            raise ValueError(f"a bank needs (N, r) vectors with N >= 1, got shape {tuple(vectors.shape)}")
        self.vectors = vectors
        self.fingerprint = fingerprint
        self.prototypes = prototypes or {}
        for n, c in self.prototypes.items():
            if c.dim() != 2 or c.shape != (n, vectors.shape[1]):
                raise ValueError(f"prototypes_{n} must have shape ({n}, {vectors.shape[1]}), got {tuple(c.shape)}")

    def with_prototypes(self, counts: tuple[int, ...] = PROTOTYPE_COUNTS, seed: int = 0) -> ReferenceBank:
        """The bank plus k-means centroids (unit norm) for each cluster count that fits in it."""

        x = self.vectors.float().cpu().numpy()
        prototypes = {}
        for n in counts:
            if n >= self.size:
                continue
            km = KMeans(n, n_init=2, random_state=seed).fit(x)
            prototypes[n] = normalise(torch.from_numpy(km.cluster_centers_)).to(self.vectors.device, self.vectors.dtype)
        return ReferenceBank(self.vectors, fingerprint=self.fingerprint, prototypes=prototypes)

    def prototype_confidence(self, queries: torch.Tensor, *, normalised: bool = False) -> dict[str, torch.Tensor]:
        """``{"proto_conf_<n>": (B,)}``: max softmax of cosine similarities to the n prototypes / T."""
        q = queries.to(self.device, torch.float32)
        if not normalised:
            q = normalise(q)
        out = {}
        for n, c in sorted(self.prototypes.items()):
            sim = q @ c.float().T
            out[f"proto_conf_{n}"] = torch.softmax(sim / PROTOTYPE_TEMPERATURE, dim=1).max(dim=1).values
        return out

    @classmethod
    def from_representations(
        cls, h: torch.Tensor, *, fingerprint: str | None = None, dtype: torch.dtype = torch.float16
    ) -> ReferenceBank:
        return cls(normalise(h).to(dtype), fingerprint=fingerprint)

    @property
    def size(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def device(self) -> torch.device:
        return self.vectors.device

    @property
    def nbytes(self) -> int:
        """Bytes the bank occupies where it is loaded."""
        tensors = [self.vectors, *self.prototypes.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: str | torch.device) -> ReferenceBank:
        """The bank on ``device``: float16 on a GPU, float32 on the CPU."""
        device = torch.device(device)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        return ReferenceBank(
            self.vectors.to(device, dtype),
            fingerprint=self.fingerprint,
            prototypes={n: c.to(device, dtype) for n, c in self.prototypes.items()},
        )

    def save(self, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
        metadata = {"format": BANK_FORMAT}
        if self.fingerprint:
            metadata["encoder_fingerprint"] = self.fingerprint
        tensors = {"vectors": self.vectors.to("cpu", dtype).contiguous()}
        tensors.update({f"prototypes_{n}": c.to("cpu", dtype).contiguous() for n, c in self.prototypes.items()})
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
            os.chmod(tmp, 0o644)  # safetensors re-creates the file 0600; the api and workers read it

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ReferenceBank:

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no reference bank at {path}")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != BANK_FORMAT:
            raise ValueError(f"{path} is not a reference bank (format {metadata.get('format')!r}, want {BANK_FORMAT})")
        tensors = load_file(str(path))
        vectors = tensors.pop("vectors", None)
        if vectors is None or any(not name.startswith("prototypes_") for name in tensors):
            raise ValueError(f"{path}: a bank holds 'vectors' and 'prototypes_<n>' tensors, found {sorted(tensors)}")
        prototypes = {int(name.removeprefix("prototypes_")): t for name, t in tensors.items()}
        return cls(vectors, fingerprint=metadata.get("encoder_fingerprint"), prototypes=prototypes).to(device)

    def search(
        self,
        queries: torch.Tensor,
        k: int,
        *,
        exclude: torch.Tensor | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        normalised: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest bank vectors of each query, by cosine distance ``1 - cos``.

        ``queries``: (B, r). ``exclude``: optional (B,) bank indices, one per query, never
        returned as its neighbour (leave-one-out: a bank vector queried against its own bank;
        -1 excludes nothing). Returns ``(distances, indices)``, both (B, k), nearest first,
        distances in float32 on the bank's device.
        """
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (B, {self.dim}), got {tuple(queries.shape)}")
        available = self.size - (1 if exclude is not None else 0)
        if not 1 <= k <= available:
            raise ValueError(f"k must be between 1 and {available} (the bank holds {self.size}), got {k}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        q = queries.to(self.device, torch.float32)
        if not normalised:
            q = normalise(q)
        q = q.to(self.vectors.dtype)
        if exclude is None and self.size <= chunk_size:
            # One chunk: a single product and top-k, no merging.
            sim, idx = (q @ self.vectors.T).float().topk(k, dim=1)
            return (1.0 - sim).clamp_min(0.0), idx
        if exclude is not None:
            exclude = exclude.to(self.device, torch.int64).view(-1, 1)
        best_sim = torch.full((q.shape[0], 0), float("-inf"), device=self.device)
        best_idx = torch.zeros((q.shape[0], 0), dtype=torch.int64, device=self.device)
        for start in range(0, self.size, chunk_size):
            sim = (q @ self.vectors[start : start + chunk_size].T).float()
            idx = torch.arange(start, start + sim.shape[1], device=self.device).expand_as(sim)
            if exclude is not None:
                sim = sim.masked_fill(idx == exclude, float("-inf"))
            top = min(k, sim.shape[1])
            chunk_sim, chunk_pos = sim.topk(top, dim=1)
            merged_sim = torch.cat([best_sim, chunk_sim], dim=1)
            merged_idx = torch.cat([best_idx, idx.gather(1, chunk_pos)], dim=1)
            keep = min(k, merged_sim.shape[1])
            best_sim, pos = merged_sim.topk(keep, dim=1)
            best_idx = merged_idx.gather(1, pos)
        return (1.0 - best_sim).clamp_min(0.0), best_idx

    def knn_distance(self, queries: torch.Tensor, k: int, **kwargs: object) -> torch.Tensor:
        """(B,) mean cosine distance to the ``k`` nearest bank vectors."""
        distances, _ = self.search(queries, k, **kwargs)  # type: ignore[arg-type]
        return distances.mean(dim=1)

    def leave_one_out_distance(
        self, k: int, *, batch_size: int = 1024, chunk_size: int = DEFAULT_CHUNK
    ) -> torch.Tensor:
        """(N,) mean distance of every bank vector to its ``k`` nearest *other* bank vectors."""
        out = []
        for start in range(0, self.size, batch_size):
            rows = torch.arange(start, min(start + batch_size, self.size), device=self.device)
            out.append(
                self.knn_distance(self.vectors[rows].float(), k, exclude=rows, chunk_size=chunk_size, normalised=True)
            )
        return torch.cat(out)
