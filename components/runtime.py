"""Helpers the components call inside their containers (KFP glue, not statistics or training).

KFP artifacts are immutable: a step cannot add files to an upstream step's output. The library,
however, works on one run directory (train writes it, calibrate adds the policy file, validate its
report, export reads them all). :func:`stage_run_dir` bridges the two: it assembles a scratch run
directory from upstream artifacts with symlinks (no copy of the weights), the library works there,
and the component copies what it wrote to its own outputs.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Most points of a ROC curve sent to the KFP UI (it renders every point it is given).
MAX_ROC_POINTS = 200
#: Training images the drift check scores with the champion (a random sample; the report states
#: the shift this many images can detect against the champion's reference).
DRIFT_SAMPLE_SIZE = 2000
#: Environment variable the pipeline fills with the pod's node name (Kubernetes downward API).
NODE_NAME_ENV = "STAGE1_PRO_NODE_NAME"
#: The pod's name, which the KFP backend sets in every task's container (and kfp.local does not).
KFP_POD_ENV = "KFP_POD_NAME"


def durable_run_dir(model_uri: str) -> str | None:
    """Where the train task writes its run directory when the pipeline root is on GCS, else ``None``.

    Training checkpoints every epoch into ``RUN_DIR/checkpoints/`` and resumes from there, but a
    task's local output folder is uploaded only when the task succeeds: a preempted pod loses it.
    So on a cluster the run directory lives at ``<model uri>.run`` on GCS, written as training goes.
    The KFP driver derives an output's URI from the pipeline root, the run ID and the task name, so
    every retry of the train task (``set_retry``) finds the same folder and resumes, while a new
    run starts fresh. When training ends the run files are copied into the ``model`` artifact.
    Locally (``kfp.local``; a local pipeline root) the run directory is the artifact itself.
    """
    return model_uri.rstrip("/") + ".run" if model_uri.startswith("gs://") else None


def require_gpus(gpu_count: int, environ: Mapping[str, str] | None = None) -> int:
    """Stop at once when a pod that asked for ``gpu_count`` GPUs sees fewer; return the count seen.

    ``device=auto`` would otherwise train on CPU, silently and for days. Applies to a task the KFP
    backend runs, whose container has ``KFP_POD_NAME`` (set on every executor container since
    KFP 2.0: ``commonEnvs`` in backend/src/v2/compiler/argocompiler/common.go); ``kfp.local``
    runs the same task on the CPU on purpose. The NVIDIA device plugin sets
    ``NVIDIA_VISIBLE_DEVICES`` in a container it gave GPUs to, which tells a missing
    ``nvidia.com/gpu`` limit apart from a driver that cannot serve the GPU it was given.

    Raises:
        DeviceError: naming the node, the pod and the likely cause.
    """
    import torch

    from stage1_pro.errors import DeviceError

    env = os.environ if environ is None else environ
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    pod = env.get(KFP_POD_ENV)
    if not pod or visible >= gpu_count:
        return visible
    node = env.get(NODE_NAME_ENV) or "(node unknown)"
    assigned = env.get("NVIDIA_VISIBLE_DEVICES", "")
    if assigned in ("", "void", "none"):
        cause = (
            "the container has no nvidia.com/gpu limit, so the device plugin gave it no GPU (a resource "
            "count the KFP driver could not resolve, e.g. a number where it needs a string, drops the "
            "limit without an error)"
        )
    else:
        cause = (
            f"the device plugin assigned GPU(s) {assigned}, but CUDA cannot use them (node driver too old "
            f"for this torch's CUDA {torch.version.cuda}?)"
        )
    raise DeviceError(
        f"train asked for {gpu_count} GPU(s) but sees {visible} on node {node} (pod {pod}): {cause}; not "
        f"training on the CPU instead. Check the pod's limits with kubectl get pod {pod} -o "
        "jsonpath='{.spec.containers[*].resources.limits}'"
    )


#: Folder of a run's outcome records, under the run's own folder of the pipeline root.
OUTCOME_DIR = "stage1-pro-outcome"


def run_root(artifact_uri: str, run_id: str, run_name: str) -> str:
    """This run's folder of the pipeline root, from the URI of an output artifact of this run.

    The KFP backend puts outputs at ``<pipeline root>/<pipeline name>/<run ID>/<task>/<salt>/<name>``
    (``backend/src/v2/driver/driver.go``, ``metadata.GenerateOutputURI``); kfp.local at
    ``<pipeline root>/<pipeline name>-<timestamp>/<task>/<name>`` (what it also passes as the run's
    name). The run's folder is the URI up to the segment equal to the run's ID or name, whichever
    is there.

    Raises:
        ValueError: neither marker is a segment of ``artifact_uri``.
    """
    segments = artifact_uri.rstrip("/").split("/")
    for i, segment in enumerate(segments):
        if segment and segment in (run_id, run_name):
            return "/".join(segments[: i + 1])
    raise ValueError(f"{artifact_uri}: no segment names this run ({run_id!r} or {run_name!r})")


def outcome_uri(artifact_uri: str, run_id: str, run_name: str, stage: str) -> str:
    """Where this run's outcome record of ``stage`` lives (see :mod:`stage1_pro.run_report`)."""
    from stage1_pro import storage

    return storage.join(run_root(artifact_uri, run_id, run_name), OUTCOME_DIR, f"{stage}.json")


