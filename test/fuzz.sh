#!/usr/bin/env bash
# Runs each fuzz target of the puller (its image matcher, and the credential
# provider's response decoder and matchImages) for a short, fixed time (FUZZTIME,
# default 15s each). A failure leaves its input under
# puller/testdata/fuzz/<FuzzName>/: commit it with the fix, and plain
# `go test ./puller/` replays it from then on.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime="${FUZZTIME:-15s}"
for target in FuzzParseReference FuzzSelectModule FuzzExtractFromTar; do
	echo "== $target ($fuzztime)"
	go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" ./puller/
done
echo "== FuzzMatch ($fuzztime)"
go test -run '^$' -fuzz '^FuzzMatch$' -fuzztime "$fuzztime" ./puller/imagematch/
for target in FuzzDecodeResponse FuzzMatchImage; do
	echo "== $target ($fuzztime)"
	go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" ./puller/credprovider/
done
