"""Upload, run and schedule the pipeline on a Kubeflow Pipelines server (``kfp.Client``, REST v2beta1).

- :func:`upload`: the first upload creates the pipeline (empty) and its first version; later ones
  add a version to it. A version is named after the package's content
  (``<stage1-pro version>-<sha256[:12]>``), so uploading the same package again reuses the
  existing version instead of adding a duplicate. A name given explicitly that is already taken
  is reused only when that version stores the same spec; otherwise the upload is refused (a
  version is immutable, and reusing it would run the old spec).
- :func:`submit_run`: one run, from a package or from an uploaded version, parameters checked
  locally first (:func:`stage1_pro.run_parameters.check_parameters`). Its default name carries the
  date and the data's fingerprint (:func:`run_name_for`) and its description the settings that
  matter (:func:`describe_run`), so a list of runs reads without opening each one.
- Versions are described with the git revision of the code and the images they run
  (:func:`version_description`).
- :func:`schedule`: recurring retraining. KFP cannot update a recurring run in place
  (kubeflow/pipelines#3789), so scheduling under an existing name uploads the package as a new
  version, creates a recurring run pinned to that version (``max_concurrency=1``,
  ``no_catchup=True``) and then deletes the previous recurring runs of that name. Creating before
  deleting means a failure leaves the old schedule running rather than none.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stage1_pro import __version__
from stage1_pro.errors import ConfigError, Stage1ProError
from stage1_pro.provenance import sha256_file


class KFPError(Stage1ProError):
    """The Kubeflow Pipelines server refused a request or cannot be reached."""


DEFAULT_PIPELINE_NAME = "stage1-pro"
DEFAULT_EXPERIMENT = "stage1-pro"
_PAGE_SIZE = 100


@dataclass(frozen=True)
class Uploaded:
    """A pipeline version on the server."""

    pipeline_id: str
    version_id: str
    version_name: str
    created_pipeline: bool
    reused_version: bool


@dataclass(frozen=True)
class Scheduled:
    """A recurring run created by :func:`schedule`, and the ones it replaced."""

    recurring_run_id: str
    experiment_id: str
    upload: Uploaded
    replaced: list[str] = field(default_factory=list)


def connect(host: str, *, namespace: str | None = None, token: str | None = None) -> Any:
    """A ``kfp.Client`` for ``host`` (it checks ``/apis/v2beta1/healthz`` on creation)."""
    import kfp

    if not host:
        raise ConfigError("no Kubeflow Pipelines host: pass --host URL (or set KFP_HOST)")
    try:
        return kfp.Client(host=host, namespace=namespace, existing_token=token)
    except Exception as exc:  # urllib3 MaxRetryError, ApiException, ...
        raise KFPError(f"cannot reach Kubeflow Pipelines at {host}: {_reason(exc)}") from exc


def version_name_for(package: str | os.PathLike[str]) -> str:
    """The content-derived version name of a package: ``<stage1-pro version>-<sha256[:12]>``."""
    digest = sha256_file(package)
    return f"{__version__}-{digest[:12]}"


def source_revision() -> str:
    """The git revision of this checkout (``<sha12>``, ``+dirty`` with uncommitted changes), or
    ``unknown`` outside a git checkout (an installed wheel)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        command = ["git", "-C", str(root), *args]
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=30).stdout.strip()

    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


def package_images(package: str | os.PathLike[str]) -> list[str]:
    """The container images a compiled package runs, sorted."""
    import yaml

    spec = next(yaml.safe_load_all(Path(package).read_text(encoding="utf-8")))
    executors = spec.get("deploymentSpec", {}).get("executors", {}).values()
    return sorted({e["container"]["image"] for e in executors if "container" in e})


def version_description(package: str | os.PathLike[str]) -> str:
    """What a pipeline version is: the stage1-pro release, the git revision and the images it runs."""
    return f"stage1-pro {__version__} from git {source_revision()}; images " + ", ".join(
        package_images(package)
    )


def dataset_fingerprint(data_uri: str) -> tuple[str | None, str]:
    """(fingerprint, note) of the dataset a run is about to read; (None, why) when it cannot be read here.

    The run's own fingerprint step computes it again on the cluster (this machine may lack the
    bucket's credentials): the name is a convenience, the pipeline's check is the guarantee.
    """
    from stage1_pro.data import load_dataset

    try:
        return load_dataset(data_uri, check_files=False).fingerprint, ""
    except Stage1ProError as exc:
        return None, f"data fingerprint not computed on the submitting machine ({exc})"


