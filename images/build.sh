#!/usr/bin/env bash
# Build the stage1-pro component images (CPU: REPO:VERSION, GPU: REPO:VERSION-gpu), push them
# when asked, and record the tag in components/image.py: the one place the pipeline reads it.
#
#   images/build.sh --repo us-docker.pkg.dev/PROJECT/stage1-pro/stage1-pro --push
#   images/build.sh --dry-run                 # print the docker commands, change nothing
#   images/build.sh --record-only --version 0.1.0-abc1234   # images built elsewhere (CI)
#
# The tag is recorded only after a successful push (or with --record-only): a tag that the
# cluster cannot pull must never reach a compiled pipeline. Commit components/image.py afterwards.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE_PY="${ROOT}/components/image.py"
GPU_SUFFIX="-gpu"

usage() {
  cat <<'EOF'
Usage: images/build.sh [options]

  --repo REPO       image repository, e.g. us-docker.pkg.dev/PROJECT/stage1-pro/stage1-pro
                    (default: IMAGE_REPOSITORY in components/image.py)
  --version TAG     image tag (default: <package version>-<git short sha>, "-dirty" appended
                    when tracked files other than components/image.py have uncommitted changes)
  --platform P      target platform (default: linux/amd64, what GKE GPU nodes run)
  --push            push both images, then record REPO and TAG in components/image.py
  --only cpu|gpu    build one image only (records nothing: run --record-only once both exist)
  --record-only     only record REPO and TAG in components/image.py (images built elsewhere)
  --dry-run         print what would run and be recorded; run and change nothing
  -h, --help        this help
EOF
}

die() {
  echo "build.sh: $*" >&2
  exit 2
}

current_value() {  # current_value NAME -> the string assigned to NAME in components/image.py
  sed -n "s/^$1 = \"\\(.*\\)\"\$/\\1/p" "${IMAGE_PY}"
}

REPO=""
VERSION=""
PLATFORM="linux/amd64"
PUSH=0
ONLY=""
RECORD_ONLY=0
DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --repo) [[ $# -ge 2 ]] || die "--repo needs a value"; REPO="$2"; shift 2 ;;
    --version) [[ $# -ge 2 ]] || die "--version needs a value"; VERSION="$2"; shift 2 ;;
    --platform) [[ $# -ge 2 ]] || die "--platform needs a value"; PLATFORM="$2"; shift 2 ;;
    --only) [[ $# -ge 2 ]] || die "--only needs cpu or gpu"; ONLY="$2"; shift 2 ;;
    --push) PUSH=1; shift ;;
    --record-only) RECORD_ONLY=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done

[[ -f "${IMAGE_PY}" ]] || die "${IMAGE_PY} not found: run this script from a stage1-pro checkout"
[[ -z "${ONLY}" || "${ONLY}" == cpu || "${ONLY}" == gpu ]] || die "--only takes cpu or gpu, not '${ONLY}'"

if [[ -z "${REPO}" ]]; then
  REPO="$(current_value IMAGE_REPOSITORY)"
  [[ -n "${REPO}" ]] || die "no --repo given and no IMAGE_REPOSITORY line in ${IMAGE_PY}"
fi
# A repository: lowercase registry host[:port] and path components (docker reference grammar).
REPO_RE='^[a-z0-9]+([.-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)+$'
[[ "${REPO}" =~ ${REPO_RE} ]] \
  || die "--repo '${REPO}' is not an image repository (lowercase HOST/PATH, no tag), e.g. us-docker.pkg.dev/PROJECT/stage1-pro/stage1-pro"

REVISION="unknown"
if git -C "${ROOT}" rev-parse --git-dir > /dev/null 2>&1; then
  REVISION="$(git -C "${ROOT}" rev-parse HEAD)"
fi
if [[ -z "${VERSION}" ]]; then
  PKG_VERSION="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "${ROOT}/stage1_pro/__init__.py")"
  [[ -n "${PKG_VERSION}" ]] || die "no __version__ in ${ROOT}/stage1_pro/__init__.py"
  [[ "${REVISION}" != unknown ]] || die "not a git checkout: pass --version TAG explicitly"
  VERSION="${PKG_VERSION}-$(git -C "${ROOT}" rev-parse --short HEAD)"
  # components/image.py is what this script rewrites; its tag does not change the image's code.
  if [[ -n "$(git -C "${ROOT}" status --porcelain --untracked-files=no -- . ':!components/image.py')" ]]; then
    VERSION="${VERSION}-dirty"
  fi
fi
# Docker tag grammar; "latest" (and any -gpu twin of it) is refused: tags must name one build.
[[ "${VERSION}" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,123}$ ]] \
  || die "--version '${VERSION}' is not a valid image tag ([A-Za-z0-9_][A-Za-z0-9_.-]*, at most 124 characters)"
[[ "${VERSION}" != latest ]] || die "--version latest is refused: use an immutable tag such as 0.1.0-abc1234"

CPU_REF="${REPO}:${VERSION}"
GPU_REF="${REPO}:${VERSION}${GPU_SUFFIX}"
SOURCE=""
if [[ "${REVISION}" != unknown ]]; then
  SOURCE="$(git -C "${ROOT}" remote get-url origin 2> /dev/null || true)"
fi

run() {  # print the command (shell-quoted); run it unless --dry-run
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "${DRY_RUN}" -eq 0 ]]; then
    "$@"
  fi
}

