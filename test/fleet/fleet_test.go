package fleet_test

import (
	"context"
	"net/http"
	"os"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/wasm-csi/wasm-csi/test/lib/fleet"
	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

const (
	nodes       = 20
	podsPerNode = 10
)

var driverBin string

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "wasm-csi-fleet-")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	// Twenty daemons: built without the race detector to keep the machine's
	// memory; the race detector runs over the same code in the other suites.
	if driverBin, err = harness.BuildDriver(dir, false); err != nil {
		panic(err)
	}
	return m.Run()
}

// setup starts an upstream registry holding one module, a pull-through
// cache of it (distribution's proxy mode, fetching through the upstream's
// counting proxy) and a fleet pointed at the cache via via.
func setup(t *testing.T, via fleet.Via) (up, cache *registrytest.Registry, f *fleet.Fleet, image string, blob digest.Digest) {
	t.Helper()
	harness.RequireRoot(t)
	up = registrytest.StartT(t, registrytest.Options{})
	mod := wasmgen.ProxyWasm(wasmgen.Options{Message: t.Name(), PadTo: 1 << 20})
	if _, err := registrytest.PushWasm(context.Background(), up.Host()+"/fleet/filter:1", mod, registrytest.LayoutCNCF); err != nil {
		t.Fatal(err)
	}
	if via != fleet.Direct {
		cache = registrytest.StartT(t, registrytest.Options{ProxyRemoteURL: "http://" + up.ProxyHost()})
	}
	f = fleet.Start(t, fleet.Options{Nodes: nodes, Bin: driverBin, Upstream: up, Cache: cache, Via: via})
	return up, cache, f, up.ProxyHost() + "/fleet/filter:1", digest.FromBytes(mod)
}

func served(t *testing.T, what string, rs []fleet.Result) {
	t.Helper()
	if errs := fleet.Errors(rs); len(errs) > 0 {
		t.Fatalf("%s: %d of %d publishes failed: %v", what, len(errs), len(rs), errs)
	}
}

// TestFleetOneDownloadThroughCache: one node publishes first, then the
// other 19 publish 10 pods each at once: the upstream sees exactly one
// download of the module's blob, whether the cache is a hosts.toml mirror
// or a registries.mirrors entry.
func TestFleetOneDownloadThroughCache(t *testing.T) {
	for _, via := range []fleet.Via{fleet.HostsTOML, fleet.ConfigMirrors} {
		t.Run(string(via), func(t *testing.T) {
			up, cache, f, image, blob := setup(t, via)
			ctx := context.Background()
			served(t, "first node", f.Publish(ctx, []int{0}, 1, image))
			rs := f.Publish(ctx, fleet.Nodes(1, nodes), podsPerNode, image)
			served(t, "19 nodes x 10 pods", rs)
			if n := up.BlobGets(blob); n != 1 {
				t.Errorf("upstream served the module's blob %d times, want 1", n)
			}
			if n := cache.BlobGets(blob); n != nodes {
				t.Errorf("the cache served the blob %d times, want %d (one per node)", n, nodes)
			}
			t.Logf("%s: upstream requests %d, bytes %d; publish p50 %v p99 %v",
				via, up.Counts().Requests, up.Counts().BytesSent, fleet.Percentile(rs, 50), fleet.Percentile(rs, 99))
		})
	}
}

// TestFleetWithoutCache: the same fleet straight at the upstream downloads
// the blob once per node (each node's concurrent publishes share one pull).
func TestFleetWithoutCache(t *testing.T) {
	up, _, f, image, blob := setup(t, fleet.Direct)
	ctx := context.Background()
	served(t, "first node", f.Publish(ctx, []int{0}, 1, image))
	served(t, "19 nodes x 10 pods", f.Publish(ctx, fleet.Nodes(1, nodes), podsPerNode, image))
	if n := up.BlobGets(blob); n != nodes {
		t.Errorf("upstream served the blob %d times, want %d (one per node)", n, nodes)
	}
}

// TestFleetAllAtOnce: all 20 nodes start at once on a cold cache. How many
// downloads the cache lets through is reported, not asserted beyond its
// bounds: distribution's proxy fetches a blob still in flight again for
// each request that misses.
func TestFleetAllAtOnce(t *testing.T) {
	up, _, f, image, blob := setup(t, fleet.HostsTOML)
	rs := f.Publish(context.Background(), fleet.Nodes(0, nodes), podsPerNode, image)
	served(t, "20 nodes x 10 pods at once", rs)
	n := up.BlobGets(blob)
	if n < 1 || n > nodes {
		t.Errorf("upstream served the blob %d times; between 1 and %d expected", n, nodes)
	}
	t.Logf("all %d nodes at once through a cold cache: the upstream served the blob %d times (requests %d, bytes %d)",
		nodes, n, up.Counts().Requests, up.Counts().BytesSent)
}

// TestFleetCacheDown: the cache drops every connection while a third of
// the fleet publishes: those nodes fall back to the upstream, and every pod
// is served; once it is back, the rest go through it again.
func TestFleetCacheDown(t *testing.T) {
	up, cache, f, image, blob := setup(t, fleet.HostsTOML)
	ctx := context.Background()
	served(t, "cache up", f.Publish(ctx, fleet.Nodes(0, 7), podsPerNode, image))
	if n := up.BlobGets(blob); n < 1 || n > 7 {
		t.Fatalf("cache up: upstream served the blob %d times", n)
	}
	before := up.BlobGets(blob)
	cache.SetFault(func(*http.Request) (int, bool) { return 0, true })
	served(t, "cache down", f.Publish(ctx, fleet.Nodes(7, 14), podsPerNode, image))
	if n := up.BlobGets(blob) - before; n != 7 {
		t.Errorf("cache down: upstream served the blob %d times, want 7 (each node falling back)", n)
	}
	cache.SetFault(nil)
	before = up.BlobGets(blob)
	served(t, "cache back", f.Publish(ctx, fleet.Nodes(14, nodes), podsPerNode, image))
	if n := up.BlobGets(blob) - before; n != 0 {
		t.Errorf("cache back: upstream served the blob %d more times, want 0", n)
	}
}
