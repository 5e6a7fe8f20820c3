"""The validate gate: audit the certified policy on the test split and decide the blessing."""

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Input, Markdown, Metrics, Model, Output

from stage1_pro.components.base import stage1_component


@stage1_component
def validate(
    model: Input[Model],
    policy: Input[Artifact],
    baseline_bundle: str,
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
    everything as positive cannot pass), and, with a baseline bundle, coverage does not regress.

    Args:
        model: The train step's run directory (weights, config, splits, scores).
        policy: The certified policy file of this branch.
        baseline_bundle: Bundle to compare coverage against (PREFIX/latest or a version); empty for none.
        validation: validation.json and every file of the report (figures included).
        metrics: Test coverage, FNR_exit and bounds, FPR_exit, exit accuracy, AURC, blessed.
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
        log_validation,
        policy_file_name,
        stage_run_dir,
        written_files,
    )
    from stage1_pro.layout import RunDir
    from stage1_pro.validate import validate_run

    with tempfile.TemporaryDirectory() as scratch:
        work = stage_run_dir(scratch, model.path, {policy_file_name(policy.path): policy.path})
        result = validate_run(str(work), baseline=baseline_bundle or None)
        os.makedirs(validation.path, exist_ok=True)
        for path in written_files(work):
            copy_file(path, os.path.join(validation.path, path.name))
        if result.get("report_file"):
            copy_file(work / result["report_file"], report.path)
        if result.get("model_card_file"):
            copy_file(work / result["model_card_file"], model_card.path)

    log_validation(result, RunDir(model.path).scores, metrics, exits)
    blessed = bool(result["blessed"])
    validation.metadata.update({"exit_policy": result["exit_policy"], "blessed": blessed})
    test = result["test_metrics"]
    print(
        f"[stage1-pro] validate ({result['exit_policy']}): blessed={blessed}; test coverage "
        f"{test['coverage']:.4f}, FNR_exit {test['fnr_exit']}"
    )
    for check in result["checks"]:
        print(f"[stage1-pro]   {'pass' if check['passed'] else 'FAIL'} {check['name']}: {check['message']}")
    return blessed
