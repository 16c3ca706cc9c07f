#!/usr/bin/env bash
# make demo: wasm-csi's main job end to end on this machine. Real mounts need
# root; a non-root user gets a user and mount namespace of its own (unshare),
# where the same bind mounts work and vanish with the namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
go build -o bin/demo ./test/tools/demo
if [ "$(id -u)" -eq 0 ]; then
  exec bin/demo "$@"
fi
if ! command -v unshare >/dev/null; then
  echo "make demo needs root, or unshare(1) from util-linux for a user namespace" >&2
  exit 1
fi
exec unshare --user --map-root-user --mount bin/demo "$@"
