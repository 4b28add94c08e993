"""The discover job: sharded steps for the Celery chain, the whole of it in one process.

Discovery is sharded (SPEC section 2): the reference sample is split into shards whose dominance
counts are computed apart and summed (:func:`count_shard`, :func:`discover_select`), then the
Q-Scores of every shard under the summed ``D`` (:func:`q_shard`), then the feature set is
assembled (:func:`discover_finalize`). Shard representations from the first pass are kept in the
job's scratch folder so the second pass does not run the encoder again when it lands on a
worker that can see them. Embedded mode runs the same steps one after the other
(:func:`discover_local`). The output is version ``features-<job id>``, reused when a job
delivered twice finds it there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.data.datasets import image_folder, random_sample, shard, subset
from models.data.transforms import eval_transform
from models.discovery.discover import (
    build_feature_set,
    count_pass,
    discover_folder,
    eps_grid,
    make_selection,
    q_pass,
    select_per_eps,
    with_typicality,
)
from models.scoring.dominance import DominanceCounts
from models.scoring.feature_set import DataProvenance, EncoderRef, FeatureSet, Preprocessing
from models.scoring.representations import extract_with_pixels
from models.storage.atomic import atomic_path
from worker.jobs.context import JobAlreadyOver, JobCancelled, JobContext
from worker.jobs.lifecycle import Outcome, activate, params_of
from worker.params import DiscoverParams, dataset_folder


@dataclass(frozen=True)
class DiscoverPlan:
    n_shards: int
    n_available: int


def discover_plan(ctx: JobContext) -> DiscoverPlan:
    """Draw the reference sample (seeded) and decide the shards."""
    p = params_of(ctx, DiscoverParams)
    ctx.check_cancelled()
    dataset = image_folder(dataset_folder(ctx.settings, p.dataset))
    sample = random_sample(len(dataset), p.sample_size, p.seed)
    wanted = p.shards or math.ceil(len(sample.indices) / ctx.settings.discover_shard_size)
    n_shards = len(shard(sample.indices, wanted))
    ctx.progress(
        0.0,
        {
            "images": len(sample.indices),
            "shards": n_shards,
            "shards_counted": 0,
            "shards_scored": 0,
            "phase": "counting",
        },
        force=True,
    )
    return DiscoverPlan(n_shards=n_shards, n_available=len(dataset))


def _shard_representations(ctx: JobContext, p: DiscoverParams, plan: DiscoverPlan, k: int) -> torch.Tensor:
    """(n_k, r) representations of shard ``k``: from the scratch folder, or the encoder."""
    cached = ctx.scratch / f"shard-{k}-of-{plan.n_shards}.pt"
    pixels_file = ctx.scratch / f"shard-{k}-of-{plan.n_shards}-pixels.pt"
    if cached.is_file() and pixels_file.is_file():
        return torch.load(cached, weights_only=True)
    imported = ctx.cached_model(p.model)
    dataset = image_folder(dataset_folder(ctx.settings, p.dataset), eval_transform(imported.encoder.spec))
    if len(dataset) != plan.n_available:
        raise ValueError(
            f"data set {p.dataset!r} changed while the job ran "
            f"({plan.n_available} images at the start, {len(dataset)} now)"
        )
    indices = shard(random_sample(len(dataset), p.sample_size, p.seed).indices, plan.n_shards)[k]
    h, _, pixels = extract_with_pixels(
        imported.encoder, subset(dataset, indices), batch_size=p.batch_size, device=ctx.device
    )
    ctx.scratch.mkdir(parents=True, exist_ok=True)
    # The pixel statistics of typicality (issue 10) first: a shard counts as cached once both are there.
    with atomic_path(pixels_file) as tmp:
        torch.save(pixels, tmp)
    with atomic_path(cached) as tmp:
        torch.save(h, tmp)
    return h


def _shard_reference(
    ctx: JobContext, p: DiscoverParams, plan: DiscoverPlan
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole reference sample's representations and pixel statistics, shard by shard."""
    hs, pix = [], []
    for k in range(plan.n_shards):
        hs.append(_shard_representations(ctx, p, plan, k))
        pix.append(torch.load(ctx.scratch / f"shard-{k}-of-{plan.n_shards}-pixels.pt", weights_only=True))
    return torch.cat(hs), {name: torch.cat([part[name] for part in pix]) for name in pix[0]}


def _guard_shard(ctx: JobContext) -> None:
    """Go on only while the job runs under this shard's attempt (else end the chain quietly)."""
    holds, cancel = ctx.store.holds(ctx.job_id, ctx.attempt)
    if not holds:
        raise JobAlreadyOver(ctx.job_id)
    if cancel:
        raise JobCancelled("stopped between its shard tasks")


def count_shard(ctx: JobContext, plan: DiscoverPlan, k: int) -> dict[str, Any]:
    """Dominance counts of shard ``k`` (JSON: :meth:`DominanceCounts.to_dict`)."""
    p = params_of(ctx, DiscoverParams)
    _guard_shard(ctx)
    h = _shard_representations(ctx, p, plan, k)
    counts = count_pass(torch.split(h, p.batch_size), eps_grid(p.eps))
    done = ctx.store.incr(ctx.job_id, "shards_counted")
    ctx.progress(
        0.5 * min(done, plan.n_shards) / plan.n_shards,
        {"shards_counted": min(done, plan.n_shards)},
        force=True,
    )
    return counts.to_dict()


