#!/usr/bin/env bash
# Build the FlexCore node image without a container registry.
#   1. Base image: mmdebstrap a minimal Debian bookworm (python3, venv, iproute2, iptables,
#      haproxy) and `docker import` it - skipped when it exists, or when BASE_IMAGE names
#      a registry image (e.g. BASE_IMAGE=python:3.11-slim for users who can pull).
#   2. Wheels of flexcore and all its dependencies, built on the host.
#   3. docker build with those wheels; the image is tagged $FLEXCORE_IMAGE (default
#      flexcore:dev).
# Usage: docker/build-images.sh            (needs docker; mmdebstrap for the base image)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${FLEXCORE_IMAGE:-flexcore:dev}
BASE=${BASE_IMAGE:-flexcore-base:bookworm}
PYTHON=${PYTHON:-python3}

if [[ "$BASE" == flexcore-base:* ]] && ! docker image inspect "$BASE" >/dev/null 2>&1; then
    command -v mmdebstrap >/dev/null || { echo "build-images: mmdebstrap is needed to build $BASE (apt-get install mmdebstrap), or set BASE_IMAGE=python:3.11-slim" >&2; exit 1; }
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    echo "build-images: building base image $BASE with mmdebstrap" >&2
    mmdebstrap --quiet --variant=minbase \
        --include=python3,python3-venv,iproute2,procps,iptables,haproxy,ca-certificates \
        bookworm "$tmp/base.tar"
    docker import "$tmp/base.tar" "$BASE" >/dev/null
    rm -rf "$tmp"
    trap - EXIT
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
echo "build-images: building wheels" >&2
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$ctx/wheels" .
cp docker/Dockerfile "$ctx/Dockerfile"
echo "build-images: building $IMAGE from $BASE" >&2
docker build --quiet --build-arg BASE_IMAGE="$BASE" --tag "$IMAGE" "$ctx" >/dev/null
echo "$IMAGE"
