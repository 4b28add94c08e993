"""The atlas job (issue 16): a feature set's atlas over a data set, written into the registry.

Runs in a Celery worker (``qscore.atlas``, ``worker/tasks.py``) and in embedded mode
(``worker.jobs.BODIES``), written against a :class:`~worker.jobs.context.JobContext` like the
other jobs. Idempotent: the atlas is named after the job (``atlas-<job id>``) and written atomically
beside its feature set (``Registry.add_atlas``), so a job delivered twice writes it once and a
killed one leaves nothing half written. Progress: the representations of the reference sample,
then the heatmaps, then the contact sheets; a cancellation is seen between batches.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from models.data.datasets import image_folder, random_sample
from models.explanation.atlas import AtlasConfig, compute_atlas, read_atlas
from worker.jobs.context import JobContext
from worker.jobs.lifecycle import Outcome, params_of
from worker.params import AtlasParams, dataset_folder


def atlas(ctx: JobContext) -> Outcome:
    """The atlas of ``feature_set`` over ``dataset``, written as ``atlas-<job id>`` beside it."""
    p = params_of(ctx, AtlasParams)
    assert p.model is not None and p.feature_set is not None  # resolved when the job was queued
    registry = ctx.registry
    name = f"atlas-{ctx.job_id}"
    if not registry.atlas_dir(p.feature_set, name).exists():
        imported = ctx.cached_model(p.model)
        feature_set = registry.load_feature_set(p.feature_set)
        folder = dataset_folder(ctx.settings, p.dataset)
        sample = random_sample(len(image_folder(folder)), p.sample_size, p.seed)
        ctx.progress(0.0, {"phase": "representations", "images": len(sample.indices)}, force=True)
        last_check = [0.0]

        def on_progress(fraction: float, phase: str) -> None:
            now = time.monotonic()
            if now - last_check[0] >= 0.5:  # the job store is asked at most twice a second
                last_check[0] = now
                ctx.check_cancelled()
                ctx.progress(0.98 * fraction, {"phase": phase}, force=True)

        result = compute_atlas(
            imported.encoder,
            feature_set,
            folder,
            sample.indices,
            AtlasConfig(top_k=p.top_k, tail_sample=p.tail_sample, seed=p.seed, batch_size=p.batch_size),
            device=ctx.device,
            on_progress=on_progress,
        )
        result.meta.update(
            dataset=p.dataset, model=p.model, feature_set=p.feature_set, sampling=sample.description, job=ctx.job_id
        )
        ctx.check_cancelled()
        ctx.fence()  # only the attempt holding the job writes
        registry.add_atlas(p.feature_set, name, result)
    else:
        ctx.fence()
        registry.add_atlas(p.feature_set, name)
    data = read_atlas(registry.atlas_dir(p.feature_set, name))
    by_group: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for feature in data["features"].values():
        counts[feature["group"]] += 1
        if feature["purity"] is not None:
            by_group[feature["group"]].append(feature["purity"])
    summary = {
        group: {"features": counts[group], "median_purity": float(np.median(v)) if (v := by_group[group]) else None}
        for group in counts
    }
    return (
        {
            "model": p.model,
            "feature_set": p.feature_set,
            "atlas": name,
            "n_images": data["n_images"],
            "method": data["method"],
            "features": len(data["features"]),
            "labelled": data["classes"] is not None,
            "groups": summary,
        },
        {"atlas": name},
    )
