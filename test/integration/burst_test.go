package integration

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

// plainDriverBin builds the daemon without the race detector, for the test
// that measures its memory: the race detector's shadow memory would be
// most of what it measured.
func plainDriverBin(t *testing.T) string {
	t.Helper()
	bin, err := harness.BuildDriver(t.TempDir(), false)
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// procKiB reads a field (VmRSS, VmHWM) of /proc/<pid>/status in KiB.
func procKiB(t *testing.T, pid int, field string) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && f[0] == field+":" {
			v, err := strconv.Atoi(f[1])
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
	}
	t.Fatalf("%s not in /proc/%d/status", field, pid)
	return 0
}

// publishPatiently publishes as kubelet does: each call with a deadline,
// again while the answer says the pull goes on.
func (e *env) publishPatiently(req *csipb.NodePublishVolumeRequest) error {
	for attempt := 0; ; attempt++ {
		err := e.publish(req)
		if c := status.Code(err); attempt < 5 && (c == codes.DeadlineExceeded || c == codes.Aborted) {
			continue
		}
		return err
	}
}

// TestBurst publishes 60 distinct 1 MiB modules at once, as 60 new pods on
// a node would, with the default pull slots: every publish is served with
// its own module, and the daemon's peak resident memory stays within 64 MiB
// of its idle value (issue 11's bound; before the pull slots, 100 such
// modules took it 282 MiB up).
func TestBurst(t *testing.T) {
	t.Parallel()
	harness.RequireRoot(t)
	const n, size, bound = 60, 1 << 20, 64 << 10 // bound in KiB
	var mods [][]byte
	for i := range n {
		mod := wasmgen.ProxyWasm(wasmgen.Options{Message: fmt.Sprintf("%s %d", t.Name(), i), PadTo: size})
		push(t, fmt.Sprintf("%s:%d", repoName(t, "m"), i), mod, registrytest.LayoutCNCF)
		mods = append(mods, mod)
	}
	k := newKubelet(t)
	d := harness.StartDaemon(t, plainDriverBin(t), harness.DaemonOptions{Args: []string{"--insecure-registry=" + reg.ProxyHost(), "--log-level=info"}})
	e := &env{t: t, d: d, k: k}
	time.Sleep(time.Second) // let the start-up settle
	base := procKiB(t, d.Pid(), "VmRSS")

	reqs := make([]*csipb.NodePublishVolumeRequest, n)
	for i := range reqs {
		reqs[i] = e.request(harness.NewPod(fmt.Sprint("burst-", i)), "wasm", map[string]string{"image": image(fmt.Sprintf("%s:%d", repoName(t, "m"), i))})
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, req := range reqs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = e.publishPatiently(req)
		}()
	}
	wg.Wait()
	peak := procKiB(t, d.Pid(), "VmHWM")
	for i, err := range errs {
		if err != nil {
			t.Fatalf("publish %d of the burst: %v", i, err)
		}
		checkFile(t, reqs[i], "plugin.wasm", mods[i])
	}
	t.Logf("idle %d KiB, peak %d KiB: +%d KiB for %d x %d KiB", base, peak, peak-base, n, size>>10)
	if peak-base > bound {
		t.Errorf("the daemon's peak resident memory grew by %d KiB during the burst, over the bound of %d KiB", peak-base, bound)
	}
	m := scrape(t, d)
	if got := metric(t, m, `wasmcsi_pulls_total{result="success"}`); got != n {
		t.Errorf("%v successful pulls, want %d", got, n)
	}
	if metric(t, m, "wasmcsi_pulls_in_flight") != 0 || metric(t, m, "wasmcsi_pulls_waiting") != 0 {
		t.Errorf("after the burst, pulls still in flight or waiting:\n%s", m)
	}
	for _, req := range reqs {
		e.mustUnpublish(req)
	}
}

