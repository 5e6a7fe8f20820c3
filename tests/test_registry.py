"""Publish and pull through the registry: the GCS emulator (fake-gcs-server) and a local folder.

Faults: an upload failing midway, tampered or extra objects in a published version, a replaced
bundle.json, transient 503s (retried), unblessed bundles, immutable versions.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from bundle_helpers import build_tiny_model, make_run, tiny_images

from stage1_pro import registry, storage
from stage1_pro.artifacts import read_artifact, write_artifact
from stage1_pro.bundle import export_bundle, verify_bundle
from stage1_pro.cli import main
from stage1_pro.errors import ArtifactError, StorageError


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> dict[str, Path]:
    """Two blessed versions (v1, v2) of one run and an unblessed one (u1)."""
    root = tmp_path_factory.mktemp("registry")
    model_dir = build_tiny_model(root / "model", tiny_images(tiny_dataset))
    run = make_run(root / "run", model_dir)
    out = {v: export_bundle(run, root / v, version=v) for v in ("v1", "v2")}
    unblessed = make_run(root / "run-u", model_dir, calibrate_kwargs={"target_fnr_exit": 0.05})
    out["u1"] = export_bundle(unblessed, root / "u1", version="u1", allow_unblessed=True)
    return out


@pytest.fixture
def prefix(gcs_emulator) -> str:
    return gcs_emulator.make_bucket() + "/bundles/stage1"


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def test_publish_then_pull_every_form(bundles: dict[str, Path], prefix: str, tmp_path: Path) -> None:
    uri = registry.publish(bundles["v1"], prefix)
    assert uri == f"{prefix}/v1"
    objects = [u.removeprefix(prefix + "/") for u in storage.list_files(prefix)]
    assert "latest" in objects and "v1/bundle.json" in objects
    pointer = read_artifact(f"{prefix}/latest", "latest")
    assert pointer["version"] == "v1" and pointer["previous_version"] is None
    assert (
        pointer["bundle_sha256"] == hashlib.sha256((bundles["v1"] / "bundle.json").read_bytes()).hexdigest()
    )
    for i, form in enumerate((prefix, f"{prefix}/latest", f"{prefix}/v1", f"{prefix}/v1/")):
        dest = registry.pull(form, tmp_path / f"d{i}")
        assert same_files(dest, bundles["v1"]), form
        assert verify_bundle(dest)["version"] == "v1"
    registry.publish(bundles["v2"], prefix)
    assert read_artifact(f"{prefix}/latest", "latest")["previous_version"] == "v1"
    assert verify_bundle(registry.pull(prefix, tmp_path / "new"))["version"] == "v2"
    assert registry.list_versions(prefix) == ["v1", "v2"]


def test_upload_order_puts_bundle_json_last(
    bundles: dict[str, Path], prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    real = registry._upload_file

    def spy(local: Path, uri: str) -> bool:
        order.append(uri.rsplit("/", 1)[1])
        return real(local, uri)

    monkeypatch.setattr(registry, "_upload_file", spy)
    registry.publish(bundles["v1"], prefix)
    assert order[-1] == "bundle.json" and sorted(order[:-1]) == sorted(verify_bundle(bundles["v1"])["files"])


@pytest.mark.parametrize("fail_at", [1, 5, "bundle.json"])
def test_publish_failing_midway_leaves_no_pullable_version(
    bundles: dict[str, Path], prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at
) -> None:
    registry.publish(bundles["v1"], prefix)
    calls: list[str] = []
    real = registry._upload_file

    def flaky(local: Path, uri: str) -> bool:
        calls.append(uri)
        if len(calls) == fail_at or (fail_at == "bundle.json" and uri.endswith("/bundle.json")):
            raise StorageError(f"{uri}: GCS request failed: 503 injected fault")
        return real(local, uri)

    monkeypatch.setattr(registry, "_upload_file", flaky)
    # the clean-up can fail too (the network is down): the version must still be refused
    monkeypatch.setattr(storage, "delete", lambda uri: (_ for _ in ()).throw(StorageError("down")))
    with pytest.raises(StorageError, match=r"publish of v2 .* failed after .*'latest' was not moved"):
        registry.publish(bundles["v2"], prefix)
    monkeypatch.undo()

    assert not storage.exists(f"{prefix}/v2/bundle.json")
    with pytest.raises(
        ArtifactError, match=r"v2: (holds files but no bundle.json: an unfinished|no bundle here)"
    ):
        registry.pull(f"{prefix}/v2", tmp_path / "half")
    assert not (tmp_path / "half").exists()
    assert read_artifact(f"{prefix}/latest", "latest")["version"] == "v1"
    assert verify_bundle(registry.pull(prefix, tmp_path / "good"))["version"] == "v1"
    # a later, successful publish of the same version completes it
    registry.publish(bundles["v2"], prefix)
    assert verify_bundle(registry.pull(prefix, tmp_path / "again"))["version"] == "v2"


def test_failed_publish_cleans_up_what_it_uploaded(
    bundles: dict[str, Path], prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = registry._upload_file

    def flaky(local: Path, uri: str) -> bool:
        calls.append(uri)
        if len(calls) == 4:
            raise StorageError("injected")
        return real(local, uri)

    monkeypatch.setattr(registry, "_upload_file", flaky)
    with pytest.raises(StorageError):
        registry.publish(bundles["v1"], prefix)
    assert list(storage.list_files(prefix)) == []


def test_tampered_published_file_is_refused(bundles: dict[str, Path], prefix: str, tmp_path: Path) -> None:
    registry.publish(bundles["v1"], prefix)
    policy = read_artifact(bundles["v1"] / "thresholds.json", "thresholds")
    write_artifact(f"{prefix}/v1/thresholds.json", "thresholds", {**policy, "exit_threshold": 0.5})
    with pytest.raises(ArtifactError, match=r"v1/thresholds.json: sha256 mismatch .*refusing the bundle"):
        registry.pull(f"{prefix}/v1", tmp_path / "d")
    assert not (tmp_path / "d").exists()
    assert [p for p in tmp_path.iterdir()] == []  # no temporary folder left behind

    storage.write_bytes(f"{prefix}/v1/model_best.pth", b"not the weights")
    with pytest.raises(ArtifactError, match=r"model_best.pth: sha256 mismatch"):
        registry.pull(f"{prefix}/v1", tmp_path / "d")


def test_extra_or_missing_objects_are_refused(bundles: dict[str, Path], prefix: str, tmp_path: Path) -> None:
    registry.publish(bundles["v1"], prefix)
    storage.copy_file(bundles["v1"] / "thresholds.json", f"{prefix}/v1/gateparams.json")
    with pytest.raises(ArtifactError, match=r"holds gateparams.json, not listed in its bundle.json"):
        registry.pull(prefix, tmp_path / "d")
    storage.delete(f"{prefix}/v1/gateparams.json")
    storage.delete(f"{prefix}/v1/metrics.csv")
    with pytest.raises(ArtifactError, match=r"incomplete bundle, missing metrics.csv"):
        registry.pull(prefix, tmp_path / "d")


def test_replaced_bundle_json_is_refused_through_latest(
    bundles: dict[str, Path], prefix: str, tmp_path: Path
) -> None:
    registry.publish(bundles["v1"], prefix)
    meta = read_artifact(bundles["v1"] / "bundle.json", "bundle")
    write_artifact(f"{prefix}/v1/bundle.json", "bundle", {**meta, "created_at": "2030-01-01T00:00:00Z"})
    with pytest.raises(ArtifactError, match=r"does not match the sha256 recorded in the 'latest' pointer"):
        registry.pull(prefix, tmp_path / "d")


def test_published_versions_are_immutable(bundles: dict[str, Path], prefix: str) -> None:
    registry.publish(bundles["v1"], prefix)
    with pytest.raises(ArtifactError, match=r"version v1 is already published .*immutable"):
        registry.publish(bundles["v1"], prefix)


def test_unblessed_bundle_never_becomes_latest(bundles: dict[str, Path], prefix: str, tmp_path: Path) -> None:
    registry.publish(bundles["v1"], prefix)
    with pytest.raises(ArtifactError, match=r"bundle u1 is not blessed .*--allow-unblessed"):
        registry.publish(bundles["u1"], prefix)
    registry.publish(bundles["u1"], prefix, allow_unblessed=True)
    assert read_artifact(f"{prefix}/latest", "latest")["version"] == "v1"
    assert verify_bundle(registry.pull(f"{prefix}/u1", tmp_path / "u"))["blessed"] is False


def test_publish_refuses_a_broken_bundle(bundles: dict[str, Path], prefix: str, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(bundles["v1"], tmp_path / "broken"))
    (broken / "model_best.pth").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"model_best.pth: sha256 mismatch"):
        registry.publish(broken, prefix)
    assert list(storage.list_files(prefix)) == []


def test_pull_errors(bundles: dict[str, Path], prefix: str, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"no such pointer; nothing has been published"):
        registry.pull(f"{prefix}/latest", tmp_path / "d")
    with pytest.raises(ArtifactError, match=r"no bundle here"):
        registry.pull(prefix, tmp_path / "d")
    registry.publish(bundles["v1"], prefix)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ArtifactError, match=r"full: already exists and is not an empty folder"):
        registry.pull(prefix, tmp_path / "full")


def test_transient_errors_are_retried(
    bundles: dict[str, Path], prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """503s injected at the HTTP transport: google-api-core's retry (DEFAULT_RETRY) recovers."""
    import requests
    from google.auth.transport.requests import AuthorizedSession

    real = AuthorizedSession.request
    injected: dict[str, str] = {}  # kind of request -> URL of its first attempt, answered with 503

    def kind(method: str, url: str) -> str | None:
        if "/upload/" in url:
            return "upload"
        if "alt=media" in url:
            return "download"
        if method == "GET" and "prefix=" in url:
            return "list"
        return None

    def flaky(self, method, url, *args, **kwargs):
        k = kind(method, url)
        if k is not None and k not in injected:
            injected[k] = url
            response = requests.Response()
            response.status_code = 503
            response._content = b'{"error": {"code": 503, "message": "injected: backend unavailable"}}'
            response.headers["content-type"] = "application/json"
            response.url = url
            response.request = requests.Request(method, url).prepare()
            return response
        return real(self, method, url, *args, **kwargs)

    monkeypatch.setattr(AuthorizedSession, "request", flaky)
    registry.publish(bundles["v1"], prefix)
    dest = registry.pull(prefix, tmp_path / "d")
    monkeypatch.undo()
    assert set(injected) == {"upload", "download", "list"}
    assert same_files(dest, bundles["v1"])


def test_local_folder_registry(bundles: dict[str, Path], tmp_path: Path) -> None:
    """The same code publishes to a local folder (no GCS): handy for air-gapped hand-offs."""
    prefix = str(tmp_path / "registry")
    registry.publish(bundles["v1"], prefix)
    registry.publish(bundles["v2"], prefix)
    assert registry.list_versions(prefix) == ["v1", "v2"]
    assert same_files(registry.pull(prefix, tmp_path / "d"), bundles["v2"])
    assert same_files(registry.pull(f"{prefix}/v1", tmp_path / "e"), bundles["v1"])


def test_cli_publish_and_pull(
    bundles: dict[str, Path], prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["publish", str(bundles["v1"]), prefix]) == 0
    assert capsys.readouterr().out.strip() == f"{prefix}/v1"
    assert main(["pull", prefix, str(tmp_path / "d")]) == 0
    assert "bundle v1: policy softmax" in capsys.readouterr().out
    assert main(["publish", str(bundles["u1"]), prefix]) == 2
    assert "not blessed" in capsys.readouterr().err
    assert main(["pull", f"{prefix}/nope", str(tmp_path / "e")]) == 2
    assert "no bundle here" in capsys.readouterr().err
