"""Deployable bundles: export a validated run directory, and verify a bundle before use.

A bundle is one flat folder::

    bundle.json        written last; names every other file and pins its sha256
    config.json  splits.json  metrics.csv  model_best.pth  model.json
    thresholds.json | gateparams.json | ...  exactly one policy file, = config.exit_policy
    validation.json  report.html (or report.md)  model_card.md  *.png  README.md
    score_reference.json   the val_calib exit-score distribution (``stage1-pro drift`` tests against it)

Export builds the bundle in a temporary sibling folder and renames it into place, so a reader
never sees a half-built bundle. :func:`verify_bundle` is what every consumer (inference, publish,
pull) calls first: it reads ``bundle.json`` (schema-validated), rejects pointers that leave the
folder, unlisted and duplicate policy files and symlinks, checks every sha256, and validates
every JSON file against its schema.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from stage1_pro import __version__
from stage1_pro.artifacts import (
    DEFAULT_FILENAMES,
    POLICY_ARTIFACT_KINDS,
    is_plain_filename,
    read_artifact,
    write_artifact,
)
from stage1_pro.errors import ArtifactError
from stage1_pro.layout import (
    BUNDLE_FILE,
    METRICS_FILE,
    MODEL_FILE,
    MODEL_INFO_FILE,
    README_FILE,
    SCORE_REFERENCE_FILE,
    SCORES_FILE,
    VALIDATION_FILE,
)
from stage1_pro.policy_registry import RegistryMapping, policy_specs
from stage1_pro.provenance import sha256_file, utc_now
from stage1_pro.report import format_value
from stage1_pro.score_reference import write_reference
from stage1_pro.storage import staged_folder

log = logging.getLogger(__name__)

#: Exit policy name -> its policy file's name: every policy file a run or bundle may hold (they
#: are mutually exclusive). A live view of the policy registry.
POLICY_FILES: RegistryMapping[str, str] = RegistryMapping(
    lambda: {spec.name: spec.file_name for spec in policy_specs()}
)
#: bundle.json pointer fields -> artifact kind used to validate the file they name (None: not JSON).
_POINTERS: dict[str, str | None] = {
    "config_file": "config",
    "splits_file": "splits",
    "policy_file": None,  # kind depends on active_exit_policy
    "model_file": None,
    "model_info_file": "model",
    "metrics_file": None,
    "validation_file": "validation",
    "report_file": None,
    "model_card_file": None,
    "readme_file": None,
    "score_reference_file": "score_reference",
}


def policy_files_in(folder: str | os.PathLike[str]) -> list[str]:
    """Names of the policy files (``thresholds.json``, ``gateparams.json``...) present in ``folder``."""
    return sorted(name for name in POLICY_FILES.values() if Path(folder, name).is_file())


def find_policy_file(run_dir: str | os.PathLike[str], exit_policy: str) -> Path:
    """The run's one policy file; raise unless exactly one exists and it matches ``exit_policy``.

    Raises:
        ArtifactError: none, several, or one of another policy than the config's ``exit_policy``.
    """
    found = policy_files_in(run_dir)
    expected = POLICY_FILES[exit_policy]
    if not found:
        raise ArtifactError(
            f"{run_dir}: no policy file ({', '.join(POLICY_FILES.values())}); run "
            f"'stage1-pro calibrate --policy {exit_policy}' first"
        )
    if len(found) > 1:
        raise ArtifactError(
            f"{run_dir}: {len(found)} policy files ({', '.join(found)}); policy files are mutually "
            f"exclusive — keep only {expected} (config.exit_policy={exit_policy!r}) and move the others away"
        )
    if found[0] != expected:
        raise ArtifactError(
            f"{run_dir}: holds {found[0]} but config.json says exit_policy={exit_policy!r}, which needs "
            f"{expected}; calibrate the {exit_policy!r} policy, or retrain with the --exit-policy of "
            f"{found[0]}"
        )
    return Path(run_dir, expected)


def check_validation_current(run_dir: str | os.PathLike[str], validation: dict[str, Any]) -> None:
    """Raise unless every file pinned in ``validation['inputs']`` still has the pinned sha256."""
    for name, digest in sorted(validation["inputs"].items()):
        path = Path(run_dir, name)
        if not path.is_file():
            raise ArtifactError(
                f"{path}: judged by validation.json but missing now; rerun 'stage1-pro validate'"
            )
        if sha256_file(path) != digest:
            raise ArtifactError(
                f"{path}: changed since validation.json was written (sha256 differs); the audit no longer "
                f"describes this run — rerun 'stage1-pro validate --run {run_dir}'"
            )


def default_version(model_sha256: str, now: _dt.datetime | None = None) -> str:
    """``YYYYmmdd-HHMMSS-<first 8 hex of the model sha256>`` (UTC): sortable and unique per model."""
    now = now or _dt.datetime.now(_dt.UTC)
    return f"{now:%Y%m%d-%H%M%S}-{model_sha256[:8]}"


def _audit_line(audit: dict[str, Any] | None) -> str:
    """The test audit's verdict and power in one sentence (validation.json ``audit``)."""
    if not audit:
        return "no audit recorded."
    verdict = "rejected" if audit["refused"] else "did not reject"
    return (
        f"the audit {verdict} the certified bounds at level {audit['level']:g} (power "
        f"{audit['power']:.2f} against a true FNR_exit of {audit['alternative_fnr_exit']:g})."
    )


