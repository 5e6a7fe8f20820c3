"""The end-of-run report: outcome records of this run's steps, and the exit task that reports it.

KFP's exit task may not read outputs of the tasks it watches, and a step served from the cache
does not run (so it cannot leave a note for this run). So each exit-policy branch ends in small,
never-cached ``record-outcome`` steps that copy this run's verdict (from validate) and bundle
(from export) into ``<run folder>/stage1-pro-outcome/``, and the exit task ``report-run`` reads
them, whatever the run's end state.
"""

from kfp.dsl import Artifact, Input, Output, PipelineTaskFinalStatus

from stage1_pro.components.base import stage1_component


@stage1_component
def record_outcome(
    stage: str, result: Input[Artifact], run_id: str, run_name: str, outcome: Output[Artifact]
):
    """Record this run's outcome of a step for the end-of-run report.

    Args:
        stage: ``validate`` (``result`` is its validation folder) or ``export`` (the bundle).
        result: The step's output artifact.
        run_id: The run's ID (dsl.PIPELINE_JOB_ID_PLACEHOLDER).
        run_name: The run's name (dsl.PIPELINE_JOB_NAME_PLACEHOLDER: its display name on the
            backend, its folder's name under kfp.local).
        outcome: The record (also written to the run's outcome folder).
    """
    import json
    import os

    from stage1_pro import storage
    from stage1_pro.artifacts import read_artifact
    from stage1_pro.components.runtime import outcome_uri
    from stage1_pro.errors import ConfigError
    from stage1_pro.layout import BUNDLE_FILE, VALIDATION_FILE
    from stage1_pro.run_report import EXPORT_STAGE, VALIDATE_STAGE, bundle_record, verdict_record

    if stage == VALIDATE_STAGE:
        record = verdict_record(read_artifact(os.path.join(result.path, VALIDATION_FILE), "validation"))
    elif stage == EXPORT_STAGE:
        record = bundle_record(read_artifact(os.path.join(result.path, BUNDLE_FILE), "bundle"), result.uri)
    else:
        raise ConfigError(f"record_outcome: stage={stage!r}; allowed: {VALIDATE_STAGE}, {EXPORT_STAGE}")
    text = json.dumps(record, indent=2, sort_keys=True)
    with open(outcome.path, "w", encoding="utf-8") as fh:
        fh.write(text)
    storage.write_text(
        outcome_uri(outcome.uri, run_id, run_name, stage), text, content_type="application/json"
    )
    outcome.metadata.update({k: v for k, v in record.items() if isinstance(v, str | bool | int | float)})


@stage1_component
def report_run(
    status: PipelineTaskFinalStatus,
    publish_prefix: str,
    webhook_url: str,
    run_id: str,
    run_name: str,
    report: Output[Artifact],
):
    """Report the run's end: succeeded or failed, blessed or not (and why), the bundle's URI.

    The pipeline's exit task (dsl.ExitHandler): it runs whatever happened to the body, prints the
    report to the logs, saves it as the ``report`` artifact and, when webhook_url is set, POSTs it
    as JSON (with a ``text`` line Slack and Teams show as it is). A webhook that refuses the report
    fails this task, so a broken notification channel does not go unnoticed.

    Args:
        status: The body's final state (KFP backend: COMPLETE, FAILED or CANCELED).
        publish_prefix: The run's registry prefix (empty: not published).
        webhook_url: Where to POST the report; empty for logs only.
        run_id: The run's ID (dsl.PIPELINE_JOB_ID_PLACEHOLDER).
        run_name: The run's name (dsl.PIPELINE_JOB_NAME_PLACEHOLDER: its display name on the
            backend, its folder's name under kfp.local).
        report: The report as JSON.
    """
    import json

    from stage1_pro import storage
    from stage1_pro.components.runtime import outcome_uri
    from stage1_pro.layout import BUNDLE_FILE
    from stage1_pro.run_report import EXPORT_STAGE, OUTCOME_STAGES, compose_report, post_report

    outcomes = {}
    for stage in OUTCOME_STAGES:
        uri = outcome_uri(report.uri, run_id, run_name, stage)
        if storage.exists(uri):
            outcomes[stage] = json.loads(storage.read_text(uri))
    published = None
    version = outcomes.get(EXPORT_STAGE, {}).get("bundle_version")
    if publish_prefix and version and storage.exists(storage.join(publish_prefix, version, BUNDLE_FILE)):
        published = storage.join(publish_prefix, version)
    result = compose_report(status.state, outcomes, run_id=run_id, run_name=run_name, published_uri=published)
    with open(report.path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
    report.metadata.update(
        {
            "state": result["state"],
            "blessed": bool(result["blessed"]),
            "bundle_uri": result["bundle_uri"] or "",
        }
    )
    print(f"[stage1-pro] {result['text']}")
    if webhook_url:
        code = post_report(webhook_url, result)
        print(f"[stage1-pro] report POSTed to the webhook (HTTP {code})")
