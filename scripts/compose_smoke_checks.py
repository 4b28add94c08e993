"""The checks of scripts/compose-smoke.sh, against a running compose stack, through its published ports.

1. ``POST /score`` with real CIFAR-10 JPEGs: every image scored, with the Q-Scores that
   ``qscore score`` gives for the same files and the same demo pair (``--expected``).
2. The job endpoints need the API key of the environment (401 without it); a discover job over
   the mounted image folder runs on the worker container to success and writes its feature set.
3. Prometheus, in its container, scrapes the API and the worker (targets up, the API's counter
   of scored images as this run left it) with the alert rules loaded (``/api/v1/rules``), and
   knows Alertmanager.
4. The worker container restarted (SIGKILL, then started again) in the middle of a regularize
   job: RabbitMQ delivers the job again, the restarted worker resumes it from its checkpoint and
   it succeeds, once, on a second attempt.

Each check prints one line with its time; the first failure ends the run with its reason.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

RULE_GROUPS = {"qscore-recording", "qscore-alerts"}
ALERTS = {
    "QScoreHighLowQualityShare",
    "QScoreMedianShift",
    "QScoreInputShift",
    "QScoreErrorBurst",
    "QScoreQueueSaturated",
}


class CheckFailed(Exception):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def poll(what: str, fetch: Callable[[], Any], until: Callable[[Any], bool], timeout: float, every: float = 1.0) -> Any:
    """fetch() until until(value) holds; the last value (or error) is in the failure message."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = fetch()
            if until(last):
                return last
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what}: not after {timeout:.0f} s; last: {str(last)[:1500]}")
        time.sleep(every)


class Stack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.api = httpx.Client(base_url=args.api, timeout=60)
        self.prometheus = httpx.Client(base_url=args.prometheus, timeout=30)
        self.key = {"X-API-Key": args.api_key}
        self.args = args

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.api.get(f"/jobs/{job_id}", headers=self.key)
        response.raise_for_status()
        return dict(response.json())

    def submit(self, kind: str, body: dict[str, Any]) -> str:
        response = self.api.post(f"/jobs/{kind}", json=body, headers=self.key)
        expect(response.status_code == 202, f"POST /jobs/{kind}: {response.status_code} {response.text}")
        return str(response.json()["job_id"])

    def wait_done(self, job_id: str, timeout: float) -> dict[str, Any]:
        return dict(
            poll(
                f"job {job_id} to end",
                lambda: self.job(job_id),
                lambda r: r["state"] in ("succeeded", "failed", "cancelled"),
                timeout,
            )
        )

    def query(self, promql: str) -> list[dict[str, Any]]:
        response = self.prometheus.get("/api/v1/query", params={"query": promql})
        response.raise_for_status()
        return list(response.json()["data"]["result"])


def check_score(stack: Stack) -> str:
    images: list[Path] = stack.args.images
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in images]
    response = stack.api.post("/score", files=files)
    expect(response.status_code == 200, f"POST /score: {response.status_code} {response.text[:500]}")
    body = response.json()
    results = body["results"]
    expect([r["filename"] for r in results] == [p.name for p in images], f"filenames: {results}")
    expect(all(r["error"] is None and 0.0 <= r["q_score"] for r in results), f"results: {results}")
    expected = {Path(e["path"]).name: e for e in map(json.loads, stack.args.expected.read_text().splitlines())}
    worst = 0.0
    for r in results:
        e = expected[r["filename"]]
        worst = max(worst, abs(r["q_score"] - e["q_score"]))
        expect(r["low_quality"] == e["low_quality"], f"{r['filename']}: low_quality {r} against {e}")
    expect(worst <= 1e-5, f"Q-Scores differ from `qscore score` by up to {worst:.2e}")
    scores = ", ".join(f"{r['q_score']:.4f}" for r in results)
    return (
        f"{len(results)} JPEGs scored by {body['model']['version']} / {body['feature_set']['version']}; "
        f"Q-Scores {scores}; equal to `qscore score` (max diff {worst:.1e})"
    )


def check_discover(stack: Stack) -> str:
    unauthorised = stack.api.post("/jobs/discover", json={"dataset": "cifar10-train"})
    expect(unauthorised.status_code == 401, f"POST /jobs/discover without the key: {unauthorised.status_code}")
    job_id = stack.submit("discover", {"dataset": "cifar10-train", "eps": "auto", "sample_size": 200, "shards": 2})
    record = stack.wait_done(job_id, timeout=stack.args.job_timeout)
    expect(record["state"] == "succeeded", f"discover job: {json.dumps(record)[:2000]}")
    expect(record["artifacts"] == {"feature_set": f"features-{job_id}"}, f"artifacts: {record['artifacts']}")
    worker = record["history"][-1]["worker"]
    feature_sets = stack.api.get("/admin/feature-sets", headers=stack.key).json()
    expect(any(f["version"] == f"features-{job_id}" for f in feature_sets), f"feature sets: {feature_sets}")
    return f"discover job {job_id}: succeeded on {worker}, wrote features-{job_id} (in the shared registry volume)"