def run_name_for(params: Mapping[str, Any], data_fingerprint: str | None, now: Any = None) -> str:
    """``stage1-pro-<exit policy>-<UTC YYYYmmdd-HHMM>-<fingerprint[:8]>``: sortable, data at a glance."""
    import datetime as dt

    moment = now or dt.datetime.now(dt.UTC)
    name = f"stage1-pro-{params.get('exit_policy', 'softmax')}-{moment:%Y%m%d-%H%M}"
    return f"{name}-{data_fingerprint[:8]}" if data_fingerprint else name


def describe_run(params: Mapping[str, Any], data_fingerprint: str | None, note: str = "") -> str:
    """The run's description: the data, its fingerprint and the settings a reader compares runs by."""
    from stage1_pro.run_parameters import defaults

    values = {**defaults(), **params}
    shown = ", ".join(
        f"{key}={values[key]}"
        for key in ("phase", "exit_policy", "target_fnr_exit", "delta", "model_name", "epochs", "gpu_type")
    )
    data = f"data {values.get('data_uri')} (fingerprint {data_fingerprint or 'unknown'})"
    parts = [data, shown]
    if values.get("publish_prefix"):
        parts.append(f"publishes to {values['publish_prefix']}")
    if note:
        parts.append(note)
    return "; ".join(parts)


def upload(
    client: Any,
    package: str | os.PathLike[str],
    name: str = DEFAULT_PIPELINE_NAME,
    *,
    version: str | None = None,
    description: str | None = None,
) -> Uploaded:
    """Upload ``package`` as version ``version`` of pipeline ``name``, creating the pipeline if needed.

    A new pipeline is created empty (``POST /apis/v2beta1/pipelines``), then the package is uploaded
    as its one version (``POST /apis/v2beta1/pipelines/upload_version``). The one-step
    ``/pipelines/upload`` (``kfp.Client.upload_pipeline``) would also create a first version named
    after the pipeline (kubeflow/pipelines backend/src/apiserver/server/pipeline_upload_server.go,
    ``uploadPipeline``), so the first upload would leave two. Should the version upload fail after
    the pipeline was created, the next upload finds the empty pipeline and adds the version.

    Args:
        client: a ``kfp.Client`` (see :func:`connect`).
        package: the compiled pipeline YAML.
        name: the pipeline's name on the server.
        version: the version's name (default: :func:`version_name_for` the package).
        description: shown in the UI for the version and, when it is created, the pipeline
            (default: :func:`version_description`, the release, git revision and images, for the
            version; the pipeline's own description for the pipeline).

    Returns:
        The version; ``reused_version`` when a version of that name already held the same
        pipeline spec (and platform spec) as ``package``.

    Raises:
        KFPError: the server refused a request or cannot be reached, or a version named
            ``version`` already exists with a different spec (a version is immutable: reusing it
            would run the old spec).
    """
    from kfp_server_api import V2beta1Pipeline

    from stage1_pro.pipelines.pipeline import PIPELINE_DESCRIPTION

    version = version or version_name_for(package)
    pipeline_id = _call(client.get_pipeline_id, name)
    created_pipeline = pipeline_id is None
    if created_pipeline:
        pipeline = V2beta1Pipeline(
            display_name=name,
            description=description or PIPELINE_DESCRIPTION,
            namespace=client.get_user_namespace() or None,
        )
        pipeline_id = _call(client.pipelines.pipeline_service_create_pipeline, pipeline).pipeline_id
    else:
        existing = _named(
            client.list_pipeline_versions, "pipeline_versions", version, pipeline_id=pipeline_id
        )
        if existing:
            _check_same_spec(client, existing[0], package, name)
            return Uploaded(pipeline_id, existing[0].pipeline_version_id, version, False, True)
    created = _call(
        client.upload_pipeline_version,
        str(package),
        pipeline_version_name=version,
        pipeline_id=pipeline_id,
        description=description or version_description(package),
    )
    return Uploaded(pipeline_id, created.pipeline_version_id, version, created_pipeline, False)


def _check_same_spec(client: Any, existing: Any, package: str | os.PathLike[str], name: str) -> None:
    """Raise :class:`KFPError` unless version ``existing`` stores the spec ``package`` holds.

    ``ListPipelineVersions`` returns each version's spec; a server that leaves it out is asked
    with ``GetPipelineVersion``.
    """
    stored = existing.pipeline_spec
    if not stored:
        stored = _call(
            client.get_pipeline_version, existing.pipeline_id, existing.pipeline_version_id
        ).pipeline_spec
    if _stored_specs(stored) != _package_specs(package):
        raise KFPError(
            f"pipeline {name!r} already has a version {existing.display_name!r} "
            f"({existing.pipeline_version_id}) with a different pipeline spec than {package}; a "
            "version cannot be changed, and reusing it would run the old spec. Pick another "
            "--version, or omit it to get a content-derived name"
        )


