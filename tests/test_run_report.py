"""The end-of-run report: outcome records, the exit task, the webhook (a loopback HTTP server).

The loopback server on 127.0.0.1 stands in for a Slack/Teams incoming webhook or any HTTP
endpoint that takes a JSON POST: it records what it receives and answers with the status a test
asks for.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bundle_helpers import make_run
from kfp import dsl

from stage1_pro.components.report import record_outcome, report_run
from stage1_pro.components.runtime import OUTCOME_DIR, outcome_uri, run_root
from stage1_pro.run_report import (
    EXPORT_STAGE,
    VALIDATE_STAGE,
    WebhookError,
    compose_report,
    post_report,
    run_state,
    summary_line,
)

RUN_ID = "5d0e1c2a-7b7e-4f0e-9c61-2f4f7d1f9a10"
RUN_NAME = "stage1-pro nightly 2026-11-30"


class _Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server: Any = self.server
        server.received.append((self.path, self.headers["Content-Type"], json.loads(body)))
        status = server.statuses.pop(0) if server.statuses else 200
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[Any]:
    """A webhook endpoint on 127.0.0.1; ``.statuses`` are the answers to give, in order."""
    server: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.received, server.statuses = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/services/T000/B000/secret-token"
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("stage1_pro.run_report.time.sleep", lambda _s: None)


# ---- where a run's records live ----------------------------------------------------------------


def test_run_root_from_backend_and_local_artifact_uris() -> None:
    backend = f"gs://bucket/pipeline-root/stage1-pro/{RUN_ID}/record-outcome/8412/outcome"
    assert run_root(backend, RUN_ID, RUN_NAME) == f"gs://bucket/pipeline-root/stage1-pro/{RUN_ID}"
    local = "/tmp/out/pipeline-root/stage1-pro-2026-11-30-00-05-54-367683/record-outcome/outcome"
    assert run_root(local, "12345", "stage1-pro-2026-11-30-00-05-54-367683") == (
        "/tmp/out/pipeline-root/stage1-pro-2026-11-30-00-05-54-367683"
    )
    assert outcome_uri(backend, RUN_ID, RUN_NAME, "validate") == (
        f"gs://bucket/pipeline-root/stage1-pro/{RUN_ID}/{OUTCOME_DIR}/validate.json"
    )
    with pytest.raises(ValueError, match=r"no segment names this run"):
        run_root("gs://bucket/root/stage1-pro/other-run/x/1/outcome", RUN_ID, RUN_NAME)


# ---- the report ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "word"),
    [("COMPLETE", "succeeded"), ("FAILED", "failed"), ("CANCELED", "canceled"), ("SUCCEEDED", "succeeded")],
)
def test_backend_and_local_states(state: str, word: str) -> None:
    assert run_state(state) == word
    assert run_state("RUNNING") == "unknown (RUNNING)"


def test_an_unblessed_run_says_so_and_why() -> None:
    verdict = {
        "blessed": False,
        "exit_policy": "softmax",
        "failed_checks": ["coverage_floor: test coverage 0.0000 < 0.05"],
    }
    report = compose_report("COMPLETE", {VALIDATE_STAGE: verdict}, run_id=RUN_ID, run_name=RUN_NAME)
    assert report["state"] == "succeeded" and report["blessed"] is False and report["bundle_uri"] is None
    assert report["text"] == (
        f"stage1-pro run {RUN_NAME}: SUCCEEDED | NOT BLESSED (softmax): coverage_floor: test coverage "
        "0.0000 < 0.05"
    )


def test_a_blessed_published_run_and_a_failed_one() -> None:
    outcomes = {
        VALIDATE_STAGE: {
            "blessed": True,
            "exit_policy": "gate",
            "failed_checks": [],
            "data_fingerprint": "9b677da1cdd1caec" + "0" * 48,
        },
        EXPORT_STAGE: {
            "bundle_uri": "gs://b/root/x/export/1/bundle",
            "bundle_version": "v1",
            "blessed": True,
        },
    }
    report = compose_report(
        "COMPLETE", outcomes, run_id=RUN_ID, run_name=RUN_NAME, published_uri="gs://b/bundles/stage1/v1"
    )
    assert summary_line(report) == (
        f"stage1-pro run {RUN_NAME}: SUCCEEDED | BLESSED (gate) | data 9b677da1cdd1 | bundle v1 at "
        "gs://b/root/x/export/1/bundle | published to gs://b/bundles/stage1/v1"
    )
    failed = compose_report("FAILED", {}, run_id=RUN_ID, run_name=RUN_NAME)
    assert (
        failed["text"] == f"stage1-pro run {RUN_NAME}: FAILED | not validated (the run ended before validate)"
    )


# ---- the webhook ---------------------------------------------------------------------------------


def test_post_report_sends_json_and_retries_a_server_error(webhook: Any) -> None:
    webhook.statuses = [503, 200]
    report = compose_report("FAILED", {}, run_id=RUN_ID, run_name=RUN_NAME)
    assert post_report(webhook.url, report) == 200
    assert len(webhook.received) == 2
    path, content_type, body = webhook.received[-1]
    assert path == "/services/T000/B000/secret-token" and content_type == "application/json"
    assert body == report and body["text"].startswith(f"stage1-pro run {RUN_NAME}: FAILED")


def test_a_refused_report_names_the_host_not_the_secret_path(webhook: Any) -> None:
    webhook.statuses = [404]
    with pytest.raises(WebhookError) as refused:
        post_report(webhook.url, {"text": "x"})
    host = webhook.url.split("/")[2]
    assert str(refused.value) == (
        f"webhook at {host} refused the run report: HTTP 404 Not Found; check the webhook_url parameter"
    )
    assert "secret-token" not in str(refused.value)
    assert len(webhook.received) == 1  # a 4xx is not retried


def test_an_unreachable_webhook_is_a_clear_error() -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(
        WebhookError, match=rf"webhook at 127.0.0.1:{port} did not take the run report after 2 attempts"
    ):
        post_report(f"http://127.0.0.1:{port}/hook", {"text": "x"}, attempts=2, timeout=2)


# ---- the components, called as the executor calls them -------------------------------------------


def _artifact(cls: type, uri: Path) -> Any:
    return cls(name=uri.name, uri=str(uri), metadata={})


def _report_run(status: Any, report_file: Path, webhook_url: str, publish_prefix: str = "") -> None:
    """The report-run component's function for run RUN_ID, writing its report to ``report_file``."""
    report_run.python_func(
        status=status,
        publish_prefix=publish_prefix,
        webhook_url=webhook_url,
        run_id=RUN_ID,
        run_name=RUN_NAME,
        report=_artifact(dsl.Artifact, report_file),
    )


