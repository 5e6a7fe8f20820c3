"""kfp.Client calls (upload, new version, run, recurring run and its replacement) against a loopback
HTTP server that answers the KFP v2beta1 REST shapes; the tests assert the payloads it received.

kfp_server_api talks through urllib3 directly, so request-mocking libraries do not see it; a real
socket server does, and exercises the SDK's own serialisation. The server stands in for the KFP
API server (``ml-pipeline``): where its behaviour matters (which call creates which versions, name
fallbacks, conflicts), it mirrors kubeflow/pipelines ``backend/src/apiserver/server`` at tag 2.17.0
(``pipeline_server.go``, ``pipeline_upload_server.go``, ``api_converter.go``, ``api_util.go``,
``template/v2_template.go``, ``resource/resource_manager.go``), cited per route.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Iterator
from email import policy as email_policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from google.protobuf import json_format
from http_helpers import send_json
from kfp.pipeline_spec import pipeline_spec_pb2

from stage1_pro import __version__
from stage1_pro.cli import main
from stage1_pro.components.image import component_image
from stage1_pro.errors import ConfigError
from stage1_pro.pipelines.client import (
    KFPError,
    connect,
    find_version,
    schedule,
    submit_run,
    unschedule,
    upload,
    validate_cron,
    version_name_for,
)

API = "/apis/v2beta1"
PARAMS = {"data_uri": "gs://bucket/data/manifest.csv", "phase": 3, "exit_policy": "gate", "epochs": 2}


class RefusedError(Exception):
    """An error answer of the fake server: HTTP status, gRPC code and message, as the gateway writes them."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class FakeKFP:
    """The slice of the KFP v2beta1 REST API that kfp.Client uses here, with an in-memory store."""

    def __init__(self) -> None:
        self.log: list[dict[str, Any]] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}
        self.uploads: list[bytes] = []
        # ListPipelineVersions returns each version's spec (storage/pipeline_store.go selects the
        # PipelineSpec column); False stands in for a server that leaves it out of lists.
        self.list_returns_spec = True
        self._ids = itertools.count(1)
        self._clock = itertools.count(1)

    def new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}"

    def stamp(self) -> str:
        return f"2026-01-01T00:00:{next(self._clock):02d}Z"

    # -- request handling ---------------------------------------------------------------------
    def handle(
        self, method: str, path: str, query: dict[str, str], body: bytes, ctype: str
    ) -> tuple[int, dict]:
        payload = json.loads(body) if body and ctype.startswith("application/json") else None
        self.log.append({"method": method, "path": path, "query": query, "json": payload})
        routes = [
            ("GET", r"/healthz", lambda: {"multi_user": False}),
            ("GET", r"/pipelines", lambda: self._list("pipelines", self.pipelines.values(), query)),
            ("POST", r"/pipelines", lambda: self._create_pipeline(payload)),
            ("POST", r"/pipelines/upload", lambda: self._upload(query, body, ctype)),
            ("POST", r"/pipelines/upload_version", lambda: self._upload_version(query, body, ctype)),
            ("GET", r"/pipelines/(?P<pid>[^/]+)/versions", lambda pid: self._list_versions(pid, query)),
            (
                "GET",
                r"/pipelines/(?P<pid>[^/]+)/versions/(?P<vid>[^/]+)",
                lambda pid, vid: self._get_version(pid, vid),
            ),
            ("GET", r"/experiments", lambda: self._list("experiments", self.experiments.values(), query)),
            ("POST", r"/experiments", lambda: self._create("experiments", "experiment_id", payload)),
            ("POST", r"/runs", lambda: self._create("runs", "run_id", payload)),
            ("GET", r"/recurringruns", lambda: self._list_recurring(query)),
            ("POST", r"/recurringruns", lambda: self._create("recurring", "recurring_run_id", payload)),
            ("DELETE", r"/recurringruns/(?P<rid>[^/]+)", lambda rid: self._delete_recurring(rid)),
        ]
        for verb, pattern, action in routes:
            match = re.fullmatch(API + pattern, path)
            if verb == method and match:
                try:
                    return 200, action(**match.groupdict())
                except RefusedError as refused:
                    return refused.status, {
                        "error": refused.message,
                        "code": refused.code,
                        "message": refused.message,
                    }
        return 404, {"error": f"no route {method} {path}", "code": 5, "message": "not found"}

    def _matches(self, item: dict, query: dict[str, str]) -> bool:
        if "filter" not in query:
            return True
        for predicate in json.loads(query["filter"])["predicates"]:
            assert predicate["operation"] in ("EQUALS", 1), (
                predicate
            )  # name or enum number: both are valid JSON
            if item.get(predicate["key"]) != predicate.get("stringValue", predicate.get("string_value")):
                return False
        return True

    def _list(self, key: str, items: Any, query: dict[str, str]) -> dict:
        found = [i for i in items if self._matches(i, query)]
        return {key: found, "total_size": len(found)}

    def _new_pipeline(self, name: str, namespace: str = "", description: str = "") -> dict:
        # Pipeline names are unique per namespace (resource manager CreatePipeline -> AlreadyExists).
        if any(p["name"] == name and p.get("namespace", "") == namespace for p in self.pipelines.values()):
            raise RefusedError(409, 6, f"Failed to create a pipeline: pipeline {name!r} already exists")
        pid = self.new_id("pipeline")
        pipeline = {"pipeline_id": pid, "name": name, "display_name": name, "created_at": self.stamp()}
        pipeline.update({k: v for k, v in (("namespace", namespace), ("description", description)) if v})
        self.pipelines[pid] = pipeline
        self.versions[pid] = []
        return pipeline

    def _create_pipeline(self, payload: dict) -> dict:
        # CreatePipeline (pipeline_server.go createPipeline): the pipeline only, no version. The name
        # falls back to display_name (api_converter.go toModelPipeline), then is required.
        name = payload.get("name") or payload.get("display_name") or ""
        if not name:
            raise RefusedError(400, 3, "name is required")
        return self._new_pipeline(name, payload.get("namespace", ""), payload.get("description", ""))

    def _upload(self, query: dict[str, str], body: bytes, ctype: str) -> dict:
        # UploadPipeline (pipeline_upload_server.go uploadPipeline): the pipeline AND a first version
        # with the pipeline's name, display name and description.
        spec = stored_spec(uploaded_file(body, ctype))
        self.uploads.append(body)
        pipeline = self._new_pipeline(query["name"], query.get("namespace", ""), query.get("description", ""))
        self.versions[pipeline["pipeline_id"]].append(
            self._version(pipeline["pipeline_id"], query["name"], spec, query.get("description", ""))
        )
        return pipeline

    def _upload_version(self, query: dict[str, str], body: bytes, ctype: str) -> dict:
        # UploadPipelineVersion (pipeline_upload_server.go uploadPipelineVersion): the name is the
        # name, else display_name, else the file name (buildPipelineName); a taken name is 409.
        pid = query["pipelineid"]
        if pid not in self.pipelines:
            raise RefusedError(404, 5, f"pipeline {pid} not found")
        name = query.get("name") or query.get("display_name") or "pipeline.yaml"
        if any(v["name"] == name for v in self.versions[pid]):
            raise RefusedError(409, 6, "Failed to create a pipeline version")
        spec = stored_spec(uploaded_file(body, ctype))
        self.uploads.append(body)
        version = self._version(pid, name, spec, query.get("description", ""))
        self.versions[pid].append(version)
        return version

    def _version(self, pid: str, name: str, spec: str, description: str = "") -> dict:
        version = {
            "pipeline_id": pid,
            "pipeline_version_id": self.new_id("version"),
            "name": name,
            "display_name": name,
            "created_at": self.stamp(),
            "spec_yaml": spec,  # the stored PipelineSpec column, not part of the API answer
        }
        if description:
            version["description"] = description
        return version

    def _answer(self, version: dict, with_spec: bool = True) -> dict:
        # toApiPipelineVersion (api_converter.go): the stored YAML back as a struct.
        answer = {k: v for k, v in version.items() if k != "spec_yaml"}
        if with_spec:
            answer["pipeline_spec"] = spec_struct(version["spec_yaml"])
        return answer

    def _get_version(self, pid: str, vid: str) -> dict:
        # GetPipelineVersion (pipeline_server.go getPipelineVersion).
        for version in self.versions.get(pid, []):
            if version["pipeline_version_id"] == vid:
                return self._answer(version)
        raise RefusedError(404, 5, f"pipeline version {vid} not found")

    def _list_versions(self, pid: str, query: dict[str, str]) -> dict:
        found = [v for v in self.versions.get(pid, []) if self._matches(v, query)]
        # page through one item at a time, to exercise the client's paging
        start = int(query.get("page_token") or 0)
        page = [self._answer(v, self.list_returns_spec) for v in found[start : start + 1]]
        token = str(start + 1) if start + 1 < len(found) else ""
        return {"pipeline_versions": page, "total_size": len(found), "next_page_token": token}

    def _create(self, store: str, id_key: str, payload: dict) -> dict:
        item = dict(payload, **{id_key: self.new_id(store)}, created_at=self.stamp())
        getattr(self, store)[item[id_key]] = item
        return item

    def _list_recurring(self, query: dict[str, str]) -> dict:
        found = [
            r
            for r in self.recurring.values()
            if r["experiment_id"] == query.get("experiment_id") and self._matches(r, query)
        ]
        return {"recurringRuns": found, "total_size": len(found)}

    def _delete_recurring(self, rid: str) -> dict:
        self.recurring.pop(rid)
        return {}

    def requests(self, method: str, fragment: str = "") -> list[dict[str, Any]]:
        return [r for r in self.log if r["method"] == method and fragment in r["path"]]


