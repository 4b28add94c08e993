#!/usr/bin/env bash
# Installs into .venv and starts the scoring service on its embedded defaults (port 8000).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e .
exec .venv/bin/qscore serve "$@"