@pytest.fixture(scope="module")
def validated_and_exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A validated run (validation.json) and its exported bundle, as validate and export leave them."""
    from stage1_pro.bundle import export_bundle

    root = tmp_path_factory.mktemp("report")
    run = make_run(root / "run", policy="softmax")
    validation = root / "validation"
    validation.mkdir()
    (validation / "validation.json").write_bytes((run / "validation.json").read_bytes())
    bundle = root / "bundle"
    export_bundle(str(run), str(bundle), allow_unblessed=True)
    return validation, bundle


def test_record_outcome_and_report_run_end_to_end(
    validated_and_exported: tuple[Path, Path],
    tmp_path: Path,
    webhook: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    validation, bundle = validated_and_exported
    run_dir = tmp_path / "pipeline-root" / "stage1-pro" / RUN_ID
    for stage, result, task in (
        (VALIDATE_STAGE, _artifact(dsl.Artifact, validation), "record-verdict"),
        (EXPORT_STAGE, _artifact(dsl.Model, bundle), "record-bundle"),
    ):
        out = run_dir / task / "77" / "outcome"
        out.parent.mkdir(parents=True)
        record_outcome.python_func(
            stage=stage, result=result, run_id=RUN_ID, run_name=RUN_NAME, outcome=_artifact(dsl.Artifact, out)
        )
        assert json.loads(out.read_text()) == json.loads(
            (run_dir / OUTCOME_DIR / f"{stage}.json").read_text()
        )

    verdict = json.loads((validation / "validation.json").read_text())
    report_file = run_dir / "report-run" / "78" / "report"
    report_file.parent.mkdir(parents=True)
    status = dsl.PipelineTaskFinalStatus(
        state="COMPLETE",
        pipeline_job_resource_name="stage1-pro-x7k2p",
        pipeline_task_name="exit-handler-1",
        error_code=None,
        error_message=None,
    )
    _report_run(status, report_file, webhook.url)
    report = json.loads(report_file.read_text())
    assert report["state"] == "succeeded" and report["blessed"] is verdict["blessed"]
    assert report["bundle_uri"] == str(bundle) and report["exit_policy"] == "softmax"
    assert report["data_fingerprint"] == verdict["lineage"]["data_fingerprint"]
    assert webhook.received[-1][2] == report
    out = capsys.readouterr().out
    assert f"[stage1-pro] {report['text']}" in out and "report POSTed to the webhook (HTTP 200)" in out


def test_report_run_of_a_run_that_failed_early_and_a_broken_webhook(tmp_path: Path, webhook: Any) -> None:
    report_file = tmp_path / "stage1-pro" / RUN_ID / "report-run" / "1" / "report"
    report_file.parent.mkdir(parents=True)
    webhook.statuses = [403]
    status = dsl.PipelineTaskFinalStatus("FAILED", "stage1-pro-x7k2p", "exit-handler-1", None, None)
    with pytest.raises(WebhookError, match=r"refused the run report: HTTP 403"):
        _report_run(status, report_file, webhook.url, publish_prefix="gs://b/bundles")
    report = json.loads(report_file.read_text())  # written (and logged) before the POST
    assert report["state"] == "failed" and report["blessed"] is None and report["published_uri"] is None


def test_record_outcome_refuses_an_unknown_stage(
    validated_and_exported: tuple[Path, Path], tmp_path: Path
) -> None:
    from stage1_pro.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stage='publish'; allowed: validate, export"):
        record_outcome.python_func(
            stage="publish",
            result=_artifact(dsl.Artifact, validated_and_exported[0]),
            run_id=RUN_ID,
            run_name=RUN_NAME,
            outcome=_artifact(dsl.Artifact, tmp_path / RUN_ID / "outcome"),
        )
