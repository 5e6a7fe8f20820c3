"""Before training: are the new training images still like the images the champion was certified on?"""

from kfp.dsl import HTML, Artifact, Metrics, Output

from stage1_pro.components.base import stage1_component


@stage1_component
def drift_check(
    data_uri: str,
    champion_prefix: str,
    drift: Output[Artifact],
    metrics: Output[Metrics],
    report: Output[HTML],
) -> str:
    """Resolve the champion (PREFIX/latest) once for the run, and test the training data against it.

    The champion's model scores a random sample of the dataset's images (labels are not used) and
    a label-free two-sample check compares them with the champion's val_calib score reference
    (Kolmogorov-Smirnov on the exit score and on p(positive), Fisher's exact test on the exit rate,
    Bonferroni, false-alarm rate 0.01). Drift is recorded, not fatal: retraining on the new data is
    the remedy, and validate re-scores the champion on this run's splits anyway. Never cached: the
    champion's latest version may have moved.

    Args:
        data_uri: Dataset manifest or image-folder prefix (local or gs://).
        champion_prefix: Registry prefix of the model in production; empty for none.
        drift: drift.json, drift.png and drift.html (empty without a champion).
        metrics: drift_detected, the p-values, exit rates and sample sizes.
        report: The drift report (verdict, tests, reference vs new score distributions).

    Returns:
        The champion's version folder (PREFIX/VERSION) that validate compares with, or "" when there
        is no champion (empty prefix, or nothing published under it yet).
    """
    import os

    from stage1_pro.components.runtime import (
        DRIFT_SAMPLE_SIZE,
        copy_file,
        log_drift,
        write_no_champion_report,
    )

    os.makedirs(drift.path, exist_ok=True)
    if not champion_prefix:
        write_no_champion_report(report.path, "no champion_prefix was set")
        return ""
    from stage1_pro.champion import nothing_published

    if nothing_published(champion_prefix):
        write_no_champion_report(
            report.path, f"nothing is published under {champion_prefix} yet (a first run)"
        )
        return ""
    from stage1_pro.drift import check_drift, summary_lines
    from stage1_pro.layout import DRIFT_REPORT_FILE
    from stage1_pro.registry import resolve

    champion, _ = resolve(champion_prefix)
    result = check_drift(champion, data_uri, out_dir=drift.path, max_images=DRIFT_SAMPLE_SIZE)
    copy_file(os.path.join(drift.path, DRIFT_REPORT_FILE), report.path)
    log_drift(result, metrics)
    drift.metadata.update({"drift_detected": bool(result["drift"]), "champion": champion})
    for line in summary_lines(result):
        print(f"[stage1-pro] drift: {line}")
    return champion
