"""Refusals that save a GPU node: a pod without its GPU stops at once, impossible GPU counts are
refused before submitting, new weights at the same URI are a new cache key."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from kfp import dsl

from stage1_pro import storage
from stage1_pro.cli import main
from stage1_pro.components.runtime import NODE_NAME_ENV, artifact_location, require_gpus
from stage1_pro.errors import DeviceError, StorageError
from stage1_pro.provenance import content_version

#: What the KFP backend's train pod has: KFP_POD_NAME (argocompiler commonEnvs), the node name
#: (the pipeline's downward-API variable) and, being a pod, the API server's address.
IN_A_POD = {
    "KFP_POD_NAME": "stage1-pro-x7k2p-system-container-impl-123",
    NODE_NAME_ENV: "gke-stage1-pro-gpu-3f2a-abcd",
    "KUBERNETES_SERVICE_HOST": "10.0.0.1",
}


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_a_pod_without_its_gpu_stops_naming_the_node_and_the_missing_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_cuda(monkeypatch)
    with pytest.raises(DeviceError) as stopped:
        require_gpus(1, IN_A_POD)
    assert str(stopped.value) == (
        "train asked for 1 GPU(s) but sees 0 on node gke-stage1-pro-gpu-3f2a-abcd (pod "
        "stage1-pro-x7k2p-system-container-impl-123): the container has no nvidia.com/gpu limit, so the "
        "device plugin gave it no GPU (a resource count the KFP driver could not resolve, e.g. a number "
        "where it needs a string, drops the limit without an error); not training on the CPU instead. "
        "Check the pod's limits with kubectl get pod stage1-pro-x7k2p-system-container-impl-123 -o "
        "jsonpath='{.spec.containers[*].resources.limits}'"
    )
    # a GPU assigned by the device plugin that CUDA cannot use: the other cause
    with pytest.raises(DeviceError, match=r"assigned GPU\(s\) GPU-1234, but CUDA cannot use them"):
        require_gpus(1, {**IN_A_POD, "NVIDIA_VISIBLE_DEVICES": "GPU-1234"})


def test_outside_a_kfp_task_the_same_code_runs_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """kfp.local runs train as a subprocess on this machine, maybe a CI pod: CPU on purpose."""
    _no_cuda(monkeypatch)
    assert require_gpus(1, {}) == 0
    assert require_gpus(1, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == 0  # a CI job in a pod
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert require_gpus(1, IN_A_POD) == 1


def test_the_train_component_stops_before_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The compiled train task's own code: the check is its first act (nothing is read or written)."""
    from stage1_pro.components.train import train

    _no_cuda(monkeypatch)
    for key, value in IN_A_POD.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("NVIDIA_VISIBLE_DEVICES", raising=False)

    def artifact(cls: type, name: str) -> Any:
        return cls(name=name, uri=str(tmp_path / name), metadata={})

    with pytest.raises(DeviceError, match=r"on node gke-stage1-pro-gpu-3f2a-abcd .*no nvidia.com/gpu limit"):
        train.python_func(
            config_json="{}",
            splits=artifact(dsl.Dataset, "splits"),
            prepared=artifact(dsl.Dataset, "prepared"),
            data_fingerprint="0" * 64,
            weights_version="",
            gpu_count=1,
            model=artifact(dsl.Model, "model"),
            scores=artifact(dsl.Dataset, "scores"),
            metrics=artifact(dsl.Metrics, "metrics"),
        )
    assert list(tmp_path.iterdir()) == []


def test_run_refuses_more_gpus_than_a_node_has_before_contacting_the_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Port 9 (discard) on 127.0.0.1: nothing is contacted when the check fails first."""
    code = main(
        [
            "run",
            "--host",
            "http://127.0.0.1:9",
            "-p",
            "data_uri=gs://b/data/manifest.csv",
            "-p",
            "gpu_count=2",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "gpu_count=2 cannot run on the shipped infrastructure" in err
    assert "use gpu_count=1, or add a node pool of a multi-GPU machine type" in err


def test_run_local_checks_the_same_before_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """run-local has no gpu_count flag (no GPU scheduling locally); its other checks run first."""
    assert main(["run-local", "--out", str(tmp_path / "out"), "--prepare-shards", "0"]) == 2
    assert "prepare_shards=0 is outside 1..64" in capsys.readouterr().err
    assert not (tmp_path / "out" / "pipeline.yaml").exists()


# ---- the weights' content is the cache key ------------------------------------------------------


def test_content_version_of_a_local_file_follows_its_bytes(tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"one")
    first = content_version(str(weights))
    assert first == f"{weights.resolve()}#sha256={hashlib.sha256(b'one').hexdigest()}"
    weights.write_bytes(b"two")
    assert content_version(str(weights)) != first
    with pytest.raises(StorageError, match=r"nothing.pth: file not found"):
        content_version(str(tmp_path / "nothing.pth"))


def test_content_version_of_a_gcs_object_changes_with_each_upload(gcs_emulator: Any) -> None:
    bucket = gcs_emulator.make_bucket()
    uri = f"{bucket}/weights/w.pth"
    storage.write_bytes(uri, b"one")
    first = content_version(uri)
    assert first.startswith(f"{uri}#generation=")
    storage.write_bytes(uri, b"two")
    assert content_version(uri) != first
    with pytest.raises(StorageError, match=r"no such object or bucket"):
        content_version(f"{bucket}/weights/missing.pth")


def test_check_config_hands_train_the_weights_version(tmp_path: Path) -> None:
    from stage1_pro.components.check_config import check_config
    from stage1_pro.run_parameters import defaults

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    params = {**defaults(), "data_uri": "gs://b/data/manifest.csv", "weights_uri": str(weights)}
    config = dsl.Artifact(name="config", uri=str(tmp_path / "config.json"), metadata={})
    config_json, _, _, gpus, cpus, _, weights_version = check_config.python_func(**params, config=config)
    assert weights_version == content_version(str(weights))
    assert (gpus, cpus) == ("1", "3")
    assert json.loads(config_json)["model_path"] == str(weights)
    with pytest.raises(StorageError, match=r"missing.pth: file not found"):
        check_config.python_func(**{**params, "weights_uri": str(tmp_path / "missing.pth")}, config=config)


def test_artifact_location_writes_gcs_outputs_in_place(tmp_path: Path) -> None:
    """A gs:// output goes straight to its URI; the launcher's local folder is left empty."""

    class Output:
        uri = "gs://bucket/root/stage1-pro/run/prepare/1/prepared"
        path = str(tmp_path / "gcs" / "bucket" / "root" / "prepared")

    assert artifact_location(Output()) == Output.uri
    assert Path(Output.path).is_dir() and not any(Path(Output.path).iterdir())
    Output.uri = Output.path = str(tmp_path / "local")
    assert artifact_location(Output()) == str(tmp_path / "local")