def uploaded_file(body: bytes, ctype: str) -> bytes:
    """The ``uploadfile`` part of a multipart/form-data upload."""
    message = BytesParser(policy=email_policy.HTTP).parsebytes(
        f"Content-Type: {ctype}\r\n\r\n".encode() + body
    )
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "uploadfile":
            return part.get_payload(decode=True)
    raise RefusedError(400, 3, "no uploadfile in the request")


def stored_spec(package: bytes) -> str:
    """The spec as the API server stores it: each YAML document parsed into its proto, then written
    back as protojson-as-YAML, the platform spec after ``\n---\n`` (template/v2_template.go
    ``NewV2SpecTemplate`` and ``Bytes``, called by resource_manager.go ``CreatePipelineVersion``)."""
    pipeline_spec, platform_spec = None, None
    for doc in yaml.safe_load_all(package):
        if isinstance(doc, dict) and doc.get("pipelineInfo", {}).get("name") and doc.get("root"):
            pipeline_spec = json_format.ParseDict(doc, pipeline_spec_pb2.PipelineSpec())
        elif isinstance(doc, dict) and "kubernetes" in doc.get("platforms", {}):
            platform_spec = json_format.ParseDict(doc, pipeline_spec_pb2.PlatformSpec())
    if pipeline_spec is None:
        raise RefusedError(400, 3, "Invalid input error: no pipeline spec is provided")
    docs = [json_format.MessageToDict(pipeline_spec)]
    if platform_spec is not None:
        docs.append(json_format.MessageToDict(platform_spec))
    return "\n---\n".join(yaml.safe_dump(d, sort_keys=True) for d in docs)