def discover_select(ctx: JobContext, shard_counts: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Sum the shards' counts and choose ``D`` for every eps: (counts, {eps: indices})."""
    p = params_of(ctx, DiscoverParams)
    _guard_shard(ctx)
    parts = [DominanceCounts.from_dict(c) for c in shard_counts]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    selections = select_per_eps(total, make_selection(p.lo, p.hi, p.size))
    ctx.progress(0.5, {"phase": "scoring"}, force=True)
    return total.to_dict(), {repr(eps): d.tolist() for eps, d in selections.items()}


def q_shard(ctx: JobContext, plan: DiscoverPlan, k: int, selections: dict[str, list[int]]) -> dict[str, list[float]]:
    """Reference Q-Scores of shard ``k`` under the summed ``D``, per eps."""
    p = params_of(ctx, DiscoverParams)
    _guard_shard(ctx)
    h = _shard_representations(ctx, p, plan, k)
    d = {float(e): torch.tensor(ix, dtype=torch.int64) for e, ix in selections.items()}
    q = q_pass(torch.split(h, p.batch_size), d)
    done = ctx.store.incr(ctx.job_id, "shards_scored")
    ctx.progress(
        0.5 + 0.45 * min(done, plan.n_shards) / plan.n_shards,
        {"shards_scored": min(done, plan.n_shards)},
        force=True,
    )
    return {repr(eps): values.tolist() for eps, values in q.items()}


def discover_finalize(
    ctx: JobContext,
    plan: DiscoverPlan,
    counts: dict[str, Any],
    selections: dict[str, list[int]],
    q_parts: list[dict[str, list[float]]],
) -> Outcome:
    """Assemble the feature set and write it as version ``features-<job id>``."""
    p = params_of(ctx, DiscoverParams)
    _guard_shard(ctx)
    registry = ctx.registry
    version = f"features-{ctx.job_id}"
    if not registry.feature_set_dir(version).exists():
        record = registry.model_record(p.model)
        sample = random_sample(plan.n_available, p.sample_size, p.seed)
        feature_set = build_feature_set(
            counts=DominanceCounts.from_dict(counts),
            selections={float(e): torch.tensor(ix, dtype=torch.int64) for e, ix in selections.items()},
            q_by_eps={
                float(e): np.concatenate([np.asarray(part[e], dtype=np.float32) for part in q_parts])
                for e in selections
            },
            eps=p.eps,
            selection=make_selection(p.lo, p.hi, p.size),
            encoder=EncoderRef(
                fingerprint=record.fingerprint,
                arch=record.spec.arch,
                feature_dim=record.spec.feature_dim,
                model_version=p.model,
                preprocessing=Preprocessing.of(record.spec),
            ),
            data=DataProvenance(
                dataset=p.dataset,
                n_available=sample.n_available,
                n_reference=len(sample.indices),
                sampling=sample.description,
                seed=p.seed,
            ),
        )
        # The reference bank and typicality, written with the feature set (issue 10).
        feature_set = with_typicality(feature_set, *_shard_reference(ctx, p, plan))
        ctx.fence()
        registry.add_feature_set(feature_set, version=version)
    feature_set = registry.load_feature_set(version)
    activated = activate(ctx, p.activate, p.model, version)
    result = {
        "model": p.model,
        "feature_set": version,
        "activated": activated,
        "eps": feature_set.eps,
        "coverage": feature_set.coverage,
        "coverage_by_eps": feature_set.coverage_by_eps,
        "discriminative": len(feature_set.discriminative),
        "alpha": feature_set.alpha,
        "n_reference": feature_set.data.n_reference,
        "shards": plan.n_shards,
        "coverage_warning": feature_set.coverage_warning,
        "selection_warning": feature_set.selection_warning,
        "negative_share": feature_set.negative_share,
        "signed_warning": feature_set.signed_warning,
        "bank_vectors": 0 if feature_set.bank is None else feature_set.bank.size,
        "typicality_threshold": None if feature_set.typicality is None else feature_set.typicality.threshold,
    }
    return result, {"feature_set": version}


def discover_local(ctx: JobContext) -> Outcome:
    """The whole discovery in this process, shard after shard (embedded mode)."""
    plan = discover_plan(ctx)
    counts = [count_shard(ctx, plan, k) for k in range(plan.n_shards)]
    total, selections = discover_select(ctx, counts)
    q_parts = [q_shard(ctx, plan, k, selections) for k in range(plan.n_shards)]
    return discover_finalize(ctx, plan, total, selections, q_parts)


def discover_in_process(
    ctx: JobContext,
    p: DiscoverParams,
    model: str,
    version: str,
    on_progress: Callable[[float], None],
) -> FeatureSet:
    """One-process, unsharded discovery on ``model`` (a regularize job's result), written as ``version``."""
    registry = ctx.registry
    if not registry.feature_set_dir(version).exists():
        feature_set = discover_folder(
            registry.load_model(model),
            dataset_folder(ctx.settings, p.dataset),
            dataset_name=p.dataset,
            model_version=model,
            eps=p.eps,
            lo=p.lo,
            hi=p.hi,
            size=p.size,
            sample_size=p.sample_size,
            seed=p.seed,
            batch_size=p.batch_size,
            device=ctx.device,
            on_progress=on_progress,
        )
        ctx.fence()
        registry.add_feature_set(feature_set, version=version)
    return registry.load_feature_set(version)
