"""The validate gate: audit the certified policy on the test split and decide the blessing."""

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Input, Markdown, Metrics, Model, Output

from stage1_pro.components.base import stage1_component


@stage1_component
def validate(
    model: Input[Model],
    policy: Input[Artifact],
    data_uri: str,
    champion_uri: str,
    validation: Output[Artifact],
    metrics: Output[Metrics],
    exits: Output[ClassificationMetrics],
    report: Output[HTML],
    model_card: Output[Markdown],
) -> bool:
    """Audit the policy on the test split and bless the run (or not); only a blessed run is exported.

    Computes on test: coverage, FNR_exit with its Clopper-Pearson upper bound, FPR_exit, exit
    accuracy, AURC and the risk-coverage curve. Blessed when the policy is feasible, the test
    FNR_exit is within the target, coverage and exit accuracy clear their floors (so exiting
    everything as positive cannot pass), and, with a champion, test coverage is not below the
    champion's minus a tolerance: the champion re-scores this run's val_select/val_calib/test images
    with its own preprocessing and its policy is re-certified on this val_calib (same target, delta).

    Args:
        model: The train step's run directory (weights, config, splits, scores).
        policy: The certified policy file of this branch.
        data_uri: The dataset (manifest or image folder) the splits were made for: the champion scores it.
        champion_uri: The champion's version folder resolved by the drift step (PREFIX/VERSION, so
            the cache key changes when latest moves); empty for none.
        validation: validation.json and every file of the report (figures included).
        metrics: Test coverage, FNR_exit and bounds, FPR_exit, exit accuracy, AURC, blessed; with a
            champion, the same as champion_test_*, its certified bound and the coverage difference.
        exits: Confusion matrix of the exited test images; ROC of p(positive) on test.
        report: Human report with the risk-coverage curve and the confusion matrix.
        model_card: Model card (intended use, data, metrics, limits).

    Returns:
        Whether the run is blessed (every check passed). A plain ``bool`` output rather than a
        named one: kfp.local (2.17) cannot resolve a named output in a nested condition.
    """
    import os
    import tempfile

    from stage1_pro.components.runtime import (
        copy_file,
        log_champion,
        log_validation,
        policy_file_name,
        stage_run_dir,
        written_files,
    )
    from stage1_pro.layout import RunDir
    from stage1_pro.report import format_value
    from stage1_pro.validate import validate_run

    with tempfile.TemporaryDirectory() as scratch:
        work = stage_run_dir(scratch, model.path, {policy_file_name(policy.path): policy.path})
        result = validate_run(str(work), champion=champion_uri or None, data=data_uri)
        os.makedirs(validation.path, exist_ok=True)
        for path in written_files(work):
            copy_file(path, os.path.join(validation.path, path.name))
        if result.get("report_file"):
            copy_file(work / result["report_file"], report.path)
        if result.get("model_card_file"):
            copy_file(work / result["model_card_file"], model_card.path)

    log_validation(result, RunDir(model.path).scores, metrics, exits)
    log_champion(result, metrics)
    blessed = bool(result["blessed"])
    validation.metadata.update({"exit_policy": result["exit_policy"], "blessed": blessed})
    test = result["test_metrics"]
    print(
        f"[stage1-pro] validate ({result['exit_policy']}): blessed={blessed}; test coverage "
        f"{test['coverage']:.4f}, FNR_exit {format_value(test['fnr_exit'])}, "
        f"FPR_exit {format_value(test.get('fpr_exit'))}"
    )
    champion = result.get("champion") or {}
    if "test_metrics" in champion:
        print(
            f"[stage1-pro] validate: champion {champion['version']} on the same test split: coverage "
            f"{champion['test_metrics']['coverage']:.4f} (difference {champion['coverage_difference']:+.4f})"
        )
    for check in result["checks"]:
        print(f"[stage1-pro]   {'pass' if check['passed'] else 'FAIL'} {check['name']}: {check['message']}")
    return blessed
