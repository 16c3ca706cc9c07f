package kubeapi

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/kubeenv"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

// gatedWriter sends a blob body up to after bytes, then waits for gate to
// close before sending the rest: a download held part-way.
type gatedWriter struct {
	http.ResponseWriter
	r       *http.Request
	after   int
	sent    int
	gate    <-chan struct{}
	reached func()
}

func (g *gatedWriter) Write(p []byte) (int, error) {
	n := 0
	if g.sent < g.after {
		c := min(len(p), g.after-g.sent)
		m, err := g.ResponseWriter.Write(p[:c])
		n, g.sent = m, g.sent+m
		if err != nil {
			return n, err
		}
		p = p[c:]
		if g.sent < g.after {
			return n, nil
		}
		_ = http.NewResponseController(g.ResponseWriter).Flush()
		g.reached()
		select {
		case <-g.gate:
		case <-g.r.Context().Done():
			return n, g.r.Context().Err()
		}
	}
	m, err := g.ResponseWriter.Write(p)
	g.sent += m
	return n + m, err
}

// progressMessage is a Pulling event that reports progress: bytes so far
// and percent of the 8 MiB module.
var progressMessage = regexp.MustCompile(`^Pulling Wasm module "[^"]+": ([0-9.]+[KMG]?i?B) of 8MiB \(([0-9]+)%\)$`)

// testPullProgress: a pull of an 8 MiB module, held by the registry after
// 5 MiB, sends Pulling events with its progress to the pod (paced by the
// daemon's --pull-progress-* flags), and `inspect` run beside the daemon
// lists it in flight with the bytes written so far; once released, the
// module is served and inspect lists no pull.
func testPullProgress(t *testing.T, bin string, env *kubeenv.Env, ns string) {
	ctx := context.Background()
	reg := registrytest.StartT(t, registrytest.Options{})
	const size, heldAt = 8 << 20, 5 << 20
	module := registrytest.Module("progress", size)
	image := reg.ProxyHost() + "/progress/big:1.0"
	if _, err := registrytest.PushWasm(ctx, reg.Host()+"/progress/big:1.0", module, registrytest.LayoutCNCF); err != nil {
		t.Fatal(err)
	}
	gate := make(chan struct{})
	var release sync.Once
	t.Cleanup(func() { release.Do(func() { close(gate) }) })
	held := make(chan struct{}, 1)
	reg.SetInterceptor(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
				w = &gatedWriter{ResponseWriter: w, r: r, after: heldAt, gate: gate, reached: func() {
					select {
					case held <- struct{}{}:
					default:
					}
				}}
			}
			next.ServeHTTP(w, r)
		})
	})
	kc, err := env.KubeconfigForServiceAccount(ctx, driverNS, driverSA)
	if err != nil {
		t.Fatal(err)
	}
	d := harness.StartDaemon(t, bin, harness.DaemonOptions{Args: []string{
		"--insecure-registry=" + reg.ProxyHost(), "--kubeconfig=" + kc,
		"--pull-progress-size=4Mi", "--pull-progress-interval=1s",
	}})
	f := &fixture{env: env, reg: reg, daemon: d, kubelet: harness.NewKubelet(t), image: image, module: module}
	pod := f.pod(t, ns, "gw-progress", "default")

	published := make(chan error, 1)
	var req *csipb.NodePublishVolumeRequest
	go func() {
		var err error
		req, err = f.publish(t, pod)
		published <- err
	}()
	select {
	case <-held:
	case err := <-published:
		t.Fatalf("publish ended before the registry held the download: %v", err)
	case <-time.After(2 * time.Minute):
		t.Fatal("the download never reached the registry's hold")
	}

	// Progress events: bytes so far of 8MiB, the download at most 62% (it
	// is held at 5 of 8 MiB); wait for one past half.
	deadline := time.Now().Add(time.Minute)
	var progress []string
	for {
		progress = progress[:0]
		best := -1
		for _, e := range f.podEvents(t, pod) {
			if e.Reason != "Pulling" {
				continue
			}
			msg := strings.TrimPrefix(e.Message, "(combined from similar events): ")
			m := progressMessage.FindStringSubmatch(msg)
			if m == nil {
				continue
			}
			progress = append(progress, msg)
			pct, _ := strconv.Atoi(m[2])
			if pct > 100*heldAt/size {
				t.Fatalf("progress %q past the %d bytes the registry sent", msg, heldAt)
			}
			best = max(best, pct)
		}
		if best >= 50 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no progress event past 50%% of the held download; progress events: %q", progress)
		}
		time.Sleep(200 * time.Millisecond)
	}
	t.Logf("progress events: %q", progress)

	// inspect, beside the running daemon, lists the pull in flight.
	deadline = time.Now().Add(time.Minute)
	for {
		pulls := d.Inventory(t).Pulls
		if len(pulls) != 1 || pulls[0].Image != image || pulls[0].Total != size {
			t.Fatalf("inspect lists pulls %+v, want one of %s, %d bytes", pulls, image, size)
		}
		if pulls[0].Written > heldAt {
			t.Fatalf("inspect: %d bytes written, the registry sent %d", pulls[0].Written, heldAt)
		}
		if pulls[0].Written >= 1<<20 {
			t.Logf("inspect: %s, %d of %d bytes written", pulls[0].Image, pulls[0].Written, pulls[0].Total)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("inspect: %d bytes written of the %d sent", pulls[0].Written, heldAt)
		}
		time.Sleep(200 * time.Millisecond)
	}

	release.Do(func() { close(gate) })
	if err := <-published; err != nil {
		t.Fatalf("publish: %v", err)
	}
	f.mustServe(t, req)
	f.events(t, pod, "Pulled")
	if pulls := d.Inventory(t).Pulls; len(pulls) != 0 {
		t.Errorf("inspect lists pulls after the pull: %+v", pulls)
	}
	if left, err := os.ReadDir(filepath.Join(d.Root, "pulls")); err != nil || len(left) != 0 {
		t.Errorf("pulls/ after the pull: %v, %v", left, err)
	}
	if !strings.Contains(d.Logs(), `"msg":"pull progress"`) {
		t.Errorf("the daemon logged no pull progress")
	}
}
