"""The ``qscore`` command run for tests: in this process (typer's ``CliRunner``) or as the installed script.

In-process runs the command's own code on its arguments and reads its exit code, stdout and
stderr as a user would, without a new interpreter's imports (torch, torchvision, scikit-learn:
6-8 s a call, which was a third of the suite). The installed entry point, with the logging
``main()`` sets up, is run as a subprocess by :func:`run_installed` (tests/cli/test_cli.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from typer.testing import CliRunner

from qscore_cli.main import app

QSCORE = Path(sys.executable).parent / "qscore"


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: object, check: bool = True) -> CliResult:
    """``qscore ARGS`` in this process. An exception the command did not turn into an exit code
    is raised here: a user would have seen a traceback."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    done = CliResult(result.exit_code, result.stdout, result.stderr)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def run_installed(*args: object) -> subprocess.CompletedProcess[str]:
    """``qscore ARGS`` as the installed console script, in a new process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(QSCORE), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])
