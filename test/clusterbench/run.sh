#!/usr/bin/env bash
# `make bench-cluster`: bring the e2e cluster up (test/e2e/cluster.sh, with
# its caches), install the driver as the e2e suite does (kubectl apply -k
# test/e2e/overlay), run the cluster benchmark (test/clusterbench) and always
# tear the cluster down, putting back what it changed on the host, on
# success, failure or interrupt. Run as root. Arguments go to the benchmark:
#
#   test/clusterbench/run.sh [-n 1,10,30] [-sizes 1Mi,32Mi] [-reps 3] [-modes cold,warm] [-ways ...] [-out DIR]
#
# The cluster runs once at a time on a machine; on a shared one wrap it:
# flock /tmp/wasm-csi-e2e.lock make bench-cluster
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$here/../.." && pwd)
GO=${GO:-go}
BIN=${WASM_CSI_BIN_DIR:-$ROOT/bin}
cluster=$ROOT/test/e2e/cluster.sh
t0=$SECONDS
phase=build

[ "$(id -u)" -eq 0 ] || {
	echo "clusterbench: run as root (it starts kubelet and containerd, reads the node's disk and cgroups)" >&2
	exit 1
}
tool=$(mktemp -d /tmp/clusterbench-tool.XXXXXX)

finish() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	if [ $rc -ne 0 ] && [ "$phase" != build ]; then
		echo "clusterbench: FAILED during $phase (exit $rc); the node's logs follow" >&2
		"$cluster" logs 100 >&2
	fi
	if [ "$phase" != build ]; then
		"$cluster" down >&2 || {
			echo "clusterbench: cluster down failed" >&2
			rc=1
		}
	fi
	rm -rf "$tool"
	echo "clusterbench: $([ $rc -eq 0 ] && echo done || echo FAILED) in $((SECONDS - t0))s (up ${up_secs:-?}s, benchmark ${bench_secs:-?}s)" >&2
	exit $rc
}
trap finish EXIT
trap 'exit 130' INT TERM

cd "$ROOT"
[ -x "$BIN/registry" ] || make -s -C "$ROOT" tools
CGO_ENABLED=0 "$GO" build -o "$tool/clusterbench" ./test/clusterbench

phase=up
"$cluster" up
kubectl=("$BIN/kubectl" --kubeconfig "${WASM_CSI_E2E_STATE:-/var/lib/wasm-csi-e2e}/pki/admin.kubeconfig")
"${kubectl[@]}" apply -k test/e2e/overlay >&2
"${kubectl[@]}" -n wasm-csi rollout status daemonset/wasm-csi-node --timeout=180s >&2
up_secs=$((SECONDS - t0))

phase=benchmark
s=$SECONDS
state=${WASM_CSI_E2E_STATE:-/var/lib/wasm-csi-e2e}
"$tool/clusterbench" -bin "$BIN" -state "$state" -kubeconfig "$state/pki/admin.kubeconfig" "$@"
bench_secs=$((SECONDS - s))
phase=down
