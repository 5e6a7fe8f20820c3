"""Export a blessed run as a deployable bundle, and publish it to the registry."""

from kfp.dsl import Artifact, Input, Model, Output

from stage1_pro.components.base import stage1_component


@stage1_component
def export(
    model: Input[Model],
    policy: Input[Artifact],
    validation: Input[Artifact],
    bundle: Output[Model],
) -> str:
    """Assemble the deployable bundle: weights, config, splits, the one policy file, the report.

    bundle.json (written last) names the active exit policy and every file with its sha256, plus
    lineage (data fingerprint, splits version, model version). Refuses an unblessed run, a policy
    that does not match the config, or files that changed since validation.

    Args:
        model: The train step's run directory.
        policy: The certified policy file of this branch.
        validation: The validate step's validation.json and report files.
        bundle: The bundle folder (what stage1_pro.inference.load_bundle reads).

    Returns:
        The bundle version.
    """
    import os
    import tempfile

    from stage1_pro.artifacts import read_artifact
    from stage1_pro.bundle import BUNDLE_FILE, export_bundle
    from stage1_pro.components.runtime import policy_file_name, stage_run_dir

    with tempfile.TemporaryDirectory() as scratch:
        extra = {name: os.path.join(validation.path, name) for name in sorted(os.listdir(validation.path))}
        extra[policy_file_name(policy.path)] = policy.path
        work = stage_run_dir(scratch, model.path, extra)
        export_bundle(str(work), bundle.path)
    meta = read_artifact(os.path.join(bundle.path, BUNDLE_FILE), "bundle")
    bundle.metadata.update(
        {
            "version": meta["version"],
            "exit_policy": meta["active_exit_policy"],
            "blessed": bool(meta["blessed"]),
            "data_fingerprint": meta["lineage"]["data_fingerprint"],
        }
    )
    print(f"[stage1-pro] export: bundle {meta['version']} ({meta['active_exit_policy']}) at {bundle.path}")
    return meta["version"]


@stage1_component
def publish(bundle: Input[Model], prefix: str, champion_prefix: str = "", champion: str = "") -> str:
    """Publish the bundle to the registry: PREFIX/<version>/, bundle.json last, then the latest pointer.

    A reader never sees a half-uploaded version (pull refuses a version without bundle.json), and
    latest moves only after the upload is complete. When the champion came from this prefix's
    latest, latest moves only if it still names that champion (or, on a first run, nothing): a
    run that published meanwhile is never overridden by a bundle that was not compared with it.
    The version then stays published and this step fails, saying how to promote or re-validate.

    Args:
        bundle: The bundle folder from the export step.
        prefix: Registry prefix, e.g. gs://BUCKET/bundles/NAME.
        champion_prefix: The run's champion_prefix (empty: no champion, latest moves unconditionally).
        champion: The champion version folder validate compared with (drift-check's output; empty
            when nothing was published yet).

    Returns:
        URI of the published version.
    """
    from stage1_pro.registry import champion_expectation
    from stage1_pro.registry import publish as publish_bundle

    expected = champion_expectation(prefix, champion_prefix, champion)
    if expected is not None:
        print(f"[stage1-pro] publish: latest moves only if it still names {expected or 'nothing'}")
    uri = publish_bundle(bundle.path, prefix, expect_latest=expected)
    print(f"[stage1-pro] publish: {uri}")
    return uri
