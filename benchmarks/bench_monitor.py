"""What the traffic monitor costs the inference thread and its drift thread (not a test).

    python -m benchmarks.bench_monitor [--rounds 20]

In one process, on the demo encoder and CIFAR-10 test images, at batch 1 and 32:
- the batcher's inference step (``service.batcher._score``: infer, postprocess) with and without
  the monitor, interleaved round by round (off, on, on, off) so that a shared machine's load falls
  on both alike: the ratio of the medians, which on a shared 2-core machine is only good to a few
  per cent (an A/A comparison moves as much);
- ``TrafficMonitor.observe`` alone on that step's real outputs and pixels (the image properties of
  the drift test, the demo's feature set holding the held-out images'), and the throughput ratio it
  implies, ``step / (step + observe)``: the precise figure; the same where the feature set's
  error estimator is COTT (the head runs on every batch to keep its class probabilities), and
  ``snapshot()`` of a full COTT window (the transport, solved when ``/monitor`` or a scrape asks);
- the drift test of a full window (500 against 1,000 reference vectors, the default 500
  permutations, and the typicality and image property tests against the feature set's held-out images; one BLAS
  thread) as the drift thread runs it: at the default ``QSCORE_DRIFT_MIN_INTERVAL_S`` of 10 s it
  takes at most (test time / 10 s) of one core.

The HTTP A/B (``bench_ab --other . --other-env QSCORE_MONITOR=false``) measures the same end to
end, within its noise. Result: benchmarks/results/monitor.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import UTC, datetime
from types import SimpleNamespace

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from benchmarks.bench_service import cifar_jpegs
from benchmarks.common import RESULTS, ROOT, cpu_model, load_average, write_result
from models.data.images import decode_image
from models.encoders.loading import load_encoder
from models.monitoring.drift import DriftReference
from models.monitoring.image_properties import PROPERTIES
from models.monitoring.monitor import TrafficMonitor
from models.scoring.error_estimate import ErrorEstimator
from models.scoring.feature_set import FeatureSet
from models.scoring.scorer import Scorer
from service.batcher import _score

WEIGHTS = ROOT / "models" / "weights"


def _seconds_per_call(call, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))  # the service's default intra-op threads
    features = FeatureSet.load(WEIGHTS / "demo-feature-set.json")
    imported = load_encoder(WEIGHTS / "demo-encoder.safetensors")
    scorer = Scorer(imported.encoder, imported.fingerprint, features, "cpu")
    state = SimpleNamespace(scorer=scorer, model_version="demo", feature_set_version="demo")
    monitor = TrafficMonitor(window=500, drift_every=100, drift_min_interval_s=10.0)
    monitor.activate("demo", "demo", features)
    assert features.head is not None
    cott = ErrorEstimator(
        method="cott", threshold=0.5, class_prior=[1 / len(features.head.classes)] * len(features.head.classes)
    )
    cott_monitor = TrafficMonitor(window=500, drift_every=10**9)  # no drift tests: observe and the estimate alone
    cott_monitor.activate("demo", "demo", features.model_copy(update={"error_estimator": cott}))
    pixels = [scorer.preprocess(decode_image(b, 40_000_000)) for b in cifar_jpegs(64)]
    result: dict = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "batches": {},
    }
    for batch in (1, 32):
        images, wanted = pixels[:batch], [False] * batch
        calls = max(20, 400 // batch)
        off, on = [], []
        for r in range(args.rounds):
            for monitored in (False, True) if r % 2 == 0 else (True, False):
                chosen = monitor if monitored else None
                seconds = _seconds_per_call(lambda: _score(state, images, wanted, chosen), calls)  # noqa: B023
                (on if monitored else off).append(seconds)
        inference = scorer.infer(images)
        scores = scorer.postprocess(inference, wanted)
        observe = statistics.median(
            _seconds_per_call(lambda: monitor.observe("demo", inference.h, scores, "demo", pixels=images), 2000)  # noqa: B023
            for _ in range(5)
        )
        for _ in range(500 // batch + 1):  # a full window, so that the snapshot solves the transport
            cott_monitor.observe("demo", inference.h, scores, "demo", pixels=images)
        observe_cott = statistics.median(
            _seconds_per_call(lambda: cott_monitor.observe("demo", inference.h, scores, "demo", pixels=images), 2000)  # noqa: B023
            for _ in range(5)
        )
        step = statistics.median(off)
        figures = {
            "step_ms_monitor_off": round(1000 * step, 4),
            "step_ms_monitor_on": round(1000 * statistics.median(on), 4),
            "interleaved_ratio_on_over_off": round(step / statistics.median(on), 4),
            "observe_us": round(1e6 * observe, 2),
            "implied_ratio_on_over_off": round(step / (step + observe), 4),
            "observe_us_cott": round(1e6 * observe_cott, 2),
            "implied_ratio_on_over_off_cott": round(step / (step + observe_cott), 4),
        }
        result["batches"][str(batch)] = figures
        print(f"batch {batch}: {figures}", flush=True)
    snapshot_ms = 1000 * statistics.median(_seconds_per_call(cott_monitor.snapshot, 20) for _ in range(5))
    assert cott_monitor.snapshot()[0].estimated_error_method == "cott"
    result["cott_snapshot_ms_window_500"] = round(snapshot_ms, 3)
    print(f"snapshot of a full COTT window: {snapshot_ms:.3f} ms", flush=True)
    monitor.close()
    cott_monitor.close()
    bank = features.bank.vectors.float().numpy()  # type: ignore[union-attr]
    window = bank[np.random.default_rng(0).choice(len(bank), 500, replace=False)]
    with threadpool_limits(1, user_api="blas"):
        held_out = np.asarray(features.typicality.held_out)  # type: ignore[union-attr]
        properties = {k: np.asarray(v) for k, v in (features.held_out_image_properties or {}).items()}
        reference = DriftReference(bank, held_out_typicality=held_out, held_out_properties=properties)
        drawn = np.random.default_rng(1).choice(len(held_out), 500)
        typicality = held_out[drawn]
        window_properties = (
            np.stack([np.asarray(properties[name])[drawn] for name in PROPERTIES]) if properties else None
        )

        def one_test() -> None:
            reference.test(window, seed=7, typicality=typicality, properties=window_properties)

        tests = [_seconds_per_call(one_test, 1) for _ in range(5)]
    drift_ms = 1000 * statistics.median(tests)
    result["drift_test_ms_one_thread"] = round(drift_ms, 1)
    result["drift_thread_core_share_at_default_interval"] = round(drift_ms / 1000 / 10.0, 4)
    result["load_average_at_end"] = load_average()
    print(f"drift test: {drift_ms:.1f} ms on one thread", flush=True)
    write_result(RESULTS / "monitor.json", result)


if __name__ == "__main__":
    main()