def _package_specs(package: str | os.PathLike[str]) -> tuple[dict, dict | None]:
    """(pipeline spec, platform spec or None) of a package, as the API server keeps them.

    The server parses each YAML document into its proto (``PipelineSpec``, ``PlatformSpec``) and
    stores the protojson of each (kubeflow/pipelines backend/src/apiserver/template/v2_template.go,
    ``NewV2SpecTemplate`` and ``Bytes``): comments, key order and fields set to their default
    value (``enableCache: false``) do not survive, so they do not count as a change.
    """
    import yaml

    pipeline_spec, platform_spec = None, None
    for doc in yaml.safe_load_all(Path(package).read_text(encoding="utf-8")):
        if not isinstance(doc, dict):
            continue
        if "pipelineInfo" in doc and "root" in doc:
            pipeline_spec = doc
        elif "kubernetes" in (doc.get("platforms") or {}):
            platform_spec = doc
    return _normalised(pipeline_spec or {}, platform_spec, str(package))


def _stored_specs(stored: Mapping[str, Any] | None) -> tuple[dict, dict | None]:
    """(pipeline spec, platform spec or None) of a version's ``pipeline_spec`` as the server returns
    it: the pipeline spec alone, or ``{pipeline_spec, platform_spec}`` when the package had a
    platform spec (backend/src/apiserver/server/api_util.go, ``YamlStringToPipelineSpecStruct``)."""
    stored = dict(stored or {})
    if set(stored) == {"pipeline_spec", "platform_spec"}:
        return _normalised(stored["pipeline_spec"], stored["platform_spec"], "the stored spec")
    return _normalised(stored, None, "the stored spec")


def _normalised(
    pipeline_spec: Mapping[str, Any], platform_spec: Mapping[str, Any] | None, source: str
) -> tuple[dict, dict | None]:
    """Both specs through their protos and back, as the server's protojson round trip does.

    Unknown fields are ignored: the server's protos may be newer than this SDK's.
    """
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    def through(spec: Mapping[str, Any], message: Any) -> dict:
        try:
            return json_format.MessageToDict(json_format.ParseDict(spec, message, ignore_unknown_fields=True))
        except json_format.ParseError as exc:
            raise KFPError(
                f"{source} is not a valid KFP pipeline package ({exc}); recompile it with "
                "'stage1-pro compile'"
            ) from exc

    pipeline = through(pipeline_spec, pipeline_spec_pb2.PipelineSpec())
    platform = through(platform_spec, pipeline_spec_pb2.PlatformSpec()) if platform_spec else None
    return pipeline, platform


def find_version(client: Any, name: str, version: str | None = None) -> Uploaded:
    """An uploaded version of pipeline ``name``: the one named ``version``, else the newest."""
    pipeline_id = _call(client.get_pipeline_id, name)
    if pipeline_id is None:
        raise KFPError(
            f"no pipeline named {name!r} on the server; upload it with 'stage1-pro upload --name {name}'"
        )
    versions = list(_paged(client.list_pipeline_versions, "pipeline_versions", pipeline_id=pipeline_id))
    if version is not None:
        versions = [v for v in versions if v.display_name == version]
        if not versions:
            raise KFPError(f"pipeline {name!r} has no version {version!r}")
    if not versions:
        raise KFPError(f"pipeline {name!r} has no versions")
    newest = max(versions, key=lambda v: str(v.created_at or ""))
    return Uploaded(pipeline_id, newest.pipeline_version_id, newest.display_name, False, True)