build() {  # build VARIANT REF
  local variant="$1" ref="$2" output="--load"
  if [[ "${PUSH}" -eq 1 ]]; then
    output="--push"
  fi
  run docker buildx build \
    --file "${ROOT}/images/Dockerfile.${variant}" \
    --platform "${PLATFORM}" \
    --build-arg "VERSION=${VERSION}" \
    --build-arg "REVISION=${REVISION}" \
    --build-arg "SOURCE=${SOURCE}" \
    --tag "${ref}" \
    "${output}" \
    "${ROOT}"
}

record() {  # rewrite IMAGE_REPOSITORY / IMAGE_TAG in components/image.py (atomically)
  local n_repo n_tag tmp
  n_repo="$(grep -c '^IMAGE_REPOSITORY = "' "${IMAGE_PY}" || true)"
  n_tag="$(grep -c '^IMAGE_TAG = "' "${IMAGE_PY}" || true)"
  [[ "${n_repo}" == 1 && "${n_tag}" == 1 ]] \
    || die "${IMAGE_PY} must have exactly one 'IMAGE_REPOSITORY = \"...\"' and one 'IMAGE_TAG = \"...\"' line (found ${n_repo} and ${n_tag})"
  echo "record: IMAGE_REPOSITORY=${REPO} IMAGE_TAG=${VERSION} in ${IMAGE_PY}"
  if [[ "${DRY_RUN}" -eq 1 ]]; then
    return
  fi
  tmp="$(mktemp "${IMAGE_PY}.XXXXXX")"
  # REPO and VERSION passed the grammars above: no '|', '"', '\' or '&' can reach sed.
  sed -e "s|^IMAGE_REPOSITORY = \".*\"\$|IMAGE_REPOSITORY = \"${REPO}\"|" \
    -e "s|^IMAGE_TAG = \".*\"\$|IMAGE_TAG = \"${VERSION}\"|" "${IMAGE_PY}" > "${tmp}"
  chmod --reference="${IMAGE_PY}" "${tmp}"
  mv "${tmp}" "${IMAGE_PY}"
}

if [[ "${RECORD_ONLY}" -eq 0 ]]; then
  [[ "${DRY_RUN}" -eq 1 ]] || command -v docker > /dev/null || die "docker not found (use --dry-run to see the commands)"
  [[ "${ONLY}" == gpu ]] || build cpu "${CPU_REF}"
  [[ "${ONLY}" == cpu ]] || build gpu "${GPU_REF}"
  echo "images: ${CPU_REF} ${GPU_REF}"
fi
if [[ "${RECORD_ONLY}" -eq 1 || ("${PUSH}" -eq 1 && -z "${ONLY}") ]]; then
  record
else
  echo "not recorded in components/image.py (only a pushed pair of images is); use --push, or --record-only once both are pushed"
fi
