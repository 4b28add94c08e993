"""POST /explain against POST /score for one image (issue 16 goal: /explain p50 <= 3x /score p50),
and the atlas job over the demo's 5,000 reference images (goal: under 10 minutes on this CPU).

One ``qscore`` service (uvicorn, the app factory, a registry seeded with the packaged demo) in its
own process; ``wrk`` (one connection, keep-alive, as ``bench_service`` measures /score) posts the
same 32x32 CIFAR-10 JPEG in runs that alternate /score and /explain (default ``?top=3``, PNG
overlays in the answer), round after round, so whatever else the machine does falls on both
alike. The figure is the ratio of the medians of the runs' p50s. Each round also times /score
while a second client posts /explain back to back ("score_under_explain"): explanations run in
their own thread, so what slows /score then is only the shared CPU. With ``--atlas`` the same
service (embedded jobs) then runs ``POST /jobs/atlas`` on CIFAR-10 train (5,000 images drawn as
discovery draws them) and the job's own start and end times are reported.

    python -m benchmarks.bench_explain [--rounds 4] [--seconds 5] [--top 3] [--atlas]

Results: ``benchmarks/results/explain.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.bench_service import WRK_SCRIPT, cifar_jpegs, ensure_wrk, free_port, write_bodies, wrk_run
from benchmarks.common import RESULTS, ROOT, cpu_model, load_average, pythonpath, write_result
from models.data.datasets import ensure_cifar10

GOAL_RATIO = 3.0
GOAL_ATLAS_S = 600.0


class Service:
    """``qscore``'s app factory under uvicorn in its own process, on its own registry."""

    def __init__(self, registry: Path, datasets: dict[str, str]) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {
            **os.environ,
            "PYTHONPATH": pythonpath(),
            "PYTHONWARNINGS": "ignore",
            "QSCORE_REGISTRY_ROOT": str(registry),
            "QSCORE_DEVICE": "cpu",
            "QSCORE_DATASETS": json.dumps(datasets),
            "QSCORE_JOB_CHECKPOINT_DIR": str(registry.parent / "checkpoints"),
        }
        command = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--host", "127.0.0.1"]
        command += ["--port", self.url.rsplit(":", 1)[1], "--log-level", "warning", "--no-access-log"]
        self.process = subprocess.Popen(command, cwd=ROOT, env=env)
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"the service at {self.url} did not start")
            time.sleep(0.3)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def score_while_explaining(
    wrk: str, script: Path, url: str, bodies: Path, explain_path: str, blob: bytes, seconds: float
) -> dict[str, Any]:
    """A wrk run on /score while another client keeps one /explain in flight."""
    stop = threading.Event()
    explained = [0]

    def explain_loop() -> None:
        with httpx.Client(base_url=url, timeout=60) as other:
            while not stop.is_set():
                other.post(explain_path, files={"files": ("cat.jpg", blob, "image/jpeg")})
                explained[0] += 1

    thread = threading.Thread(target=explain_loop, daemon=True)
    thread.start()
    try:
        run = wrk_run(wrk, script, url, bodies, 1, seconds, 1, "/score")
    finally:
        stop.set()
        thread.join(60)
    return {**run, "explanations_meanwhile": explained[0]}


def atlas_job(service: Service, sample_size: int) -> dict[str, Any]:
    with httpx.Client(base_url=service.url, timeout=60) as client:
        started = time.perf_counter()
        accepted = client.post("/jobs/atlas", json={"dataset": "cifar10-train", "sample_size": sample_size})
        if accepted.status_code != 202:
            raise SystemExit(f"POST /jobs/atlas answered {accepted.status_code}: {accepted.text[:300]}")
        job = accepted.json()["job_id"]
        while True:
            record = client.get(f"/jobs/{job}").json()
            if record["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1.0)
        wall = time.perf_counter() - started
    if record["state"] != "succeeded":
        raise SystemExit(f"the atlas job ended {record['state']}: {record['error']}")
    return {
        "images": record["result"]["n_images"],
        "features": record["result"]["features"],
        "method": record["result"]["method"],
        "job_seconds": round(record["finished_at"] - record["started_at"], 1),
        "wall_seconds_with_queueing": round(wall, 1),
        "goal_seconds": GOAL_ATLAS_S,
        "goal_met": record["finished_at"] - record["started_at"] < GOAL_ATLAS_S,
        "groups": record["result"]["groups"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each wrk run")
    parser.add_argument("--top", type=int, default=3, help="heatmaps per /explain answer")
    parser.add_argument("--atlas", action="store_true", help="also time POST /jobs/atlas over --atlas-images")
    parser.add_argument("--atlas-images", type=int, default=5000)
    args = parser.parse_args()
    wrk = ensure_wrk()
    blob = cifar_jpegs(1)[0]
    runs: dict[str, list[dict[str, Any]]] = {"score": [], "explain": [], "score_under_explain": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        script = tmp / "post.lua"
        script.write_text(WRK_SCRIPT)
        bodies = write_bodies(tmp, [blob], 1, n_bodies=1)
        service = Service(tmp / "registry", {"cifar10-train": str(ensure_cifar10() / "train")})
        try:
            paths = {"score": "/score", "explain": f"/explain?top={args.top}"}
            for path in paths.values():  # warm-up (the explainer is made on first use)
                wrk_run(wrk, script, service.url, bodies, 1, 2, 1, path)
            for r in range(args.rounds):
                order = list(paths) if r % 2 == 0 else list(reversed(paths))
                for name in order:
                    run = wrk_run(wrk, script, service.url, bodies, 1, args.seconds, 1, paths[name])
                    if run["non_2xx"] or run["socket_errors"]:
                        raise SystemExit(f"{paths[name]}: {run}")
                    runs[name].append(run)
                runs["score_under_explain"].append(
                    score_while_explaining(wrk, script, service.url, bodies, paths["explain"], blob, args.seconds)
                )
                print(
                    f"round {r}: /score p50 {runs['score'][-1]['p50_ms']} ms, /explain p50 "
                    f"{runs['explain'][-1]['p50_ms']} ms, /score during explanations "
                    f"{runs['score_under_explain'][-1]['p50_ms']} ms",
                    flush=True,
                )
            atlas = atlas_job(service, args.atlas_images) if args.atlas else None
        finally:
            service.stop()

    def summary(name: str) -> dict[str, float]:
        return {
            "p50_ms": round(statistics.median(x["p50_ms"] for x in runs[name]), 2),
            "p99_ms": round(statistics.median(x["p99_ms"] for x in runs[name]), 2),
            "requests_per_s": round(statistics.median(x["requests_per_s"] for x in runs[name]), 1),
        }

    ratio = summary("explain")["p50_ms"] / summary("score")["p50_ms"]
    result: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "load_average_at_end": load_average()},
        "model": "demo (packaged SimCLR ResNet-18, width 16, 32x32)",
        "image": "one CIFAR-10 test JPEG, 32x32; wrk, 1 connection",
        "top": args.top,
        "rounds": args.rounds,
        "seconds_per_run": args.seconds,
        "score": summary("score"),
        "explain": summary("explain"),
        "score_under_explain": summary("score_under_explain"),
        "ratio_p50_explain_over_score": round(ratio, 2),
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio <= GOAL_RATIO,
        "atlas_job": atlas,
        "runs": runs,
    }
    write_result(RESULTS / "explain.json", result)
    keys = ("score", "explain", "score_under_explain", "ratio_p50_explain_over_score", "goal_met")
    print(json.dumps({k: result[k] for k in keys}))
    if atlas is not None:
        print(json.dumps({"atlas_job": atlas}))


if __name__ == "__main__":
    main()
