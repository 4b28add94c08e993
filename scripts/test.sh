#!/usr/bin/env bash
# Installs everything into .venv (and Chromium, Prometheus, Redis, RabbitMQ where missing) and runs the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
# promtool (Debian's prometheus package) unit-tests the alert rules; prometheus and alertmanager
# (prometheus-alertmanager) run the end-to-end alerting test.
if { ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus-alertmanager >/dev/null 2>&1; } && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq prometheus prometheus-alertmanager >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq prometheus prometheus-alertmanager; }) >/dev/null
fi
# Chromium (Debian's package) for the browser tests of /ui and /docs (tests/service/test_service_browser.py).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium; }) >/dev/null
fi
# The integration tests use a real Redis on 127.0.0.1:6379.
if command -v redis-cli >/dev/null 2>&1 && ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
fi
# ... and a real RabbitMQ on 127.0.0.1:5672 (guest; the tests make a vhost of their own).
if command -v rabbitmq-server >/dev/null 2>&1 && ! (echo > /dev/tcp/127.0.0.1/5672) 2>/dev/null && [ "$(id -u)" = 0 ]; then
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do (echo > /dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 1; done
fi
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore::DeprecationWarning}"
exec .venv/bin/python -m pytest "$@"