def _readme(meta: dict[str, Any], model_info: dict[str, Any], validation: dict[str, Any]) -> str:
    m = validation["test_metrics"]
    ub = m.get("fnr_exit_upper_bound")
    blessed = "yes" if meta["blessed"] else "**NO** (exported with --allow-unblessed; do not deploy)"
    return f"""# stage1-pro bundle {meta["version"]}

Stage-1 exit classifier of a cascade. For each image it answers **exit-positive**,
**exit-negative** or **defer** (send to stage 2). Active exit policy: `{meta["active_exit_policy"]}`
(`{meta["policy_file"]}`), certified for FNR_exit <= {validation["target_fnr_exit"]} and FPR_exit <=
{validation.get("max_fpr_exit", "n/a")} with probability >= {1 - validation["delta"]:.2f}. Blessed: {blessed}.

Test audit: coverage {m["coverage"]:.4f}, FNR_exit {format_value(m.get("fnr_exit"))}
(Clopper-Pearson upper bound {format_value(ub)}), FPR_exit {format_value(m.get("fpr_exit"))}, exit accuracy
{format_value(m.get("exit_accuracy"))}; {_audit_line(validation.get("audit"))}
Full report: `{validation.get("report_file", "report.html")}`;
model card: `{validation.get("model_card_file", "model_card.md")}`.
The certificate assumes images exchangeable with val_calib; `{SCORE_REFERENCE_FILE}` holds the
val_calib exit-score distribution, and `stage1-pro drift --bundle DIR --data IMAGES` tests new,
unlabelled images against it.

## Inference contract

1. Read `bundle.json` first and validate it (schema `bundle`). Every file pointer in it is a
   bare file name inside this folder; anything else is rejected.
2. Verify the sha256 of every file listed under `files`; refuse the bundle on any mismatch.
3. Read the policy file named by `policy_file` (validated against its schema). **All thresholds
   come from this file.** `config.json` is provenance only: nothing in it (in particular
   `legacy_exit_threshold_for_logging`) is ever used to decide.
4. Rebuild the network from `{meta.get("model_info_file", MODEL_INFO_FILE)}` (timm model
   `{model_info.get("model_name", "?")}`, {model_info.get("img_size", "?")} px, heads
   {model_info.get("heads", "?")}) and load `{meta["model_file"]}` with `torch.load(weights_only=True)`.
5. Preprocess every image exactly as the images that were scored and certified (see below), run
   the model, and give its class probabilities (and gate logit) to the policy's `decide`:
   1 = exit-positive, 0 = exit-negative, -1 = defer.

## Preprocessing (the certificate holds for these pixels only)

{_preprocessing_text(model_info)}

```python
from stage1_pro.inference import load_bundle
predictor = load_bundle("{meta["version"]}")          # this folder
for p in predictor.predict(["a.jpg", "b.png"]):
    print(p.source, p.decision_name, p.probs)
```

or `stage1-pro predict --bundle DIR IMAGE... [--json]`.

## Lineage

- data fingerprint: `{meta["lineage"]["data_fingerprint"]}`
- splits version: `{meta["lineage"]["splits_version"]}`
- model version (sha256 of {meta["model_file"]}): `{meta["lineage"]["model_version"]}`
- created: {meta["created_at"]} by stage1-pro {meta["lineage"].get("code_version", "?")}
"""