def check_prometheus(stack: Stack, scored: int) -> str:
    def targets() -> dict[str, str]:
        response = stack.prometheus.get("/api/v1/targets")
        response.raise_for_status()
        return {t["labels"]["job"]: t["health"] for t in response.json()["data"]["activeTargets"]}

    up = poll(
        "Prometheus scraping qscore-api and qscore-worker",
        targets,
        lambda t: t.get("qscore-api") == "up" and t.get("qscore-worker") == "up",
        timeout=120,
        every=2,
    )
    rules = stack.prometheus.get("/api/v1/rules").json()["data"]["groups"]
    groups = {g["name"] for g in rules}
    alerts = {r["name"] for g in rules for r in g["rules"] if r["type"] == "alerting"}
    expect(RULE_GROUPS <= groups and ALERTS <= alerts, f"rules loaded: groups {groups}, alerts {alerts}")
    counted = poll(
        "the API's scored-images counter in Prometheus",
        lambda: stack.query("sum(qscore_images_scored_total)"),
        lambda r: bool(r) and float(r[0]["value"][1]) == scored,
        timeout=90,
        every=3,
    )
    alertmanagers = stack.prometheus.get("/api/v1/alertmanagers").json()["data"]["activeAlertmanagers"]
    expect(len(alertmanagers) == 1 and ":9093" in alertmanagers[0]["url"], f"alertmanagers: {alertmanagers}")
    return (
        f"targets {sorted(up.items())}; {len(alerts)} alert rules in {sorted(groups)}; "
        f"sum(qscore_images_scored_total) = {counted[0]['value'][1]}; Alertmanager {alertmanagers[0]['url']}"
    )


def check_worker_restart(stack: Stack) -> str:
    steps = 20
    job_id = stack.submit(
        "regularize",
        {
            "dataset": "cifar10-train",
            "batch_size": 32,
            "epochs": 20,
            "max_steps": steps,
            "checkpoint_every": 2,
            "discover": {"dataset": "cifar10-train", "eps": "auto", "sample_size": 100, "batch_size": 50},
        },
    )
    record = poll(
        f"regularize job {job_id} to pass step 4",
        lambda: stack.job(job_id),
        lambda r: r["state"] == "running" and r["metrics"].get("step", 0) >= 4,
        timeout=stack.args.job_timeout,
        every=0.5,
    )
    step = record["metrics"]["step"]
    started = time.monotonic()
    # SIGKILL at once (no graceful stop): the worker's broker connection drops mid-job, as when
    # a container is OOM-killed or its host lost. (A graceful stop lets the job finish first, up
    # to compose's stop_grace_period, then kills it the same way.)
    restarted = subprocess.run(
        [*stack.args.podman, "restart", "--time", "0", stack.args.worker_container], capture_output=True, text=True
    )
    expect(restarted.returncode == 0, f"podman restart: {restarted.stderr[-1000:]}")
    again = poll(
        f"job {job_id} to start again after the restart",
        lambda: stack.job(job_id),
        lambda r: r["attempts"] >= 2,
        timeout=stack.args.job_timeout,
    )
    resumed_after = time.monotonic() - started
    record = stack.wait_done(job_id, timeout=stack.args.job_timeout)
    expect(record["state"] == "succeeded", f"regularize job after the restart: {json.dumps(record)[:2500]}")
    first, second = record["history"]
    expect(record["attempts"] == 2 and again["attempts"] == 2, f"attempts: {record['attempts']}")
    expect(first["outcome"] == "lost" and "delivered again (attempt 2" in (first["reason"] or ""), f"first: {first}")
    expect(second["outcome"] == "succeeded", f"second attempt: {second}")
    training = record["result"]["training"]
    expect(training["steps"] == steps and training["resumed_from"] >= 2, f"training: {training}")
    expected = {"model": f"model-{job_id}", "feature_set": f"features-{job_id}"}
    expect(record["artifacts"] == expected, f"artifacts: {record['artifacts']}")
    return (
        f"regularize job {job_id}: worker restarted at step {step}, running again {resumed_after:.1f} s later "
        f"(attempt 2, resumed from step {training['resumed_from']}), succeeded with {training['steps']} steps; "
        f"attempt 1 '{first['outcome']}'"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", required=True, help="the API's published URL")
    parser.add_argument("--prometheus", required=True, help="Prometheus's published URL")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--images", type=Path, nargs="+", required=True, help="JPEGs for /score")
    parser.add_argument("--expected", type=Path, required=True, help="`qscore score --json` of the same images")
    parser.add_argument("--worker-container", required=True)
    parser.add_argument("--podman", nargs="+", default=["podman"], help="the container command")
    parser.add_argument("--job-timeout", type=float, default=300)
    args = parser.parse_args(argv)
    stack = Stack(args)
    checks: list[tuple[str, Callable[[], str]]] = [
        ("POST /score", lambda: check_score(stack)),
        ("discover job", lambda: check_discover(stack)),
        ("Prometheus", lambda: check_prometheus(stack, scored=len(args.images))),
        ("worker restart mid-job", lambda: check_worker_restart(stack)),
    ]
    for name, check in checks:
        started = time.monotonic()
        try:
            detail = check()
        except (CheckFailed, httpx.HTTPError, KeyError, subprocess.CalledProcessError) as exc:
            say(f"FAIL  {name} ({time.monotonic() - started:.1f} s): {type(exc).__name__}: {exc}")
            return 1
        say(f"ok    {name} ({time.monotonic() - started:.1f} s): {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
