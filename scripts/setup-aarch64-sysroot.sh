#!/usr/bin/env bash
# Build (once, idempotently) the emulated Raspberry Pi sysroot used by the tests (tests/aarch64.py):
# Debian bookworm arm64 + Python 3.11 + ai-edge-litert + numpy, run with qemu-aarch64-static.
# Needs root (apt-get install qemu-user-static debootstrap; debootstrap) and network access to the
# Debian mirror and PyPI. The sysroot goes to $EDGESEG_AARCH64_ROOT, default ~/.cache/edgeseg/aarch64.
#   scripts/setup-aarch64-sysroot.sh          # build / verify
#   scripts/setup-aarch64-sysroot.sh check    # smoke-test it on both pinned CPUs
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
exec "$PYTHON" tests/aarch64.py "${1:-setup}"