def _preprocessing_text(model_info: dict[str, Any]) -> str:
    """The bundle README's preprocessing section: the recorded spec, step by step."""
    from stage1_pro.preprocessing import PreprocessSpec

    spec = PreprocessSpec.from_model_info(model_info)
    p = spec.pixels
    decode = (
        f"JPEGs are decoded by libjpeg at the smallest of 1/1, 1/2, 1/4, 1/8 scale that keeps both "
        f'sides >= {p.size} (Pillow: `image.draft("RGB", ({p.size}, {p.size}))` before loading)'
        if p.decode_mode == "draft"
        else "every image is decoded at full size"
    )
    geometry = (
        f"cut the central square (side s = min(w, h), left = round((w - s) / 2), top = round((h - s) / 2)), "
        f"then resize it to {p.size} x {p.size}"
        if p.resize_mode == "center_crop"
        else f"resize the whole image to {p.size} x {p.size} (aspect ratio not kept)"
    )
    scored = model_info.get("scored_with")
    scored_line = (
        f"Its scores were computed on {scored['device']} in {scored['precision']}; serving otherwise "
        "moves probabilities by about 1e-4 (inference logs a warning)."
        if scored
        else "The device and precision its scores were computed with were not recorded."
    )
    return f"""Spec (`{MODEL_INFO_FILE}`: `img_size`, `preprocessing`, `mean`, `std`): `{spec.to_dict()}`.

1. Decode: {decode}.
2. Apply the EXIF orientation (`ImageOps.exif_transpose`).
3. Convert to 8-bit RGB: 16-bit greyscale keeps its high byte, palette images go through RGBA,
   any other mode via `convert("RGB")`; alpha is dropped, not composited.
4. Geometry: {geometry}, Pillow `{p.interpolation}` resampling (antialiased).
5. Normalise: `(x / 255 - mean) / std` per channel, float32, NCHW.

`stage1_pro.preprocessing.preprocess(spec, images)` does all five; `stage1-pro predict` and
`load_bundle(...).predict` call it, so they give the probabilities recorded for the same image files
in the run's `scores.npz` (float tolerance). A tensor of another size is refused. {scored_line}"""


