# wasm-csi build, test and demo targets. Everything a test needs is built or
# installed here, so a fresh machine needs only Go and Debian's packages.
SHELL := /bin/bash
GO ?= go
BIN := $(CURDIR)/bin
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REGISTRY_VERSION := v3.1.2
HELM_VERSION := v3.22.0
COSIGN_VERSION := v2.6.5
LDFLAGS := -X main.version=$(VERSION)
export WASM_CSI_REGISTRY_BIN := $(BIN)/registry
export WASM_CSI_COSIGN_BIN := $(BIN)/cosign
export WASM_CSI_DRIVER_BIN := $(BIN)/wasm-csi-driver
export WASM_CSI_KUBE_BIN_DIR := $(BIN)

IMAGE ?= ghcr.io/wasm-csi/wasm-csi-driver:$(VERSION)

.PHONY: all build tools kube-tools test e2e fuzz lint bench bench-cluster demo testdata image clean

all: build

build: $(BIN)/wasm-csi-driver

$(BIN)/wasm-csi-driver: $(shell find cmd node csi puller -name '*.go' -not -name '*_test.go') go.mod go.sum
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $@ ./cmd/wasm-csi-driver

# A real OCI registry for the tests: distribution's, from the Go module proxy.
$(BIN)/registry:
	GOBIN=$(BIN) $(GO) install github.com/distribution/distribution/v3/cmd/registry@$(REGISTRY_VERSION)

# The real cosign CLI, to sign test images as publishers do (the .sig tag
# and --new-bundle-format bundle referrers).
$(BIN)/cosign:
	GOBIN=$(BIN) $(GO) install github.com/sigstore/cosign/v2/cmd/cosign@$(COSIGN_VERSION)

# A real kube-apiserver and kubectl (built from k8s.io/kubernetes on the Go
# module proxy through test/kube/tools) and Debian's etcd, for the tests of
# credentials, RBAC and events. Cached: rebuilt only when the wrapper changes.
kube-tools:
	test/kube/build.sh $(BIN) kube-apiserver kubectl

# The helm CLI, from the Go module proxy: test/manifests renders and lints
# the chart with it (and builds it through this target when it is missing).
$(BIN)/helm:
	GOBIN=$(BIN) $(GO) install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)

tools: $(BIN)/registry $(BIN)/helm $(BIN)/cosign kube-tools

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi
	$(GO) vet ./...
	cd test/monitoring && $(GO) vet ./...

# Unit, integration and csi-sanity tests, with the race detector. The
# integration and sanity suites make real mounts: run as root.
test: tools build lint
	$(GO) test -race -count=1 -timeout 20m ./...
	cd test/monitoring && $(GO) test -race -count=1 -timeout 5m ./...

# Each fuzz target (test/fuzz.sh: reference parsing, manifest/format
# detection, tar extraction, image patterns, credential provider responses,
# the module validator's section reading) for a fixed number of executions; the seed
# corpora (puller/testdata/fuzz, the f.Add seeds) run in plain `go test` too.
# End to end on a real one-node cluster on 127.0.0.1 (kubelet, containerd,
# kube-apiserver, controller-manager, scheduler: test/e2e/cluster.sh), the
# driver installed with `kubectl apply -k test/e2e/overlay`, gateway pods
# loading their modules. As root. Always tears the cluster down and puts
# back what it changed on the host; prints the node's logs on failure.
e2e: tools build
	test/e2e/run.sh

FUZZSCALE ?= 1
fuzz:
	FUZZSCALE=$(FUZZSCALE) FUZZTIME=$(FUZZTIME) bash test/fuzz.sh

# Latency and memory of single publishes (50 iterations each), the pull
# path's mechanisms against the plain path, a cold publish with signature
# verification against one without, then the bursts of many distinct
# modules at once and the fleet of 20 daemons with and without a
# pull-through cache (one iteration each: a burst takes minutes).
bench: tools build
	$(GO) test -run '^$$' -bench '^Benchmark(PublishCached|ColdPublish64MiB|DaemonMemory|BlobWrite64MiB|ReadAhead64MiB)$$' -benchmem -benchtime 50x -timeout 60m ./test/bench/
	$(GO) test -run '^$$' -bench '^BenchmarkColdPublishVerification$$' -benchmem -benchtime 20x -timeout 30m ./test/bench/
	$(GO) test -run '^$$' -bench '^Benchmark(Burst|Fleet)$$' -benchtime 1x -timeout 60m -v ./test/bench/

# The cluster benchmark (root; not part of CI's required run): the e2e
# cluster brought up, gateway pods given the same module by each way
# (baseline, init container, image volume, wasm-csi), pod start, registry
# traffic, node disk and CPU measured, a table printed, CSV and a PNG chart
# written to bin/clusterbench; always torn down as make e2e is. A smoke run:
# make bench-cluster CLUSTERBENCH_FLAGS='-n 1 -reps 1 -sizes 1Mi'. On a shared
# machine: flock /tmp/wasm-csi-e2e.lock make bench-cluster
CLUSTERBENCH_FLAGS ?=
bench-cluster: tools build
	test/clusterbench/run.sh $(CLUSTERBENCH_FLAGS)

testdata:
	$(GO) run ./test/testdata/gen -o test/testdata/plugin.wasm

# The driver's container image as an OCI image-layout tarball (no Docker
# engine needed): `ctr -n k8s.io images import bin/wasm-csi-driver-image.tar`.
# With Docker: docker build -f cmd/wasm-csi-driver/Dockerfile .
image: build
	$(GO) run ./cmd/mkimage -o $(BIN)/wasm-csi-driver-image.tar -name $(IMAGE) \
		-entrypoint /wasm-csi-driver $(BIN)/wasm-csi-driver=/wasm-csi-driver

demo: tools build
	bash test/demo.sh

clean:
	rm -rf $(BIN)