// TestPullSlots holds every download at the registry with
// limits.maxConcurrentPulls at 2 and six distinct modules asked for at
// once: two downloads start and four wait, as the metrics say; a module
// already on the node is served meanwhile; a pod whose deadline ends while
// its pull waits gets DeadlineExceeded, and its retry joins the waiting
// pull instead of queueing again. Once the registry answers, every publish
// is served, each module downloaded once.
func TestPullSlots(t *testing.T) {
	// Not parallel: it installs an interceptor on the shared proxy.
	cfg := filepath.Join(t.TempDir(), "config.yaml")
	writeConfig(t, cfg, "limits:\n  maxConcurrentPulls: 2\n")
	e := newEnv(t, "--config="+cfg)
	repo := repoName(t, "m")
	cached := module(t, "cached")
	push(t, repo+":cached", cached, registrytest.LayoutCNCF)
	e.mustUnpublish(e.mustPublish(image(repo+":cached"), nil))

	const n = 6
	mods := make([][]byte, n)
	held := map[digest.Digest]int{}
	for i := range mods {
		mods[i] = module(t, strconv.Itoa(i))
		push(t, fmt.Sprintf("%s:%d", repo, i), mods[i], registrytest.LayoutCNCF)
		held[digest.FromBytes(mods[i])] = i
	}
	var mu sync.Mutex
	arrived := map[int]bool{}
	g := newGate(t)
	reg.SetInterceptor(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			for d, i := range held {
				if blobGetPath(r, d) {
					mu.Lock()
					arrived[i] = true
					mu.Unlock()
					g.signalArrival()
					select {
					case <-g.open:
					case <-r.Context().Done():
						return
					}
				}
			}
			next.ServeHTTP(w, r)
		})
	})
	t.Cleanup(func() { reg.SetInterceptor(nil) })

	reqs := make([]*csipb.NodePublishVolumeRequest, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range reqs {
		reqs[i] = e.request(harness.NewPod(fmt.Sprint("slots-", i)), "wasm", map[string]string{"image": image(fmt.Sprintf("%s:%d", repo, i))})
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = e.publishPatiently(reqs[i])
		}()
	}
	waitMetrics(t, e.d, "2 downloads in flight and 4 waiting", func(m string) bool {
		return metric(t, m, "wasmcsi_pulls_in_flight") == 2 && metric(t, m, "wasmcsi_pulls_waiting") == n-2
	})
	if s := metric(t, scrape(t, e.d), "wasmcsi_pull_slots"); s != 2 {
		t.Errorf("wasmcsi_pull_slots = %v, want 2 from limits.maxConcurrentPulls", s)
	}
	mu.Lock()
	started := len(arrived)
	waiting := -1
	for i := range n {
		if !arrived[i] {
			waiting = i
		}
	}
	mu.Unlock()
	if started != 2 {
		t.Errorf("%d downloads reached the registry with 2 pull slots", started)
	}
	if !strings.Contains(e.d.Logs(), "waiting for a pull slot") {
		t.Error("the daemon did not log that pulls wait for a slot")
	}

	// A module on the node is never queued behind downloads.
	c := e.mustPublish(image(repo+":cached"), nil)
	checkFile(t, c, "plugin.wasm", cached)

	// Another pod asks for a waiting module and gives up: its pull keeps
	// its place, and is not queued twice.
	late := e.request(harness.NewPod("late"), "wasm", map[string]string{"image": image(fmt.Sprintf("%s:%d", repo, waiting))})
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	_, err := e.d.Node.NodePublishVolume(ctx, late)
	cancel()
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("publish with a 1s deadline while its pull waits for a slot: %v, want DeadlineExceeded", err)
	}
	if w := metric(t, scrape(t, e.d), "wasmcsi_pulls_waiting"); w != n-2 {
		t.Errorf("%v pulls waiting after a second pod asked for a waiting module, want still %d", w, n-2)
	}

	g.release()
	wg.Wait()
	if err := e.publish(late); err != nil {
		t.Fatalf("the late pod's retry: %v", err)
	}
	checkFile(t, late, "plugin.wasm", mods[waiting])
	for i, err := range errs {
		if err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
		checkFile(t, reqs[i], "plugin.wasm", mods[i])
		if got := reg.BlobGets(digest.FromBytes(mods[i])); got != 1 {
			t.Errorf("module %d downloaded %d times, want 1", i, got)
		}
	}
	for _, r := range append(reqs, late, c) {
		e.mustUnpublish(r)
	}
}

// waitMetrics scrapes the daemon's metrics until cond holds.
func waitMetrics(t *testing.T, d *harness.Daemon, what string, cond func(string) bool) {
	t.Helper()
	deadline := time.Now().Add(callTimeout)
	for {
		m := scrape(t, d)
		if cond(m) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; metrics:\n%s", what, m)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
