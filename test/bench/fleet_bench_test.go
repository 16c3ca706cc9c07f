package bench

import (
	"context"
	"os"
	"sync"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/wasm-csi/wasm-csi/test/lib/fleet"
	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

// fleetFigures are one fleet run's figures.
type fleetFigures struct {
	upstreamRequests, upstreamBytes, upstreamBlobGets int
	p50ms, p99ms                                      float64
}

var (
	fleetMu   sync.Mutex
	fleetRuns = map[string]fleetFigures{}
)

// BenchmarkFleet: 20 daemons on this machine ("nodes", each with its own
// root dir and socket), a 1 MiB module; one node publishes first, then the
// other 19 publish 10 pods each at once. Reported: what the upstream
// registry served (requests, bytes, downloads of the module's blob) and the
// p50/p99 of those 190 publishes, straight at the upstream (direct) and
// through a pull-through cache (distribution's proxy mode) named as a
// containerd hosts.toml mirror. A fleet is set up once per mode; every
// iteration reports that run's figures (b.N does not repeat it).
func BenchmarkFleet(b *testing.B) {
	for _, via := range []fleet.Via{fleet.Direct, fleet.HostsTOML} {
		b.Run(string(via), func(b *testing.B) {
			fig := runFleet(b, via)
			b.ReportMetric(float64(fig.upstreamRequests), "upstream-requests")
			b.ReportMetric(float64(fig.upstreamBytes), "upstream-bytes")
			b.ReportMetric(float64(fig.upstreamBlobGets), "upstream-blob-downloads")
			b.ReportMetric(fig.p50ms, "publish-p50-ms")
			b.ReportMetric(fig.p99ms, "publish-p99-ms")
			b.ReportMetric(0, "ns/op")
		})
	}
}

func runFleet(b *testing.B, via fleet.Via) fleetFigures {
	fleetMu.Lock()
	defer fleetMu.Unlock()
	if fig, ok := fleetRuns[string(via)]; ok {
		return fig
	}
	harness.RequireRoot(b)
	ctx := context.Background()
	up := registrytest.StartT(b, registrytest.Options{})
	mod := wasmgen.ProxyWasm(wasmgen.Options{Message: "fleet bench", PadTo: 1 << 20})
	if _, err := registrytest.PushWasm(ctx, up.Host()+"/bench/fleet:1", mod, registrytest.LayoutCNCF); err != nil {
		b.Fatal(err)
	}
	var cache *registrytest.Registry
	if via != fleet.Direct {
		cache = registrytest.StartT(b, registrytest.Options{ProxyRemoteURL: "http://" + up.ProxyHost()})
	}
	bin := driver(b)
	f := fleet.Start(b, fleet.Options{Nodes: 20, Bin: bin, Upstream: up, Cache: cache, Via: via, LogLevel: logLevel()})
	image := up.ProxyHost() + "/bench/fleet:1"
	if errs := fleet.Errors(f.Publish(ctx, []int{0}, 1, image)); len(errs) > 0 {
		b.Fatal(errs)
	}
	rs := f.Publish(ctx, fleet.Nodes(1, 20), 10, image)
	if errs := fleet.Errors(rs); len(errs) > 0 {
		b.Fatal(errs)
	}
	c := up.Counts()
	fig := fleetFigures{
		upstreamRequests: c.Requests,
		upstreamBytes:    int(c.BytesSent),
		upstreamBlobGets: c.BlobGets[digest.FromBytes(mod)],
		p50ms:            ms(fleet.Percentile(rs, 50)),
		p99ms:            ms(fleet.Percentile(rs, 99)),
	}
	if os.Getenv("BENCH_DEBUG") != "" {
		b.Logf("%s: %+v", via, fig)
	}
	fleetRuns[string(via)] = fig
	return fig
}