def spec_struct(stored: str) -> dict:
    """A stored spec as the API returns it: the pipeline spec alone, or ``pipeline_spec`` and
    ``platform_spec`` side by side (api_util.go ``YamlStringToPipelineSpecStruct``)."""
    docs = [yaml.safe_load(text) for text in stored.split("\n---\n")]
    platform = [d for d in docs if "platforms" in d]
    pipeline = next(d for d in docs if "platforms" not in d)
    return {"pipeline_spec": pipeline, "platform_spec": platform[0]} if platform else pipeline


@pytest.fixture
def kfp_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, FakeKFP]]:
    import kfp.client.client as kfp_client_module

    # kfp.Client writes ~/.config/kfp/context.json; keep it out of the real home
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(
        kfp_client_module.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "home/.config/kfp/context.json")
    )
    fake = FakeKFP()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, payload = fake.handle(
                self.command, url.path, query, body, self.headers.get("Content-Type", "")
            )
            send_json(self, status, payload)

        do_GET = do_POST = do_DELETE = _serve  # noqa: N815

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", fake
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "pipeline.yaml"
    assert main(["compile", "--out", str(out)]) == 0
    return out


def changed_copy(package: Path, tmp_path: Path, tag: str) -> Path:
    """The same pipeline with different bytes (a new version's worth of change)."""
    copy = tmp_path / f"pipeline-{tag}.yaml"
    copy.write_text(f"# build {tag}\n" + package.read_text())
    return copy


