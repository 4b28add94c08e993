"""/score throughput of this checkout against another one (an earlier commit), in one run.

Two services, each from its own checkout and its own registry seeded with the packaged demo, take
turns under the same wrk load (1 image a request; 1 and 32 connections), round after round, so
that whatever else the machine does falls on both alike. The figure is the ratio of the two
medians (this / other) at each concurrency; beside it, the ratio of the servers' CPU time per
request (other / this, from /proc: less swayed by other tenants of a shared machine than the
request rate, as a server that waits for a core spends no CPU time meanwhile).

    git worktree add /tmp/before <commit>
    python -m benchmarks.bench_ab --other /tmp/before --label after-issue-14

Or this checkout against itself under other settings (``--other-env``, ``--this-env``):

    python -m benchmarks.bench_ab --other . --other-env QSCORE_MONITOR=false --label monitor

Results: ``benchmarks/results/ab-<label>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.bench_service import WRK_SCRIPT, cifar_jpegs, ensure_wrk, free_port, write_bodies, wrk_run
from benchmarks.common import RESULTS, ROOT, cpu_model, load_average, write_result

CONNECTIONS = (1, 32)


class CheckoutServer:
    """``qscore``'s app factory served by uvicorn with the code of ``checkout`` and its own registry."""

    def __init__(self, checkout: Path, registry: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "PYTHONPATH": str(checkout),
            "QSCORE_REGISTRY_ROOT": str(registry),
            "QSCORE_DEVICE": "cpu",
            "PYTHONWARNINGS": "ignore",
            **(extra_env or {}),
        }
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--log-level", "warning", "--no-access-log"]
        self.process = subprocess.Popen(cmd, cwd=checkout, env=env)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"the server {self.url} did not start")
            time.sleep(0.2)

    def cpu_seconds(self) -> float:
        """User and system CPU time of the server process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--other", type=Path, required=True, help="the checkout to compare with")
    parser.add_argument("--label", default="ab", help="results file: benchmarks/results/ab-<label>.json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="wrk run length per server and concurrency")
    parser.add_argument("--this-env", action="append", default=[], metavar="KEY=VALUE", help="setting of this one")
    parser.add_argument("--other-env", action="append", default=[], metavar="KEY=VALUE", help="setting of the other")
    args = parser.parse_args()
    envs = {"this": _env(args.this_env), "other": _env(args.other_env)}
    if not (args.other / "service" / "app.py").is_file():
        raise SystemExit(f"{args.other} is not a qscore checkout (no service/app.py)")
    wrk = ensure_wrk()
    checkouts = {"this": ROOT, "other": args.other.resolve()}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {name: {c: [] for c in CONNECTIONS} for name in checkouts}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        script = tmp / "score.lua"
        script.write_text(WRK_SCRIPT)
        bodies = write_bodies(tmp, cifar_jpegs(256), 1)
        servers = {name: CheckoutServer(path, tmp / f"registry-{name}", envs[name]) for name, path in checkouts.items()}
        try:
            for server in servers.values():
                server.wait_ready()
                wrk_run(wrk, script, server.url, bodies, 8, 2, 1)  # warm-up
            for r in range(args.rounds):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for c in CONNECTIONS:
                    for name in order:
                        cpu = servers[name].cpu_seconds()
                        result = wrk_run(wrk, script, servers[name].url, bodies, c, args.seconds, 1)
                        cpu = servers[name].cpu_seconds() - cpu
                        result["server_cpu_ms_per_request"] = round(1000 * cpu / max(1, result["requests"]), 4)
                        runs[name][c].append(result)
                        print(f"round {r} {name} c={c}: {result['requests_per_s']} req/s", flush=True)
        finally:
            for server in servers.values():
                server.stop()
    summary = {}
    for c in CONNECTIONS:
        median = {name: statistics.median(x["requests_per_s"] for x in runs[name][c]) for name in checkouts}
        p50 = {name: statistics.median(x["p50_ms"] for x in runs[name][c]) for name in checkouts}
        cpu = {name: statistics.median(x["server_cpu_ms_per_request"] for x in runs[name][c]) for name in checkouts}
        summary[f"c{c}"] = {
            "this_requests_per_s": median["this"],
            "other_requests_per_s": median["other"],
            "ratio_this_over_other": round(median["this"] / median["other"], 3),
            "this_p50_ms": p50["this"],
            "other_p50_ms": p50["other"],
            "this_cpu_ms_per_request": cpu["this"],
            "other_cpu_ms_per_request": cpu["other"],
            "cpu_ratio_other_over_this": round(cpu["other"] / cpu["this"], 3),
        }
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "load_average_at_end": load_average()},
        "other": str(args.other),
        "other_commit": _commit(args.other),
        "this_commit": _commit(ROOT),
        "this_env": envs["this"],
        "other_env": envs["other"],
        "rounds": args.rounds,
        "seconds_per_run": args.seconds,
        "summary": summary,
        "runs": {name: {str(c): v for c, v in by_c.items()} for name, by_c in runs.items()},
    }
    write_result(RESULTS / f"ab-{args.label}.json", result)
    for c, s in summary.items():
        print(
            f"{c}: this {s['this_requests_per_s']} req/s, other {s['other_requests_per_s']} req/s, "
            f"ratio {s['ratio_this_over_other']}; CPU ms/request this {s['this_cpu_ms_per_request']}, other "
            f"{s['other_cpu_ms_per_request']}, ratio other/this {s['cpu_ratio_other_over_this']}"
        )


def _env(pairs: list[str]) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` as a dict; a pair without ``=`` is refused."""
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise SystemExit(f"settings must be KEY=VALUE, got {bad}")
    return dict(p.split("=", 1) for p in pairs)


def _commit(checkout: Path) -> str | None:
    out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


if __name__ == "__main__":
    main()
