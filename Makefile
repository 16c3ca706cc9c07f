# wasm-csi build, test and demo targets. Everything a test needs is built or
# installed here, so a fresh machine needs only Go and Debian's packages.
SHELL := /bin/bash
GO ?= go
BIN := $(CURDIR)/bin
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REGISTRY_VERSION := v3.1.2
LDFLAGS := -X main.version=$(VERSION)
export WASM_CSI_REGISTRY_BIN := $(BIN)/registry
export WASM_CSI_DRIVER_BIN := $(BIN)/wasm-csi-driver

.PHONY: all build tools test unit integration sanity lint bench demo testdata clean

all: build

build: $(BIN)/wasm-csi-driver

$(BIN)/wasm-csi-driver: $(shell find cmd node csi puller -name '*.go' -not -name '*_test.go') go.mod go.sum
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $@ ./cmd/wasm-csi-driver

# A real OCI registry for the tests: distribution's, from the Go module proxy.
$(BIN)/registry:
	GOBIN=$(BIN) $(GO) install github.com/distribution/distribution/v3/cmd/registry@$(REGISTRY_VERSION)

tools: $(BIN)/registry

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi
	$(GO) vet ./...

# Unit, integration and csi-sanity tests, with the race detector. The
# integration and sanity suites make real mounts: run as root.
test: tools build lint
	$(GO) test -race -count=1 -timeout 20m ./...

bench: tools build
	$(GO) test -run '^$$' -bench . -benchmem -benchtime 50x -timeout 30m ./test/bench/

testdata:
	$(GO) run ./test/testdata/gen -o test/testdata/plugin.wasm

demo: tools build
	bash test/demo.sh

clean:
	rm -rf $(BIN)
