"""The bodies of the job types, on one life cycle.

- ``context``: :class:`~worker.jobs.context.JobContext` (what a body is given), fencing, the
  exceptions that end a job;
- ``lifecycle``: start an attempt, run a step guarded, record the outcome;
- ``discover``, ``regularize``, ``evaluate``, ``atlas``: one module per job type.

The same functions run in a Celery worker (``worker/tasks.py``) and in-process in embedded mode
(``worker/embedded.py``, through :data:`BODIES`). Everything they write is idempotent: output
versions are named after the job (``model-<job id>``, ``features-<job id>``) and a version that
already exists is reused, so a job delivered twice never writes twice; every version folder is
written atomically by the registry, so a killed job leaves no half-written version.
"""

from __future__ import annotations

# The modules, not their functions: ``worker.jobs.evaluate`` stays the module.
from worker.jobs import atlas, discover, evaluate, regularize
from worker.jobs.lifecycle import Body

BODIES: dict[str, Body] = {
    "discover": discover.discover_local,
    "regularize": regularize.regularize,
    "evaluate": evaluate.evaluate,
    "atlas": atlas.atlas,
}
