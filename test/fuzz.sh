#!/usr/bin/env bash
# Runs each fuzz target of the puller (its image matcher, and the credential
# provider's response decoder and matchImages) and of the module validator
# (node/wasmcheck's section reading) for a short, fixed time (FUZZTIME,
# default 15s each). A failure leaves its input under
# <package>/testdata/fuzz/<FuzzName>/: commit it with the fix, and plain
# `go test` of that package replays it from then on.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime="${FUZZTIME:-15s}"
for target in FuzzParseReference FuzzSelectModule FuzzExtractFromTar; do
	echo "== $target ($fuzztime)"
	go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" ./puller/
done
echo "== FuzzParseModule ($fuzztime)"
go test -run '^$' -fuzz '^FuzzParseModule$' -fuzztime "$fuzztime" ./node/wasmcheck/
echo "== FuzzMatch ($fuzztime)"
go test -run '^$' -fuzz '^FuzzMatch$' -fuzztime "$fuzztime" ./puller/imagematch/
for target in FuzzDecodeResponse FuzzMatchImage; do
	echo "== $target ($fuzztime)"
	go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" ./puller/credprovider/
done
