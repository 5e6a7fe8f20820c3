"""The end-of-run report of a pipeline run: what happened, in one record, to the logs and a webhook.

A scheduled retraining that ends without a blessed bundle must not look like a silent green run,
and one that fails must say where. The pipeline's exit task (``components/report.py``) builds
:func:`compose_report` from the run's final state and the outcome records its steps left
(:data:`VALIDATE_STAGE`: the verdict; :data:`EXPORT_STAGE`: the bundle), prints
:func:`summary_line`, and POSTs the report as JSON with :func:`post_report` when the run has a
``webhook_url``. The JSON carries a ``text`` field, so Slack and Teams incoming webhooks show the
summary line as it is.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from stage1_pro.errors import Stage1ProError

#: Outcome record of the validate step: blessed or not, and why.
VALIDATE_STAGE = "validate"
#: Outcome record of the export step: the bundle's URI and version.
EXPORT_STAGE = "export"
OUTCOME_STAGES = (VALIDATE_STAGE, EXPORT_STAGE)

#: Final task states as the KFP backend reports them (ML Metadata execution states) and as
#: ``kfp.local`` reports them, mapped to the report's words.
_STATES = {
    "COMPLETE": "succeeded",
    "SUCCEEDED": "succeeded",
    "CACHED": "succeeded",
    "FAILED": "failed",
    "CANCELED": "canceled",
    "CANCELLED": "canceled",
}
WEBHOOK_TIMEOUT_S = 10.0
WEBHOOK_ATTEMPTS = 3


class WebhookError(Stage1ProError):
    """The end-of-run report could not be delivered to the webhook."""


def verdict_record(validation: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`VALIDATE_STAGE` outcome record of a validation (``validation.json``)."""
    test = validation.get("test_metrics", {})
    return {
        "blessed": bool(validation["blessed"]),
        "exit_policy": validation.get("exit_policy"),
        "failed_checks": [
            f"{c['name']}: {c['message']}" for c in validation.get("checks", []) if not c["passed"]
        ],
        "test_coverage": test.get("coverage"),
        "certified_fnr_exit_upper_bound": (validation.get("certificate") or {}).get("upper_bound"),
        "target_fnr_exit": validation.get("target_fnr_exit"),
        "data_fingerprint": (validation.get("lineage") or {}).get("data_fingerprint"),
    }


def bundle_record(bundle: Mapping[str, Any], uri: str) -> dict[str, Any]:
    """The :data:`EXPORT_STAGE` outcome record of an exported bundle (its ``bundle.json``, its URI)."""
    return {"bundle_uri": uri, "bundle_version": bundle["version"], "blessed": bool(bundle["blessed"])}


def run_state(state: str) -> str:
    """``succeeded``, ``failed`` or ``canceled`` for a backend or kfp.local state, else ``unknown (...)``."""
    return _STATES.get(state.upper(), f"unknown ({state})")


def compose_report(
    state: str,
    outcomes: Mapping[str, Mapping[str, Any]],
    *,
    run_id: str,
    run_name: str,
    published_uri: str | None = None,
) -> dict[str, Any]:
    """The report of one run.

    Args:
        state: the final state of the pipeline's body (``COMPLETE``, ``FAILED``, ...).
        outcomes: the steps' outcome records by stage (absent when the step did not run).
        run_id: the run's ID.
        run_name: the run's name (its display name on the KFP backend).
        published_uri: the registry version the bundle was published to, if it was.

    Returns:
        A JSON-ready dict: ``state``, ``blessed`` (``None`` when validation never ran),
        ``exit_policy``, ``data_fingerprint``, ``bundle_uri``, ``bundle_version``, ``published_uri``,
        ``failed_checks``, the certificate numbers, and ``text`` (:func:`summary_line`).
    """
    verdict = outcomes.get(VALIDATE_STAGE, {})
    bundle = outcomes.get(EXPORT_STAGE, {})
    report: dict[str, Any] = {
        "pipeline": "stage1-pro",
        "run_id": run_id,
        "run_name": run_name,
        "state": run_state(state),
        "backend_state": state,
        "blessed": verdict.get("blessed"),
        "exit_policy": verdict.get("exit_policy"),
        "failed_checks": list(verdict.get("failed_checks", [])),
        "test_coverage": verdict.get("test_coverage"),
        "certified_fnr_exit_upper_bound": verdict.get("certified_fnr_exit_upper_bound"),
        "target_fnr_exit": verdict.get("target_fnr_exit"),
        "data_fingerprint": verdict.get("data_fingerprint"),
        "bundle_uri": bundle.get("bundle_uri"),
        "bundle_version": bundle.get("bundle_version"),
        "published_uri": published_uri,
    }
    report["text"] = summary_line(report)
    return report


def summary_line(report: Mapping[str, Any]) -> str:
    """One line a person reads first: state, blessed or not (and why), the data, where the bundle is."""
    head = f"stage1-pro run {report['run_name']}: {report['state'].upper()}"
    if report["blessed"] is None:
        verdict = "not validated (the run ended before validate)"
    elif report["blessed"]:
        verdict = f"BLESSED ({report['exit_policy']})"
    else:
        reasons = "; ".join(report["failed_checks"]) or "see the validate step"
        verdict = f"NOT BLESSED ({report['exit_policy']}): {reasons}"
    parts = [head, verdict]
    if report.get("data_fingerprint"):
        parts.append(f"data {report['data_fingerprint'][:12]}")
    if report.get("bundle_uri"):
        parts.append(f"bundle {report['bundle_version']} at {report['bundle_uri']}")
    if report.get("published_uri"):
        parts.append(f"published to {report['published_uri']}")
    return " | ".join(parts)


def post_report(
    url: str,
    report: Mapping[str, Any],
    *,
    timeout: float = WEBHOOK_TIMEOUT_S,
    attempts: int = WEBHOOK_ATTEMPTS,
) -> int:
    """POST ``report`` as JSON to ``url``; retry connection errors and 5xx answers; return the status.

    Raises:
        WebhookError: a 4xx answer (not retried: the request is wrong), or every attempt failed.
            The message names the host only: a webhook URL's path is often its secret.
    """
    host = urlsplit(url).netloc
    body = json.dumps(report).encode("utf-8")
    last = ""
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(
            url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code} {exc.reason}"
            if exc.code < 500:
                raise WebhookError(
                    f"webhook at {host} refused the run report: {last}; check the webhook_url parameter"
                ) from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        if attempt < attempts:
            time.sleep(2 ** (attempt - 1))
    raise WebhookError(
        f"webhook at {host} did not take the run report after {attempts} attempts ({last}); check that the "
        "URL is reachable from the cluster (the namespace's NetworkPolicy allows HTTPS egress only)"
    )