def submit_run(
    client: Any,
    *,
    experiment: str,
    params: Mapping[str, Any],
    package: str | os.PathLike[str] | None = None,
    version: Uploaded | None = None,
    run_name: str | None = None,
    pipeline_root: str | None = None,
    enable_caching: bool | None = None,
) -> str:
    """Start one run; return its ID. Exactly one of ``package`` and ``version`` is needed.

    ``enable_caching=False`` turns caching off for every task of this run (runs of a package only:
    KFP applies no caching override to an uploaded version). ``True`` is refused: it would also
    cache the fingerprint step, whose not being cached is what keeps a changed dataset from being
    served stale results.
    """
    from stage1_pro.run_parameters import check_parameters

    if (package is None) == (version is None):
        raise ValueError("pass exactly one of package and version")
    if enable_caching:
        raise ConfigError(
            "enable_caching=True would cache the fingerprint step; use None (the compiled setting)"
        )
    if enable_caching is False and package is None:
        raise ConfigError(
            "caching cannot be turned off for a run of an uploaded version (KFP ignores it); run a "
            "package instead (--package, or no --pipeline)"
        )
    check_parameters(params)
    experiment_id = _experiment_id(client, experiment)
    fingerprint, note = dataset_fingerprint(str(params.get("data_uri", "")))
    run_name = run_name or run_name_for(params, fingerprint)
    description = describe_run(params, fingerprint, note)
    if version is not None:
        description += f"; pipeline version {version.version_name}"
        return _create_run(
            client, experiment_id, run_name, description, params, pipeline_root, version=version
        )
    with tempfile.TemporaryDirectory(prefix="stage1-pro-run-") as tmp:
        if enable_caching is False:
            # The SDK's override reaches only the root DAG's tasks, not those inside the branches.
            package = without_caching(package, Path(tmp, "pipeline.yaml"))
        description += f"; {version_description(package)}"
        return _create_run(
            client, experiment_id, run_name, description, params, pipeline_root, package=package
        )


def _create_run(
    client: Any,
    experiment_id: str,
    name: str,
    description: str,
    params: Mapping[str, Any],
    pipeline_root: str | None,
    *,
    package: str | os.PathLike[str] | None = None,
    version: Uploaded | None = None,
) -> str:
    """``kfp.Client.run_pipeline`` with a description (the SDK's method cannot set one): the same job
    config (kfp 2.17.3 ``Client._create_job_config``), posted with the run's description."""
    from kfp_server_api import V2beta1Run

    config = client._create_job_config(
        params=dict(params),
        pipeline_package_path=str(package) if package is not None else None,
        pipeline_id=version.pipeline_id if version else None,
        version_id=version.version_id if version else None,
        enable_caching=None,
        cache_key=None,
        pipeline_root=pipeline_root,
    )
    run = V2beta1Run(
        experiment_id=experiment_id,
        display_name=name,
        description=description,
        pipeline_spec=config.pipeline_spec,
        pipeline_version_reference=config.pipeline_version_reference,
        runtime_config=config.runtime_config,
    )
    return _call(client.runs.run_service_create_run, run=run).run_id


