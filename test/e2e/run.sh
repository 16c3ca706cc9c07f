#!/usr/bin/env bash
# `make e2e`: bring the e2e cluster up (test/e2e/cluster.sh), run the suite
# against it, print the node's logs if anything failed, and always tear the
# cluster down, on success, failure or interrupt.
#
#   test/e2e/run.sh [go test flags...]     e.g. -run 'TestE2E/install'
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$here/../.." && pwd)
GO=${GO:-go}
cluster=$here/cluster.sh
t0=$SECONDS
phase=up

finish() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	if [ $rc -ne 0 ]; then
		echo "e2e: FAILED during $phase (exit $rc); the node's logs follow" >&2
		"$cluster" logs 150 >&2
	fi
	"$cluster" down >&2 || {
		echo "e2e: cluster down failed" >&2
		rc=1
	}
	echo "e2e: $([ $rc -eq 0 ] && echo PASS || echo FAIL) in $((SECONDS - t0))s (up ${up_secs:-?}s, suite ${suite_secs:-?}s)" >&2
	exit $rc
}
trap finish EXIT
trap 'exit 130' INT TERM

[ -x "$ROOT/bin/registry" ] || make -s -C "$ROOT" tools
"$cluster" up
up_secs=$((SECONDS - t0))
phase=suite
s=$SECONDS
cd "$ROOT"
rc=0
WASM_CSI_E2E=1 WASM_CSI_REGISTRY_BIN="$ROOT/bin/registry" "$GO" test -count=1 -v -timeout 20m ./test/e2e/ "$@" || rc=$?
suite_secs=$((SECONDS - s))
[ $rc -eq 0 ] || exit $rc
phase=down