# ------------------------------------------------------------------------------------------------


def test_upload_creates_then_adds_versions_and_reuses_unchanged(
    kfp_server: tuple[str, FakeKFP], package: Path, tmp_path: Path
) -> None:
    host, fake = kfp_server
    client = connect(host)
    assert fake.requests("GET", "/healthz"), "kfp.Client checks healthz on creation"

    first = upload(client, package, "stage1-pro", description="build abc")
    assert first.created_pipeline and not first.reused_version
    # The pipeline is created empty, then the package is uploaded as its one version: never the
    # one-step /pipelines/upload, which would add a second version named after the pipeline.
    (create,) = [r for r in fake.requests("POST") if r["path"] == f"{API}/pipelines"]
    assert create["json"] == {"display_name": "stage1-pro", "description": "build abc"}
    assert not [r for r in fake.log if r["path"] == f"{API}/pipelines/upload"]
    (version,) = fake.versions[first.pipeline_id]
    assert version["name"] == first.version_name == version_name_for(package)
    assert version["description"] == "build abc"
    assert first.version_id == version["pipeline_version_id"]
    assert b"pipelineInfo" in fake.uploads[0] and b"exec-train" in fake.uploads[0]

    newer = changed_copy(package, tmp_path, "2")
    second = upload(client, newer, "stage1-pro")
    add = fake.requests("POST", "/pipelines/upload_version")[-1]
    described = add["query"].pop("description")
    assert add["query"] == {"name": version_name_for(newer), "pipelineid": first.pipeline_id}
    # by default a version says what it is: the release, the git revision, the images it runs
    assert re.fullmatch(
        rf"stage1-pro {re.escape(__version__)} from git ([0-9a-f]{{12}}(\+dirty)?|unknown); images .+",
        described,
    )
    assert component_image() in described and component_image(gpu=True) in described
    assert second.pipeline_id == first.pipeline_id and second.version_id != first.version_id
    assert not second.created_pipeline and not second.reused_version
    assert len(fake.versions[first.pipeline_id]) == 2

    again = upload(client, newer, "stage1-pro")
    assert again.reused_version and again.version_id == second.version_id
    assert len(fake.requests("POST", "/pipelines/upload_version")) == 2, "no duplicate version"
    assert len([r for r in fake.log if r["path"] == f"{API}/pipelines" and r["method"] == "POST"]) == 1

    assert find_version(client, "stage1-pro").version_id == second.version_id  # newest
    assert find_version(client, "stage1-pro", first.version_name).version_id == first.version_id


def test_the_one_step_upload_endpoint_would_create_two_versions(
    kfp_server: tuple[str, FakeKFP], package: Path
) -> None:
    """Why upload() does not call kfp.Client.upload_pipeline: the server adds a version named after the
    pipeline, and a named version uploaded next is a second copy of the same package."""
    host, fake = kfp_server
    client = connect(host)
    pipeline = client.upload_pipeline(str(package), pipeline_name="p")
    client.upload_pipeline_version(str(package), pipeline_version_name="v1", pipeline_id=pipeline.pipeline_id)
    assert [v["name"] for v in fake.versions[pipeline.pipeline_id]] == ["p", "v1"]


def test_upload_after_a_failed_version_upload_completes_the_empty_pipeline(
    kfp_server: tuple[str, FakeKFP], package: Path
) -> None:
    host, fake = kfp_server
    client = connect(host)
    from kfp_server_api import V2beta1Pipeline

    # As an upload whose version upload failed leaves it: the pipeline, without a version.
    client.pipelines.pipeline_service_create_pipeline(V2beta1Pipeline(display_name="stage1-pro"))
    result = upload(client, package, "stage1-pro")
    assert not result.created_pipeline and not result.reused_version
    assert [v["name"] for v in fake.versions[result.pipeline_id]] == [version_name_for(package)]


def rewritten(package: Path, out: Path, change: Any = None) -> Path:
    """``package`` written again by PyYAML (other layout, no comments), with ``change(docs)`` applied."""
    docs = list(yaml.safe_load_all(package.read_text()))
    if change is not None:
        change(docs)
    out.write_text("# rebuilt\n" + yaml.safe_dump_all(docs, sort_keys=False, width=60))
    return out