def artifact_location(artifact: Any) -> str:
    """Where a component writes a folder artifact: its GCS URI on a ``gs://`` pipeline root, else its path.

    The KFP launcher uploads an output's local folder (``artifact.path``) only after the step
    succeeds, from the pod's disk; shards of a large dataset written there would need that much
    ephemeral storage, and a lost pod would lose them. Written straight to ``artifact.uri`` they
    never touch the disk; the local folder is created empty, which the launcher then uploads as
    nothing (it only needs the folder to exist). Locally (``kfp.local``) the URI is the path.
    """
    if artifact.uri.startswith("gs://"):
        os.makedirs(artifact.path, exist_ok=True)
        return artifact.uri
    return artifact.path


def copy_run_files(run_dir: str, dest: str | os.PathLike[str]) -> list[str]:
    """Copy the top-level files of a run directory (local or gs://) into ``dest``; not checkpoints/."""
    from stage1_pro import storage

    names = []
    for uri in storage.list_files(run_dir, recursive=False):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        storage.copy_file(uri, str(Path(dest, name)))
        names.append(name)
    return names


def stage_run_dir(
    dest: str | os.PathLike[str], run_dir: str | os.PathLike[str], extra: Mapping[str, str]
) -> Path:
    """Build a run directory in ``dest``: symlinks to every file of ``run_dir``, plus ``extra``.

    Args:
        dest: an empty scratch folder.
        run_dir: the train task's run directory.
        extra: file name in the staged run -> source file (a policy file, validation outputs).
    """
    work = Path(dest)
    work.mkdir(parents=True, exist_ok=True)
    for entry in sorted(Path(run_dir).iterdir()):
        if entry.is_file():
            (work / entry.name).symlink_to(entry.resolve())
    for name, source in extra.items():
        target = work / name
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(Path(source).resolve())
    return work


def written_files(work: str | os.PathLike[str]) -> list[Path]:
    """Regular files in a staged run directory that a library call created (not the symlinks)."""
    return sorted(p for p in Path(work).iterdir() if p.is_file() and not p.is_symlink())


def policy_file_name(policy_path: str) -> str:
    """The conventional file name (``thresholds.json`` ...) of the policy artifact at ``policy_path``."""
    from stage1_pro.artifacts import DEFAULT_FILENAMES, POLICY_ARTIFACT_KINDS, read_artifact
    from stage1_pro.errors import ArtifactError

    kind = read_artifact(policy_path)["artifact"]
    if kind not in POLICY_ARTIFACT_KINDS.values():
        raise ArtifactError(f"{policy_path}: a {kind!r} artifact, not a policy file")
    return DEFAULT_FILENAMES[kind]


