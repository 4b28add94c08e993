"""Fixtures of the job tests: a dedicated Redis database, real Celery worker processes, the app.

Workers are started as separate processes (``celery -A worker.celery_app worker``), never in
eager mode; each test gets a fresh registry, checkpoint folder and a flushed Redis database.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from models.registry.versions import Registry

REPO = Path(__file__).resolve().parents[2]
CELERY = str(Path(sys.executable).parent / "celery")
# QSCORE_TEST_REDIS_PORT: another Redis (e.g. a private one with more than the default 16 databases).
REDIS_HOST, REDIS_PORT = "127.0.0.1", int(os.environ.get("QSCORE_TEST_REDIS_PORT", "6379"))
# A database of its own, so that two checkouts can run the job tests side by side.
REDIS_DB = int(os.environ.get("QSCORE_TEST_REDIS_DB", "5"))
JOB_TIME_LIMIT_S = 40  # short, so that the visibility timeout (re-delivery after a kill) is short too
VISIBILITY_S = 45


RABBITMQ_PORT = 5672


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


def purge_queue(broker_url: str, queue: str = "qscore") -> None:
    """Drop what earlier tests left in the queue (a killed worker's job is re-queued, by design)."""
    import kombu

    with kombu.Connection(broker_url, connect_timeout=5) as conn, contextlib.suppress(Exception):
        conn.default_channel.queue_purge(queue)


@pytest.fixture(scope="session")
def rabbitmq_vhost() -> Iterator[str]:
    """A vhost of this test run on the RabbitMQ at 127.0.0.1:5672 (guest), deleted at the end."""
    if shutil.which("rabbitmqctl") is None or not port_open(RABBITMQ_PORT):
        pytest.skip("no RabbitMQ at 127.0.0.1:5672 (or no rabbitmqctl)")
    vhost = f"qscore-test-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield f"amqp://guest:guest@127.0.0.1:{RABBITMQ_PORT}/{vhost}"
    rabbitmqctl("delete_vhost", vhost)


@pytest.fixture()
def rabbitmq_url(rabbitmq_vhost: str) -> str:
    purge_queue(rabbitmq_vhost)
    return rabbitmq_vhost


def redis_up(port: int = REDIS_PORT) -> bool:
    import redis

    try:
        return bool(redis.Redis(host=REDIS_HOST, port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def redis_url() -> Iterator[str]:
    """The shared Redis at 127.0.0.1:6379, database 5 (``QSCORE_TEST_REDIS_DB``), flushed before and after the test."""
    import redis

    if not redis_up():
        pytest.skip("no Redis at 127.0.0.1:6379 (start one: redis-server --daemonize yes)")
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    client.flushdb()
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    client.flushdb()


@pytest.fixture()
def job_env(tmp_path: Path, tiny_registry: Registry, cifar_slice: Path) -> dict[str, str]:
    """QSCORE_* variables shared by the workers and the app (no Redis URL yet)."""
    return {
        "QSCORE_REGISTRY_ROOT": str(tiny_registry.root),
        "QSCORE_DATASETS": json.dumps(
            {"slice-train": str(cifar_slice / "train"), "slice-test": str(cifar_slice / "test")}
        ),
        "QSCORE_JOB_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "QSCORE_JOB_TIME_LIMIT_S": str(JOB_TIME_LIMIT_S),
        "QSCORE_JOB_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
        "QSCORE_DEVICE": "cpu",
        "QSCORE_WORKER_TORCH_THREADS": "1",
        "QSCORE_REGISTRY_POLL_SECONDS": "0.2",
    }


def make_settings(env: dict[str, str], **overrides: Any) -> Any:
    from qscore_config.settings import Settings

    values = {k.removeprefix("QSCORE_").lower(): v for k, v in env.items() if k.startswith("QSCORE_")}
    values["datasets"] = json.loads(values["datasets"])
    values.update(overrides)
    return Settings(**values)


class CeleryWorker:
    """A real worker process (its own process group, so a test can SIGKILL all of it)."""

    def __init__(self, env: dict[str, str], log_dir: Path, concurrency: int = 1, pool: str = "prefork") -> None:
        self.env = {**os.environ, **env, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
        self.log_dir = log_dir
        self.concurrency, self.pool = concurrency, pool
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None
        self.name = f"w{uuid.uuid4().hex[:6]}"

    def runs(self, attempt: dict[str, Any]) -> bool:
        """Whether this worker ran an attempt of a job record's ``history``."""
        return str(attempt.get("worker") or "").startswith(f"{self.name}@")

    def freeze(self) -> None:
        """SIGSTOP the whole worker: it is cut off (its connections stay open, it answers nothing)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def start(self, timeout: float = 60.0) -> CeleryWorker:
        name = self.name
        self.log = self.log_dir / f"celery-{name}.log"
        handle = open(self.log, "wb")  # owned by the process
        self.proc = subprocess.Popen(
            [
                CELERY,
                "-A",
                "worker.celery_app",
                "worker",
                f"--pool={self.pool}",
                f"--concurrency={self.concurrency}",
                "--queues=qscore",
                "--loglevel=INFO",
                "-n",
                f"{name}@%h",
                "--without-gossip",
                "--without-mingle",
            ],
            cwd=REPO,
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited at start:\n{self.log.read_text()[-3000:]}")
            if b"ready." in self.log.read_bytes():
                return self
            time.sleep(0.2)
        raise RuntimeError(f"the worker did not get ready:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole worker (parent and pool children), as an OOM killer would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)  # a frozen worker cannot handle SIGTERM
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log else ""


@pytest.fixture()
def start_worker(tmp_path: Path) -> Iterator[Callable[..., CeleryWorker]]:
    started: list[CeleryWorker] = []

    def start(env: dict[str, str], **kwargs: Any) -> CeleryWorker:
        worker = CeleryWorker(env, tmp_path, **kwargs).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def wait_for(
    client: Any,
    job_id: str,
    states: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
    timeout: float = 180.0,
    headers: dict[str, str] | None = None,
    until: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """Poll GET /jobs/{id} until the job is in one of ``states`` (or ``until`` holds)."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"/jobs/{job_id}", headers=headers or {})
        if response.status_code == 200:
            body = response.json()
            if until(body) if until else body["state"] in states:
                return body
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach {states} in {timeout} s; last: {body}")


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """A private redis-server (append-only persistence) on a free port; start/stop it at will."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    folder = tmp_path / "redis"
    folder.mkdir()

    class Private:
        url = f"redis://127.0.0.1:{port}/0"
        proc: subprocess.Popen[bytes] | None = None

        def start(self) -> None:
            self.proc = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(folder),
                    "--appendonly",
                    "yes",
                    "--save",
                    "",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            deadline = time.monotonic() + 10
            while not redis_up(port):
                if time.monotonic() > deadline:
                    raise RuntimeError("the private redis-server did not start")
                time.sleep(0.05)

        def stop(self) -> None:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                self.proc.wait(10)

    server = Private()
    server.start()
    yield server
    server.stop()


def no_partial_versions(registry: Registry) -> list[Path]:
    """Leftovers of interrupted writes (``.tmp-*``) and version folders missing their files."""
    bad = [
        p
        for folder in (registry.models_dir, registry.feature_sets_dir)
        if folder.is_dir()
        for p in folder.iterdir()
        if p.name.startswith(".tmp-")
    ]
    bad += [
        p
        for p in registry.models_dir.iterdir()
        if p.is_dir() and not ((p / "model.json").is_file() and (p / "encoder.safetensors").is_file())
    ]
    bad += [p for p in registry.feature_sets_dir.iterdir() if p.is_dir() and not (p / "feature_set.json").is_file()]
    return bad


@pytest.fixture()
def private_rabbitmq() -> Iterator[Any]:
    """A private RabbitMQ node on free ports (its own data folder); stop and start it at will.

    rabbitmq-server runs as the ``rabbitmq`` user: the test must run as root (CI does) or as it.
    """
    import pwd
    import tempfile

    if shutil.which("rabbitmq-server") is None:
        pytest.skip("rabbitmq-server is not installed")
    try:
        user = pwd.getpwnam("rabbitmq")
    except KeyError:
        pytest.skip("no rabbitmq user")
    if os.geteuid() not in (0, user.pw_uid):
        pytest.skip("a private RabbitMQ node needs root or the rabbitmq user")
    port, dist_port = free_port(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="qscore-rabbitmq-"))
    folder.chmod(0o755)
    (folder / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{port}\nloopback_users = none\n")
    (folder / "enabled_plugins").write_text("[].\n")
    for sub in ("mnesia", "log"):
        (folder / sub).mkdir()
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    node = f"qscore{port}@localhost"
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": "/dev/null",
        "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
        "RABBITMQ_FEATURE_FLAGS_FILE": str(folder / "mnesia" / "feature_flags"),
        "RABBITMQ_PLUGINS_EXPAND_DIR": str(folder / "mnesia" / "plugins-expand"),
        "RABBITMQ_QUORUM_DIR": str(folder / "mnesia" / "quorum"),
        "RABBITMQ_STREAM_DIR": str(folder / "mnesia" / "stream"),
        "RABBITMQ_LOG_BASE": str(folder / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
        "RABBITMQ_PID_FILE": str(folder / "pid"),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
    }

    class Private:
        url = f"amqp://guest:guest@127.0.0.1:{port}//"
        proc: subprocess.Popen[bytes] | None = None

        def start(self) -> None:
            self.proc = subprocess.Popen(
                ["rabbitmq-server"],
                env=env,
                cwd=folder,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            deadline = time.monotonic() + 90
            while not (port_open(port) and (folder / "pid").is_file()):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    pytest.skip("the private RabbitMQ node did not start")
                time.sleep(0.2)

        def stop(self) -> None:
            """SIGTERM the Erlang VM itself (the node's pid file; the wrapper script is not it) and
            wait until it is gone, as a restart of the broker's host would."""
            pid_file = folder / "pid"
            if pid_file.is_file() and pid_file.read_text().strip():
                pid = int(pid_file.read_text())
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 60
                while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                pid_file.unlink(missing_ok=True)
            if self.proc is not None and self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)

    server = Private()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)