def with_default_caching_spelled_out(docs: list[dict]) -> None:
    """``cachingOptions: {}`` as ``{enableCache: false}``: the same proto; the server stores ``{}``."""
    for component in [docs[0]["root"], *docs[0]["components"].values()]:
        for task in component.get("dag", {}).get("tasks", {}).values():
            if task.get("cachingOptions") == {}:
                task["cachingOptions"] = {"enableCache": False}


@pytest.mark.parametrize("list_returns_spec", [True, False], ids=["spec-in-list", "spec-by-get"])
def test_named_version_is_reused_for_the_same_spec(
    kfp_server: tuple[str, FakeKFP],
    package: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    list_returns_spec: bool,
) -> None:
    host, fake = kfp_server
    fake.list_returns_spec = list_returns_spec
    client = connect(host)
    first = upload(client, package, "p", version="v1")
    (stored,) = fake.versions[first.pipeline_id]
    assert "\n---\nplatforms:" in stored["spec_yaml"], "both documents kept, as the server does"
    assert "PIPELINE DEFINITION" not in stored["spec_yaml"], "stored as parsed, not as uploaded"

    same = rewritten(package, tmp_path / "same.yaml", with_default_caching_spelled_out)
    assert same.read_bytes() != package.read_bytes()
    again = upload(client, same, "p", version="v1")
    assert again.reused_version and again.version_id == first.version_id
    assert len(fake.uploads) == 1
    assert bool(fake.requests("GET", "/versions/version-")) is not list_returns_spec

    assert main(["upload", "--host", host, "--name", "p", "--package", str(same), "--version", "v1"]) == 0
    assert "reused existing version of 'p'" in capsys.readouterr().out
    assert len(fake.uploads) == 1


def _new_train_image(docs: list[dict]) -> None:
    docs[0]["deploymentSpec"]["executors"]["exec-train"]["container"]["image"] += "-edited"


def _new_run_as_user(docs: list[dict]) -> None:
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    executors["exec-calibrate"]["securityContext"]["runAsUser"] = "10002"


@pytest.mark.parametrize(
    "change", [_new_train_image, _new_run_as_user], ids=["pipeline-spec", "platform-spec"]
)
def test_named_version_with_a_changed_spec_is_refused(
    kfp_server: tuple[str, FakeKFP],
    package: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: Any,
) -> None:
    """Reusing a version by name alone would leave the old spec running while the user believes the
    edited one is live."""
    host, fake = kfp_server
    client = connect(host)
    first = upload(client, package, "p", version="v1")
    edited = rewritten(package, tmp_path / "edited.yaml", change)

    with pytest.raises(KFPError) as refused:
        upload(client, edited, "p", version="v1")
    message = str(refused.value)
    assert f"pipeline 'p' already has a version 'v1' ({first.version_id})" in message
    assert "different pipeline spec" in message
    assert "Pick another --version, or omit it to get a content-derived name" in message

    command = ["upload", "--host", host, "--name", "p", "--package", str(edited), "--version", "v1"]
    assert main(command) == 2
    assert "Pick another --version, or omit it" in capsys.readouterr().err
    assert len(fake.uploads) == 1 and len(fake.versions[first.pipeline_id]) == 1, "nothing uploaded"

    # the fix the message names: without --version the edited package gets its own version
    fresh = upload(client, edited, "p")
    assert not fresh.reused_version and fresh.version_name == version_name_for(edited)


def test_named_version_against_a_package_that_is_no_pipeline_spec(
    kfp_server: tuple[str, FakeKFP], package: Path, tmp_path: Path
) -> None:
    host, fake = kfp_server
    client = connect(host)
    upload(client, package, "p", version="v1")
    broken = rewritten(package, tmp_path / "broken.yaml", lambda docs: docs[0].update(schemaVersion=[2]))
    with pytest.raises(KFPError, match=rf"{re.escape(str(broken))} is not a valid KFP pipeline package"):
        upload(client, broken, "p", version="v1")
    assert len(fake.uploads) == 1


def test_version_name_is_content_derived(package: Path, tmp_path: Path) -> None:
    from stage1_pro import __version__

    name = version_name_for(package)
    assert re.fullmatch(re.escape(__version__) + r"-[0-9a-f]{12}", name)
    assert version_name_for(changed_copy(package, tmp_path, "x")) != name