def export_bundle(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    allow_unblessed: bool = False,
    version: str | None = None,
) -> Path:
    """Export a validated run directory as a bundle folder; return the bundle path.

    Args:
        run_dir: a run directory after train, calibrate and validate.
        out_dir: the bundle folder to create (must not exist, or be empty).
        allow_unblessed: export a run that failed validation, marked ``blessed: false``.
        version: bundle version (``[A-Za-z0-9._-]``); default :func:`default_version`.

    Raises:
        ArtifactError: missing/invalid files, zero or several policy files, a policy that does not
            match ``config.exit_policy``, a stale validation, or an unblessed run.
    """
    run = Path(run_dir)
    out = Path(out_dir)
    if str(out_dir).startswith("gs://"):
        raise ArtifactError(
            f"{out_dir}: export writes a local folder; then 'stage1-pro publish FOLDER gs://...'"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(
            f"{out}: already exists and is not an empty folder; choose a new --out or remove it"
        )

    config = read_artifact(run / DEFAULT_FILENAMES["config"], "config")
    exit_policy = config["exit_policy"]
    policy_path = find_policy_file(run, exit_policy)
    read_artifact(policy_path, POLICY_ARTIFACT_KINDS[exit_policy])  # validated; copied byte-for-byte
    splits = read_artifact(run / DEFAULT_FILENAMES["splits"], "splits")
    validation_path = run / VALIDATION_FILE
    if not validation_path.is_file():
        raise ArtifactError(
            f"{validation_path}: not found; run 'stage1-pro validate --run {run}' before export"
        )
    validation = read_artifact(validation_path, "validation")
    if validation["policy_file"] != policy_path.name:
        raise ArtifactError(
            f"{validation_path}: audits {validation['policy_file']}, but the run's policy file is "
            f"{policy_path.name}; rerun 'stage1-pro validate --run {run}'"
        )
    if MODEL_FILE not in validation["inputs"] or policy_path.name not in validation["inputs"]:
        raise ArtifactError(
            f"{validation_path}: does not pin {MODEL_FILE} and {policy_path.name} (validate ran before they "
            f"existed); rerun 'stage1-pro validate --run {run}'"
        )
    check_validation_current(run, validation)
    if not validation["blessed"]:
        failed = [c["message"] for c in validation["checks"] if not c["passed"]]
        if not allow_unblessed:
            raise ArtifactError(
                f"{run}: not blessed by validation ({len(failed)} failed check(s): {'; '.join(failed)}); "
                "fix the run, or export with --allow-unblessed to get a bundle marked blessed: false"
            )
        log.warning("exporting an UNBLESSED run (blessed: false in bundle.json): %s", "; ".join(failed))

    report_files = [
        validation.get("report_file"),
        validation.get("model_card_file"),
        *validation.get("figures", []),
    ]
    copied = [
        DEFAULT_FILENAMES["config"],
        DEFAULT_FILENAMES["splits"],
        METRICS_FILE,
        MODEL_FILE,
        MODEL_INFO_FILE,
        policy_path.name,
        VALIDATION_FILE,
        *(name for name in report_files if name),
    ]
    for name in copied:
        if not (run / name).is_file():
            raise ArtifactError(f"{run / name}: missing; a bundle needs {', '.join(copied)}")
    model_info = read_artifact(run / MODEL_INFO_FILE, "model")

    model_sha = sha256_file(run / MODEL_FILE)
    version = version or default_version(model_sha)
    with staged_folder(out) as tmp:
        for name in copied:
            shutil.copyfile(run / name, tmp / name)
        write_reference(run / SCORES_FILE, run / policy_path.name, tmp / SCORE_REFERENCE_FILE)
        meta: dict[str, Any] = {
            "version": version,
            "created_at": utc_now(),
            "active_exit_policy": exit_policy,
            "policy_file": policy_path.name,
            "model_file": MODEL_FILE,
            "model_info_file": MODEL_INFO_FILE,
            "splits_file": DEFAULT_FILENAMES["splits"],
            "config_file": DEFAULT_FILENAMES["config"],
            "metrics_file": METRICS_FILE,
            "validation_file": VALIDATION_FILE,
            "readme_file": README_FILE,
            "score_reference_file": SCORE_REFERENCE_FILE,
            "blessed": bool(validation["blessed"]),
            "lineage": {
                "data_fingerprint": splits["dataset"]["fingerprint"],
                "splits_version": splits["splits_version"],
                "model_version": model_sha,
                "code_version": __version__,
            },
        }
        if validation.get("report_file"):
            meta["report_file"] = validation["report_file"]
        if validation.get("model_card_file"):
            meta["model_card_file"] = validation["model_card_file"]
        (tmp / README_FILE).write_text(_readme(meta, model_info, validation), encoding="utf-8")
        meta["files"] = {name: sha256_file(tmp / name) for name in sorted(os.listdir(tmp))}
        # bundle.json is validated on write and written last: its presence marks a complete bundle.
        write_artifact(tmp / BUNDLE_FILE, "bundle", meta)
    log.info(
        "exported %s bundle %s (policy %s, blessed=%s)", exit_policy, out, policy_path.name, meta["blessed"]
    )
    return out


def verify_bundle(bundle_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a bundle folder completely; return its (validated) ``bundle.json``.

    Order: ``bundle.json`` is read and schema-validated first; then every pointer must be a bare
    file name listed under ``files``; the folder must hold exactly the listed files (no second
    policy file, no extras, no symlinks); every sha256 must match; every JSON file is validated
    against its kind (the policy file against the kind of ``active_exit_policy``).

    Raises:
        ArtifactError: naming the offending file and what is wrong with it.
    """
    root = Path(bundle_dir)
    meta = read_artifact(root / BUNDLE_FILE, "bundle")
    files: dict[str, str] = meta["files"]
    src = str(root / BUNDLE_FILE)
    for field in _POINTERS:
        name = meta.get(field)
        if name is None:
            continue
        if not is_plain_filename(name):  # the schema already forbids it; keep the guard next to the use
            raise ArtifactError(f"{src}: {field}={name!r} is not a bare file name inside the bundle")
        if name not in files:
            raise ArtifactError(f"{src}: {field}={name!r} is not listed under 'files' (no checksum for it)")
    expected_policy = POLICY_FILES[meta["active_exit_policy"]]
    if meta["policy_file"] != expected_policy:
        raise ArtifactError(
            f"{src}: active_exit_policy={meta['active_exit_policy']!r} needs policy_file "
            f"{expected_policy!r}, not {meta['policy_file']!r}"
        )
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a folder")
    present = {p.name: p for p in root.iterdir()}
    extra_policies = sorted(n for n in POLICY_FILES.values() if n in present and n != meta["policy_file"])
    if extra_policies:
        raise ArtifactError(
            f"{root}: holds {', '.join(extra_policies)} beside the active {meta['policy_file']}; "
            "a bundle holds exactly one policy file — this bundle has been modified, pull or export it again"
        )
    for name, path in sorted(present.items()):
        if path.is_symlink():
            raise ArtifactError(f"{path}: is a symbolic link; bundles hold plain files only")
        if name != BUNDLE_FILE and name not in files:
            raise ArtifactError(f"{path}: not listed in bundle.json 'files'; remove it (bundles are closed)")
    for name, digest in sorted(files.items()):
        path = root / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in bundle.json but missing (incomplete bundle)")
        actual = sha256_file(path)
        if actual != digest:
            raise ArtifactError(
                f"{path}: sha256 mismatch (bundle.json has {digest[:12]}…, file has {actual[:12]}…): "
                "the file was modified or corrupted; pull or export the bundle again"
            )
    kinds = {meta[f]: k for f, k in _POINTERS.items() if k and meta.get(f)}
    kinds[meta["policy_file"]] = POLICY_ARTIFACT_KINDS[meta["active_exit_policy"]]
    for name, kind in sorted(kinds.items()):
        read_artifact(root / name, kind)
    validation_name = meta.get("validation_file")
    if validation_name:
        validation = read_artifact(root / validation_name, "validation")
        if meta["blessed"] and not validation["blessed"]:
            raise ArtifactError(
                f"{src}: says blessed: true but {validation_name} says the run failed validation"
            )
    if meta["lineage"]["model_version"] != files[meta["model_file"]]:
        raise ArtifactError(f"{src}: lineage.model_version is not the sha256 of {meta['model_file']}")
    return meta


def bundle_summary(meta: dict[str, Any]) -> str:
    """One line describing a verified bundle (for logs and CLI output)."""
    return (
        f"bundle {meta['version']}: policy {meta['active_exit_policy']} ({meta['policy_file']}), "
        f"blessed={meta['blessed']}, model {meta['lineage']['model_version'][:12]}, "
        f"{len(meta['files'])} files"
    )


__all__ = [
    "BUNDLE_FILE",
    "POLICY_FILES",
    "bundle_summary",
    "check_validation_current",
    "default_version",
    "export_bundle",
    "find_policy_file",
    "policy_files_in",
    "verify_bundle",
]
