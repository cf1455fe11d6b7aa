#!/bin/sh
# Build a Python base image from Debian packages alone, for machines that cannot pull
# python:3.12-slim-bookworm from a registry (air-gapped build hosts, sandboxes):
#
#   sudo deploy/container/debian-base.sh [IMAGE]        # default IMAGE: localhost/portvakt-base:bookworm
#   podman build --build-arg PYTHON_IMAGE=localhost/portvakt-base:bookworm -t portvakt .
#
# Needs root, debootstrap and podman (apt-get install debootstrap podman) and a Debian mirror.
set -eu
IMAGE="${1:-localhost/portvakt-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ROOTFS="$(mktemp -d)"
trap 'rm -rf "$ROOTFS"' EXIT
debootstrap --variant=minbase --include=python3,python3-dev,python3-venv,python3-pip,ca-certificates bookworm "$ROOTFS" "$MIRROR"
# The Dockerfile calls `python`, as the python:* images provide it; python3-dev gives the headers
# that dependencies without a wheel (libinjection-python) compile against.
ln -sf python3 "$ROOTFS/usr/bin/python"
rm -rf "$ROOTFS/var/cache/apt/archives/"*.deb "$ROOTFS/var/lib/apt/lists/"*
tar -C "$ROOTFS" -c . | podman import --change 'CMD ["python3"]' - "$IMAGE"
echo "$IMAGE"