def test_run_from_package_sends_parameters_spec_and_root(
    kfp_server: tuple[str, FakeKFP], package: Path
) -> None:
    host, fake = kfp_server
    client = connect(host)
    run_id = submit_run(
        client,
        experiment="nightly",
        params=PARAMS,
        package=package,
        run_name="try-gate",
        pipeline_root="gs://bucket/root",
        enable_caching=False,
    )
    (experiment,) = fake.requests("POST", "/experiments")
    assert experiment["json"]["display_name"] == "nightly"
    (run,) = fake.requests("POST", "/runs")
    body = run["json"]
    assert fake.runs[run_id]["display_name"] == "try-gate"
    assert body["experiment_id"] == fake.experiments[next(iter(fake.experiments))]["experiment_id"]
    assert body["runtime_config"] == {"parameters": PARAMS, "pipeline_root": "gs://bucket/root"}
    assert "pipeline_version_reference" not in body
    sent = body["pipeline_spec"]
    assert sent["pipeline_spec"]["pipelineInfo"]["name"] == "stage1-pro"
    assert "exec-train" in sent["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    # --no-cache: every task of this run recomputes
    dags = [sent["pipeline_spec"]["root"], *sent["pipeline_spec"]["components"].values()]
    tasks = {name: t for d in dags for name, t in d.get("dag", {}).get("tasks", {}).items()}
    assert {"train", "calibrate-2", "export-2", "publish-3"} <= set(tasks)
    cached = {name for name, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == set(), "proto3 drops false: enableCache absent means off"
    assert all("cachingOptions" in tasks[name] for name in ("train", "calibrate-2", "export-2"))

    # a second run reuses the experiment (get-or-create)
    submit_run(client, experiment="nightly", params=PARAMS, package=package)
    assert len(fake.requests("POST", "/experiments")) == 1


def test_run_of_an_uploaded_version_pins_it(kfp_server: tuple[str, FakeKFP], package: Path) -> None:
    host, fake = kfp_server
    client = connect(host)
    uploaded = upload(client, package)
    submit_run(client, experiment="e", params={"data_uri": "gs://b/m.csv"}, version=uploaded)
    body = fake.requests("POST", "/runs")[0]["json"]
    assert body["pipeline_version_reference"] == {
        "pipeline_id": uploaded.pipeline_id,
        "pipeline_version_id": uploaded.version_id,
    }
    assert "pipeline_spec" not in body
    assert body["runtime_config"]["parameters"] == {"data_uri": "gs://b/m.csv"}


def test_run_rejects_bad_parameters_before_any_request(
    kfp_server: tuple[str, FakeKFP], package: Path
) -> None:
    host, fake = kfp_server
    client = connect(host)
    before = len(fake.log)
    with pytest.raises(ConfigError, match="gate needs phase >= 3"):
        submit_run(
            client, experiment="e", params={"data_uri": "m.csv", "exit_policy": "gate"}, package=package
        )
    with pytest.raises(ConfigError, match="would cache the fingerprint step"):
        submit_run(client, experiment="e", params=PARAMS, package=package, enable_caching=True)
    assert len(fake.log) == before


def test_schedule_pins_new_version_and_replaces_the_previous_one(
    kfp_server: tuple[str, FakeKFP], package: Path, tmp_path: Path
) -> None:
    host, fake = kfp_server
    client = connect(host)
    first = schedule(client, name="nightly", cron="0 0 2 * * *", package=package, params=PARAMS)
    assert first.replaced == []
    (created,) = fake.requests("POST", "/recurringruns")
    body = created["json"]
    assert body["display_name"] == "nightly"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 2 * * *"}}
    assert int(body["max_concurrency"]) == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["pipeline_version_reference"] == {
        "pipeline_id": first.upload.pipeline_id,
        "pipeline_version_id": first.upload.version_id,
    }
    assert body["runtime_config"]["parameters"] == PARAMS
    assert "pipeline_spec" not in body, "pinned to the uploaded version, not an inline spec"

    newer = changed_copy(package, tmp_path, "2")
    second = schedule(client, name="nightly", cron="0 30 3 * * MON-FRI", package=newer, params=PARAMS)
    assert second.replaced == [first.recurring_run_id]
    assert second.upload.version_id != first.upload.version_id
    assert second.upload.version_name == version_name_for(newer)
    new_body = fake.requests("POST", "/recurringruns")[1]["json"]
    assert new_body["pipeline_version_reference"]["pipeline_version_id"] == second.upload.version_id
    assert new_body["trigger"]["cron_schedule"]["cron"] == "0 30 3 * * MON-FRI"
    # created before the old one is deleted: a failed create leaves the old schedule running
    methods = [
        (r["method"], r["path"]) for r in fake.log if "/recurringruns" in r["path"] and r["method"] != "GET"
    ]
    assert methods[-2:] == [
        ("POST", f"{API}/recurringruns"),
        ("DELETE", f"{API}/recurringruns/{first.recurring_run_id}"),
    ]
    assert list(fake.recurring) == [second.recurring_run_id]

    # a schedule of another name is left alone; --remove deletes by name
    other = schedule(client, name="weekly", cron="@weekly", package=newer, params=PARAMS)
    assert unschedule(client, name="nightly") == [second.recurring_run_id]
    assert list(fake.recurring) == [other.recurring_run_id]


def test_cli_upload_run_schedule_against_the_server(
    kfp_server: tuple[str, FakeKFP], package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host, fake = kfp_server
    assert main(["upload", "--host", host, "--name", "s1", "--package", str(package)]) == 0
    assert "created pipeline 's1'" in capsys.readouterr().out
    args = ["--host", host, "--experiment", "exp", "--package", str(package)]
    params = [
        "--param",
        "data_uri=gs://b/m.csv",
        "--param",
        "phase=3",
        "-p",
        "exit_policy=gate",
        "-p",
        "lr=0.0003",
    ]
    assert main(["run", *args, *params]) == 0
    sent = fake.requests("POST", "/runs")[0]["json"]["runtime_config"]["parameters"]
    assert sent == {"data_uri": "gs://b/m.csv", "phase": 3, "exit_policy": "gate", "lr": 0.0003}
    assert main(["run", "--host", host, "--pipeline", "s1", "-p", "data_uri=gs://b/m.csv"]) == 0
    assert "pipeline_version_reference" in fake.requests("POST", "/runs")[1]["json"]

    sched = ["schedule", "--host", host, "--name", "nightly", "--package", str(package), "--pipeline", "s1"]
    assert main([*sched, "--cron", "0 0 2 * * *", "-p", "data_uri=gs://b/m.csv"]) == 0
    out = capsys.readouterr().out
    assert "scheduled 'nightly' (0 0 2 * * *)" in out and "pinned to s1 version" in out


def test_cli_checks_cron_and_parameters_before_contacting_the_server(
    kfp_server: tuple[str, FakeKFP], package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host, fake = kfp_server
    sched = ["schedule", "--host", host, "--name", "n", "--package", str(package), "-p", "data_uri=m.csv"]
    assert main([*sched, "--cron", "0 2 * * *"]) == 2
    assert "has 5 fields; KFP cron has 6, seconds first" in capsys.readouterr().err
    assert main([*sched, "--cron", "0 0 25 * * *"]) == 2
    assert "hour field '25' has 25, outside 0-23" in capsys.readouterr().err
    assert (
        main(["run", "--host", host, "--package", str(package), "-p", "data_uri=m.csv", "-p", "phase=one"])
        == 2
    )
    assert "phase='one' is not int" in capsys.readouterr().err
    assert main(["run", "--host", host, "--package", str(package), "-p", "data=m.csv"]) == 2
    assert "unknown pipeline parameter 'data' (did you mean 'data_uri'?)" in capsys.readouterr().err
    assert fake.log == []


def test_unreachable_server_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.setenv("HOME", str(tmp_path))
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(KFPError, match=f"cannot reach Kubeflow Pipelines at http://127.0.0.1:{port}"):
        connect(f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="pass --host"):
        connect("")


def test_missing_pipeline_and_version_are_clear_errors(
    kfp_server: tuple[str, FakeKFP], package: Path
) -> None:
    host, _ = kfp_server
    client = connect(host)
    with pytest.raises(KFPError, match="no pipeline named 'nope'"):
        find_version(client, "nope")
    upload(client, package, "p")
    with pytest.raises(KFPError, match="pipeline 'p' has no version 'v9'"):
        find_version(client, "p", "v9")


@pytest.mark.parametrize(
    "expression",
    [
        "0 0 2 * * *",
        "0 */15 * * * ?",
        "30 0 9 ? * 2-6",
        "0 0 0 1 JAN,jul *",
        "0 0 6 * * MON-FRI",
        "@daily",
        "@every 6h",
    ],
)
def test_validate_cron_accepts(expression: str) -> None:
    assert validate_cron(f"  {expression} ") == " ".join(expression.split())


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("0 2 * * *", "has 5 fields; KFP cron has 6, seconds first: 'second minute hour day-of-month month"),
        ("0 2 * * *", "did you mean '0 0 2 * * *' (seconds first)?"),
        ("0 0 2 * * * 2026", "has 7 fields"),
        ("", "has 0 fields"),
        ("60 0 2 * * *", "second field '60' has 60, outside 0-59"),
        ("0 0 2 0 * *", "day of month field '0' has 0, outside 1-31"),
        ("0 0 2 * 13 *", "month field '13' has 13, outside 1-12"),
        ("0 0 2 * * 7", "day of week field '7' has 7, outside 0-6"),
        ("0 ? 2 * * *", "minute field '?' uses '?', allowed only for day of month and day of week"),
        ("0 0 2 * * FUNDAY", "day of week field 'FUNDAY' has 'FUNDAY', not a number or name"),
        ("0 */0 * * * *", "minute field '*/0' has step '0'; a step is a positive integer"),
        ("0 0 5-2 * * *", "hour field '5-2' has the range '5-2', which runs backwards"),
        ("@sometimes", "unknown descriptor"),
    ],
)
def test_validate_cron_rejects(expression: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_cron(expression)


def test_compiled_package_is_what_the_server_receives(kfp_server: tuple[str, FakeKFP], package: Path) -> None:
    host, fake = kfp_server
    upload(connect(host), package, "p")
    uploaded = fake.uploads[0].decode()
    docs = list(yaml.safe_load_all(package.read_text()))
    assert docs[0]["pipelineInfo"]["name"] in uploaded
    assert package.read_text().splitlines()[-1] in uploaded


def test_runs_are_named_by_date_and_data_fingerprint_and_described(
    kfp_server: tuple[str, FakeKFP], package: Path, tiny_dataset: Path
) -> None:
    from stage1_pro.data import load_dataset

    host, fake = kfp_server
    client = connect(host)
    fingerprint = load_dataset(str(tiny_dataset), check_files=False).fingerprint
    params = {**PARAMS, "data_uri": str(tiny_dataset)}
    run_id = submit_run(client, experiment="stage1-pro", params=params, package=package)
    body = fake.runs[run_id]
    assert re.fullmatch(rf"stage1-pro-gate-\d{{8}}-\d{{4}}-{fingerprint[:8]}", body["display_name"])
    assert body["description"].startswith(
        f"data {tiny_dataset} (fingerprint {fingerprint}); phase=3, exit_policy=gate"
    )
    assert "from git " in body["description"] and component_image(gpu=True) in body["description"]

    # data this machine cannot read (no credentials): still a dated name, and the description says why
    run_id = submit_run(client, experiment="stage1-pro", params=PARAMS, package=package)
    body = fake.runs[run_id]
    assert re.fullmatch(r"stage1-pro-gate-\d{8}-\d{4}", body["display_name"])
    assert "(fingerprint unknown)" in body["description"]
    # why depends on this machine (no credentials here; another test's emulator: no such bucket)
    assert "data fingerprint not computed on the submitting machine (" in body["description"]


def test_a_recurring_run_says_what_each_run_reports(kfp_server: tuple[str, FakeKFP], package: Path) -> None:
    host, fake = kfp_server
    created = schedule(connect(host), name="nightly", cron="@daily", package=package, params=PARAMS)
    description = fake.recurring[created.recurring_run_id]["description"]
    assert description.startswith(f"stage1-pro retraining (stage1-pro version {created.upload.version_name})")
    assert "data gs://bucket/data/manifest.csv (fingerprint unknown)" in description
    assert "report-run step logs (and POSTs to webhook_url) whether it was blessed" in description