def without_caching(package: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Copy ``package`` to ``out`` with caching turned off for every task of every DAG."""
    import yaml

    docs = list(yaml.safe_load_all(Path(package).read_text(encoding="utf-8")))
    spec = docs[0]
    for dag in [spec["root"], *spec.get("components", {}).values()]:
        for task in dag.get("dag", {}).get("tasks", {}).values():
            if "cachingOptions" in task:  # container tasks (groups have none)
                task["cachingOptions"]["enableCache"] = False
    Path(out).write_text(yaml.safe_dump_all(docs, sort_keys=True), encoding="utf-8")
    return Path(out)


def schedule(
    client: Any,
    *,
    name: str,
    cron: str,
    package: str | os.PathLike[str],
    params: Mapping[str, Any],
    experiment: str = DEFAULT_EXPERIMENT,
    pipeline_name: str = DEFAULT_PIPELINE_NAME,
    pipeline_root: str | None = None,
) -> Scheduled:
    """Create (or replace) the recurring run ``name``, pinned to ``package`` uploaded as a new version."""
    from stage1_pro.run_parameters import check_parameters

    cron = validate_cron(cron)
    check_parameters(params)
    uploaded = upload(client, package, pipeline_name)
    experiment_id = _experiment_id(client, experiment)
    previous = [r.recurring_run_id for r in recurring_runs_named(client, name, experiment_id)]
    created = _call(
        client.create_recurring_run,
        experiment_id=experiment_id,
        job_name=name,
        description=(
            f"stage1-pro retraining ({pipeline_name} version {uploaded.version_name}); cron '{cron}'; "
            f"{describe_run(params, None, 'each run fingerprints its data')}; its report-run step logs "
            "(and POSTs to webhook_url) whether it was blessed"
        ),
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        params=dict(params),
        pipeline_id=uploaded.pipeline_id,
        version_id=uploaded.version_id,
        enabled=True,
        pipeline_root=pipeline_root,
    )
    for recurring_run_id in previous:
        _call(client.delete_recurring_run, recurring_run_id)
    return Scheduled(created.recurring_run_id, experiment_id, uploaded, previous)


def unschedule(client: Any, *, name: str, experiment: str = DEFAULT_EXPERIMENT) -> list[str]:
    """Delete every recurring run named ``name`` in ``experiment``; return their IDs."""
    experiment_id = _experiment_id(client, experiment)
    removed = [r.recurring_run_id for r in recurring_runs_named(client, name, experiment_id)]
    for recurring_run_id in removed:
        _call(client.delete_recurring_run, recurring_run_id)
    return removed


def recurring_runs_named(client: Any, name: str, experiment_id: str) -> list[Any]:
    """Recurring runs of ``experiment_id`` whose display name is ``name``."""
    return _named(client.list_recurring_runs, "recurring_runs", name, experiment_id=experiment_id)


# ------------------------------------------------------------------------------------------------
# KFP cron: 6 fields, seconds first (robfig/cron), or a descriptor.

_CRON_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 6),
)
_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
    )
}
_DAYS = {d: i for i, d in enumerate(["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"])}
_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_EVERY = re.compile(r"^@every\s+(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def validate_cron(expression: str) -> str:
    """Return ``expression`` normalised if it is a valid KFP cron, else raise :class:`ConfigError`.

    KFP uses 6 fields with seconds first (``second minute hour day-of-month month day-of-week``,
    e.g. ``0 0 2 * * *`` for 02:00 every day) or a descriptor (``@daily``, ``@every 6h``).
    """
    text = " ".join(str(expression).split())
    if text.startswith("@"):
        if text in _DESCRIPTORS or _EVERY.match(text):
            return text
        raise ConfigError(
            f"cron {expression!r}: unknown descriptor; use one of {', '.join(_DESCRIPTORS)} or '@every 6h'"
        )
    fields = text.split(" ") if text else []
    if len(fields) != 6:
        hint = f"; did you mean '0 {text}' (seconds first)?" if len(fields) == 5 else ""
        raise ConfigError(
            f"cron {expression!r} has {len(fields)} fields; KFP cron has 6, seconds first: "
            f"'second minute hour day-of-month month day-of-week', e.g. '0 0 2 * * *' for 02:00 daily{hint}"
        )
    for text_field, (label, low, high) in zip(fields, _CRON_FIELDS, strict=True):
        names = _MONTHS if label == "month" else _DAYS if label == "day of week" else {}
        _check_cron_field(expression, text_field, label, low, high, names)
    return text


def _check_cron_field(
    expression: str, text: str, label: str, low: int, high: int, names: dict[str, int]
) -> None:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"cron {expression!r}: {label} field {text!r} {why}")

    def number(token: str) -> int:
        token_upper = token.upper()
        if token_upper in names:
            return names[token_upper]
        if not token.isdigit():
            raise bad(f"has {token!r}, not a number{' or name' if names else ''}")
        value = int(token)
        if not low <= value <= high:
            raise bad(f"has {value}, outside {low}-{high}")
        return value

    for part in text.split(","):
        base, slash, step = part.partition("/")
        if slash and (not step.isdigit() or int(step) == 0):
            raise bad(f"has step {step!r}; a step is a positive integer")
        if base in ("*", "?"):
            if base == "?" and label not in ("day of month", "day of week"):
                raise bad("uses '?', allowed only for day of month and day of week")
            continue
        start, dash, end = base.partition("-")
        if not start:
            raise bad("has an empty value")
        first = number(start)
        if dash and number(end) < first:
            raise bad(f"has the range {base!r}, which runs backwards")


# ------------------------------------------------------------------------------------------------


def _experiment_id(client: Any, name: str) -> str:
    return _call(client.create_experiment, name).experiment_id  # get-or-create


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def _named(method: Any, items: str, name: str, **kwargs: Any) -> list[Any]:
    """Objects of a paged list call whose display name is exactly ``name`` (server-side filter first)."""
    return [x for x in _paged(method, items, filter=_name_filter(name), **kwargs) if x.display_name == name]


def _paged(method: Any, items: str, **kwargs: Any) -> Iterator[Any]:
    token = ""
    while True:
        page = _call(method, page_token=token, page_size=_PAGE_SIZE, **kwargs)
        yield from getattr(page, items, None) or []
        token = getattr(page, "next_page_token", None) or ""
        if not token:
            return


def _call(method: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a ``kfp.Client`` method; server and connection errors become :class:`KFPError`."""
    import urllib3
    from kfp_server_api.exceptions import OpenApiException

    try:
        return method(*args, **kwargs)
    except (OpenApiException, urllib3.exceptions.HTTPError, ValueError) as exc:
        name = getattr(method, "__name__", "request")
        raise KFPError(f"Kubeflow Pipelines {name} failed: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    body = getattr(exc, "body", None)
    if status is not None:
        message = body
        if isinstance(body, str | bytes):
            try:
                message = json.loads(body).get("message", body)
            except (ValueError, AttributeError):
                message = body
        return f"HTTP {status}: {message}"
    return str(exc) or type(exc).__name__