def log_metrics(metrics: Any, values: Mapping[str, Any], prefix: str = "") -> None:
    """Log the finite numbers (booleans as 0/1) of ``values`` to a KFP ``Metrics`` artifact.

    Nested mappings are flattened with ``_`` (``{"test": {"accuracy": a}}`` -> ``test_accuracy``).
    """
    for key, value in values.items():
        if isinstance(value, Mapping):
            log_metrics(metrics, value, prefix=f"{prefix}{key}_")
            continue
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, int | float) and math.isfinite(value):
            metrics.log_metric(f"{prefix}{key}", float(value))


def calibrate(
    policy: str,
    scores_path: str,
    policy_artifact: Any,
    metrics: Any,
    target_fnr_exit: float,
    delta: float,
    max_fpr_exit: float,
) -> dict[str, Any]:
    """Certify ``policy`` on the scores' val_calib split, write the policy file, log its certificate."""
    from stage1_pro.calibrate import calibrate_policy

    result = calibrate_policy(
        policy,
        scores_path,
        policy_artifact.path,
        target_fnr_exit=target_fnr_exit,
        delta=delta,
        max_fpr_exit=max_fpr_exit,
    )
    certificate = result["certificate"]
    calib = result.get("val_calib_metrics", {})
    log_metrics(metrics, calib, prefix="val_calib_")
    log_metrics(
        metrics,
        {
            "certified_fnr_exit_upper_bound": certificate.get("upper_bound"),
            "certified_fpr_exit_upper_bound": certificate.get("fpr_upper_bound"),
            "certified_feasible": certificate.get("feasible"),
            "certified_n_exited_positives": certificate.get("n"),
            "certified_false_negatives": certificate.get("k"),
            "target_fnr_exit": target_fnr_exit,
            "max_fpr_exit": max_fpr_exit,
            "delta": delta,
        },
    )
    policy_artifact.metadata.update(
        {
            "exit_policy": policy,
            "feasible": bool(result["feasible"]),
            "procedure": certificate.get("procedure", ""),
        }
    )
    bound = certificate.get("upper_bound")
    print(
        f"[stage1-pro] calibrate-{policy}: feasible={result['feasible']}, val_calib coverage "
        f"{_fmt(calib.get('coverage'))}, certified FNR_exit <= {_fmt(bound)} at 1-delta={1 - delta:g} "
        f"(target {target_fnr_exit:g})"
    )
    if not result["feasible"]:
        print(f"[stage1-pro] WARNING: nothing certified for {policy}; the policy defers every image")
    return result


