"""schemathesis hooks of the contract test (loaded through SCHEMATHESIS_HOOKS).

- Jobs are capped: every job the fuzzer gets accepted (202) is cancelled at once through the
  API, so a queued one never starts and the running one stops at its next step.
- The one rule of the job parameters that JSON Schema cannot state, a discovery band with
  ``lo < hi`` (a comparison of two fields; the schema's descriptions say it), is applied to the
  fuzzer's *schema-valid* bodies; invalid ones still go out as generated and must get 422.
"""

from __future__ import annotations

from typing import Any

import httpx
import schemathesis


@schemathesis.hook
def after_call(context, case, response) -> None:
    if case.method.upper() == "POST" and case.path.startswith("/jobs/") and response.status_code == 202:
        httpx.delete(response.json()["url"], timeout=30)


@schemathesis.hook
def map_case(context, case):
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if positive and case.path.startswith("/jobs/") and isinstance(case.body, dict):
        _ordered_band(case.body)
        if isinstance(case.body.get("discover"), dict):
            _ordered_band(case.body["discover"])
    return case


def _ordered_band(params: dict[str, Any]) -> None:
    lo, hi = params.get("lo", 0.25), params.get("hi", 0.75)
    if params.get("size") is None and isinstance(lo, int | float) and isinstance(hi, int | float) and lo >= hi:
        params["lo"], params["hi"] = 0.25, 0.75
