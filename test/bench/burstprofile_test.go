package bench

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
)

// profileBurst samples a daemon built with -tags pprof during a burst when
// BURST_PROFILE names a directory: every second it reads VmRSS and the
// goroutine count, and keeps the heap profile taken at the highest VmRSS
// (heap-peak.pb.gz) and the goroutine dump there (goroutines-peak.txt), and
// the dump with the most goroutines (goroutines-most.txt). The
// returned stop ends the sampling and saves the allocations profile of the
// whole burst (allocs.pb.gz).
func profileBurst(b *testing.B, d *harness.Daemon) (stop func()) {
	dir := os.Getenv("BURST_PROFILE")
	if dir == "" {
		return func() {}
	}
	base, err := d.MetricsURL()
	if err != nil {
		b.Fatal(err)
	}
	get := func(path string) []byte { return pprofGet(b, base, path) }
	b.Logf("before the burst: VmRSS %.1f MiB, %s", rssKiB(b, d.Pid(), "VmRSS")/1024, memStats(get("/debug/pprof/heap?debug=1")))
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var top float64
		most := 0
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
			}
			rss := rssKiB(b, d.Pid(), "VmRSS")
			g := get("/debug/pprof/goroutine?debug=1")
			n := strings.SplitN(string(g), "\n", 2)[0]
			var count int
			if _, err := fmt.Sscanf(n, "goroutine profile: total %d", &count); err == nil && count > most {
				most = count
				os.WriteFile(filepath.Join(dir, "goroutines-most.txt"), g, 0o644)
			}
			b.Logf("profile: VmRSS %.1f MiB, %s, %s", rss/1024, n, memStats(get("/debug/pprof/heap?debug=1")))
			if rss > top {
				top = rss
				os.WriteFile(filepath.Join(dir, "heap-peak.pb.gz"), get("/debug/pprof/heap"), 0o644)
				os.WriteFile(filepath.Join(dir, "goroutines-peak.txt"), g, 0o644)
				os.WriteFile(filepath.Join(dir, "peak.txt"), []byte(fmt.Sprintf("VmRSS %.1f MiB\n", rss/1024)), 0o644)
			}
		}
	}()
	return func() {
		close(done)
		wg.Wait()
		os.WriteFile(filepath.Join(dir, "allocs.pb.gz"), get("/debug/pprof/allocs"), 0o644)
	}
}

// pprofGet fetches path from the daemon's metrics server at base; nil
// (logged) when it fails or is not served (a daemon built without -tags
// pprof).
func pprofGet(b *testing.B, base, path string) []byte {
	resp, err := http.Get(base + path)
	if err != nil {
		b.Logf("profile %s: %v", path, err)
		return nil
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		b.Logf("profile %s: %s (built without -tags pprof?)", path, resp.Status)
		return nil
	}
	return data
}

// memStats picks the runtime's figures that add up to resident memory from
// a debug=1 heap profile, in MiB.
func memStats(p []byte) string {
	var out []string
	for _, line := range strings.Split(string(p), "\n") {
		for _, k := range []string{"HeapInuse", "HeapIdle", "HeapReleased", "Stack", "MSpan", "GCSys", "OtherSys", "NextGC", "Sys"} {
			var v float64
			if _, err := fmt.Sscanf(line, "# "+k+" = %g", &v); err == nil {
				out = append(out, fmt.Sprintf("%s %.1f", k, v/(1<<20)))
			}
		}
	}
	return strings.Join(out, " ")
}

// profileAfter saves the heap profile of a daemon built with -tags pprof
// (heap-after.pb.gz) when BURST_PROFILE names a directory: what the burst
// left once it settled.
func profileAfter(b *testing.B, d *harness.Daemon) {
	dir := os.Getenv("BURST_PROFILE")
	if dir == "" {
		return
	}
	base, err := d.MetricsURL()
	if err != nil {
		b.Fatal(err)
	}
	heap := pprofGet(b, base, "/debug/pprof/heap?gc=1")
	if heap == nil {
		return
	}
	os.WriteFile(filepath.Join(dir, "heap-after.pb.gz"), heap, 0o644)
	if stats := pprofGet(b, base, "/debug/pprof/heap?debug=1"); stats != nil {
		b.Logf("after settling: %s", memStats(stats))
	}
}