def log_validation(validation: Mapping[str, Any], scores_path: str, metrics: Any, exits: Any) -> None:
    """Send a validation result to the KFP UI: scalars, the confusion matrix on exits, the test ROC.

    The scalars include the audit's p-values and power, and ``compare_<policy>_*`` for every other
    policy the phase allows (what it would certify on the same val_calib and achieve on test).

    The confusion matrix covers exited test images only (true class x exit decision); deferred
    images are counted in the ``Metrics`` (``test_n_deferred``). The ROC is that of the positive-class
    probability on the whole test split, the score every policy starts from.
    """
    import numpy as np
    from sklearn.metrics import roc_curve

    from stage1_pro.scores import load_scores

    test = validation["test_metrics"]
    log_metrics(metrics, test, prefix="test_")
    certificate = validation.get("certificate") or {}
    audit = validation["audit"]
    log_metrics(
        metrics,
        {
            "certified_fnr_exit_upper_bound": certificate.get("upper_bound"),
            "certified_fpr_exit_upper_bound": certificate.get("fpr_upper_bound"),
            "target_fnr_exit": validation["target_fnr_exit"],
            "max_fpr_exit": validation["max_fpr_exit"],
            "delta": validation["delta"],
            "blessed": bool(validation["blessed"]),
            "audit_fnr_p_value": audit["fnr_p_value"],
            "audit_fpr_p_value": audit["fpr_p_value"],
            "audit_power": audit["power"],
        },
    )
    # the policies the phase allows besides the active one: what they would certify and achieve
    for row in validation.get("policy_comparison", []):
        if row["active"] or row["feasible"] is None:
            continue
        log_metrics(
            metrics,
            {
                "feasible": row["feasible"],
                "val_calib_coverage": row.get("val_calib_coverage"),
                "certified_fnr_exit_upper_bound": row.get("certified_fnr_upper_bound"),
                "certified_fpr_exit_upper_bound": row.get("certified_fpr_upper_bound"),
                "test_coverage": row.get("test_coverage"),
                "test_fnr_exit": row.get("test_fnr_exit"),
                "test_fpr_exit": row.get("test_fpr_exit"),
            },
            prefix=f"compare_{row['policy']}_",
        )
    confusion = validation["confusion"]
    matrix = confusion["matrix"]  # rows: true 0/1; columns: exit-negative, exit-positive, defer
    exits.log_confusion_matrix(
        ["negative", "positive"],
        [[int(matrix[0][0]), int(matrix[0][1])], [int(matrix[1][0]), int(matrix[1][1])]],
    )
    metrics.log_metric("test_n_deferred", float(matrix[0][2] + matrix[1][2]))

    scores = load_scores(scores_path).subset("test")
    if len(np.unique(scores.label)) == 2:
        fpr, tpr, thresholds = roc_curve(scores.label, scores.probs[:, 1])
        keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), MAX_ROC_POINTS)).round().astype(int))
        # roc_curve's first threshold is +inf ("exit nothing"); the UI needs finite numbers.
        exits.log_roc_curve(
            fpr[keep].tolist(), tpr[keep].tolist(), np.minimum(thresholds[keep], 1.0).tolist()
        )


def log_champion(validation: Mapping[str, Any], metrics: Any) -> None:
    """Send the champion's side of a validation to the KFP UI, next to the challenger's ``test_*``.

    ``champion_compared`` is 1 when a champion was re-scored and compared, else 0 (none given, or
    nothing published yet).
    """
    champion = validation.get("champion") or {}
    compared = "test_metrics" in champion
    metrics.log_metric("champion_compared", float(compared))
    if not compared:
        return
    log_metrics(metrics, champion["test_metrics"], prefix="champion_test_")
    log_metrics(
        metrics,
        {
            "champion_certified_fnr_exit_upper_bound": champion["certificate"].get("upper_bound"),
            "champion_feasible": champion["feasible"],
            "champion_coverage_difference": champion["coverage_difference"],
            "champion_tolerance": champion["tolerance"],
        },
    )


def log_drift(result: Mapping[str, Any], metrics: Any) -> None:
    """Send a drift check to the KFP UI: the verdict, each test's p-value, exit rates, sample sizes."""
    log_metrics(
        metrics,
        {
            "drift_detected": bool(result["drift"]),
            "drift_level": result["level"],
            "exit_rate_reference": result["exit_rate_reference"],
            "exit_rate_new": result["exit_rate_new"],
            "n_new": result["n_new"],
            "n_reference": result["n_reference"],
            "n_needed": result["n_needed"],
            "detectable_shift": result["detectable_shift"],
        },
    )
    for test in result["tests"]:
        log_metrics(
            metrics, {f"{test['name']}_p_value": test["p_value"], f"{test['name']}_drift": test["drift"]}
        )


def write_no_champion_report(path: str | os.PathLike[str], reason: str) -> None:
    """The drift step's HTML when there is nothing to compare with (so the UI says why)."""
    import html

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>drift check</title></head>'
        f"<body><h1>Drift check: not run</h1><p>{html.escape(reason)}: no champion to compare the "
        "training data with.</p></body></html>\n",
        encoding="utf-8",
    )
    print(f"[stage1-pro] drift: not run — {reason}")


def copy_file(source: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Copy one file, creating the destination's folder."""
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"
