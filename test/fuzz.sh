#!/usr/bin/env bash
# Runs each fuzz target of the puller (reference parsing, manifest/format
# detection, tar extraction), of the image matcher, of the credential
# provider (its response decoder and matchImages) and of the module
# validator (node/wasmcheck's section reading) for a fixed number of
# executions: about 10 s each on a 2-core machine, times FUZZSCALE
# (default 1). A count, not a duration: Go 1.26's fuzzing coordinator can
# fail a duration-bounded run with a bare "context deadline exceeded" when
# a starved worker misses the deadline (go.dev/issue/75804, fixed in Go
# 1.27), with no input to blame; a count has no deadline to race.
# FUZZTIME=<duration> still runs each target for that long instead.
# A failure leaves its input under <package>/testdata/fuzz/<FuzzName>/:
# commit it with the fix, and plain `go test` of that package replays it
# from then on.
set -euo pipefail
cd "$(dirname "$0")/.."
scale="${FUZZSCALE:-1}"

fuzz() { # target package executions
	local budget
	if [[ -n "${FUZZTIME:-}" ]]; then
		budget="$FUZZTIME"
	else
		budget="$(($3 * scale))x"
	fi
	echo "== $1 ($budget)"
	go test -run '^$' -fuzz "^$1\$" -fuzztime "$budget" "$2"
}

fuzz FuzzParseReference ./puller/ 30000
fuzz FuzzSelectModule ./puller/ 50000
fuzz FuzzExtractFromTar ./puller/ 20000
fuzz FuzzParseModule ./node/wasmcheck/ 300000
fuzz FuzzMatch ./puller/imagematch/ 10000
fuzz FuzzDecodeResponse ./puller/credprovider/ 50000
fuzz FuzzMatchImage ./puller/credprovider/ 50000
