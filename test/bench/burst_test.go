package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

// kubeletDeadline is the deadline kubelet puts on a NodePublishVolume; it
// retries after it.
const kubeletDeadline = 2 * time.Minute

// kubelet's backoff between two attempts of one volume operation.
const (
	kubeletFirstBackoff = 500 * time.Millisecond
	kubeletMaxBackoff   = 2*time.Minute + 2*time.Second
)

// burst is a number of distinct modules of one size published at once.
type burst struct {
	n, size int
}

func (b burst) String() string {
	switch {
	case b.size >= 1<<20:
		return fmt.Sprintf("%dx%dMiB", b.n, b.size>>20)
	default:
		return fmt.Sprintf("%dx%dKiB", b.n, b.size>>10)
	}
}

// bursts are issue 11's: many pods on a node asking for distinct modules
// at once.
var bursts = []burst{{100, 1 << 20}, {20, 64 << 20}, {1000, 64 << 10}}

// BenchmarkBurst publishes N distinct modules at once into a fresh daemon,
// as kubelet would for N new pods (each call with kubelet's 2-minute
// deadline, retried when it runs out), and reports the daemon's peak
// resident memory over its idle value before the burst (VmHWM - VmRSS),
// the time until every publish was served, and the resident memory over
// the idle value a minute after the burst (BURST_SETTLE overrides the
// minute). One iteration per b.N: run it with -benchtime 1x.
func BenchmarkBurst(b *testing.B) {
	harness.RequireRoot(b)
	ctx := context.Background()
	reg := registrytest.StartT(b, registrytest.Options{})
	bin := driver(b)
	settle := time.Minute
	if s := os.Getenv("BURST_SETTLE"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			b.Fatal(err)
		}
		settle = d
	}
	list := bursts
	if s := os.Getenv("BURST_ONLY"); s != "" {
		var n, kib int
		if _, err := fmt.Sscanf(s, "%dx%dKiB", &n, &kib); err != nil {
			b.Fatalf("BURST_ONLY=%q: want NxKKiB", s)
		}
		list = []burst{{n, kib << 10}}
	}
	for bi, bu := range list {
		b.Run(bu.String(), func(b *testing.B) {
			images := pushDistinct(ctx, b, reg, fmt.Sprintf("bench/burst%d", bi), bu)
			var peak, took, cpu, after []float64
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				r := runBurst(ctx, b, bin, reg, images, settle)
				peak, took, cpu, after = append(peak, r.peak), append(took, r.took), append(cpu, r.cpu), append(after, r.after)
			}
			b.ReportMetric(maxOf(peak), "peak-growth-MiB")
			b.ReportMetric(maxOf(took), "total-s")
			b.ReportMetric(maxOf(cpu), "daemon-cpu-s")
			b.ReportMetric(maxOf(after), "growth-after-settle-MiB")
		})
	}
}

// pushDistinct pushes bu.n distinct proxy-wasm modules of bu.size bytes.
func pushDistinct(ctx context.Context, b *testing.B, reg *registrytest.Registry, repo string, bu burst) []string {
	b.Helper()
	dir := b.TempDir()
	images := make([]string, bu.n)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(4)
	for i := range images {
		images[i] = reg.Host() + "/" + repo + "/m" + strconv.Itoa(i) + ":1.0"
		g.Go(func() error {
			opts := wasmgen.Options{Message: fmt.Sprintf("burst %s module %d", repo, i), PadTo: bu.size}
			if bu.size < 4<<20 {
				_, err := registrytest.PushWasm(gctx, images[i], wasmgen.ProxyWasm(opts), registrytest.LayoutCNCF)
				return err
			}
			path := filepath.Join(dir, strconv.Itoa(i)+".wasm")
			f, err := os.Create(path)
			if err != nil {
				return err
			}
			if _, err := wasmgen.WriteProxyWasm(f, opts); err != nil {
				f.Close()
				return err
			}
			if err := f.Close(); err != nil {
				return err
			}
			_, err = registrytest.PushWasmFile(gctx, images[i], path, registrytest.LayoutCNCF)
			os.Remove(path)
			return err
		})
	}
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
	return images
}

// burstResult is one burst's figures.
type burstResult struct {
	peak  float64 // peak RSS growth over idle, MiB
	took  float64 // seconds until every publish was served
	cpu   float64 // CPU seconds the daemon used meanwhile
	after float64 // RSS growth over idle settle after the last was served, MiB
}

// runBurst starts a daemon, publishes every image at once and measures it.
func runBurst(ctx context.Context, b *testing.B, bin string, reg *registrytest.Registry, images []string, settle time.Duration) burstResult {
	b.Helper()
	b.StopTimer()
	root := filepath.Join(b.TempDir(), "store")
	d := harness.StartDaemon(b, bin, harness.DaemonOptions{Root: root, Args: []string{"--insecure-registry=" + reg.Host(), "--log-level=" + logLevel()}})
	k := harness.NewKubelet(b)
	defer harness.UnmountUnder(k.Root)
	time.Sleep(time.Second)
	base := rssKiB(b, d.Pid(), "VmRSS")
	// Anonymous memory (heap, stacks) and file pages (the binary's code
	// run for the first time, e.g. the module validator's) apart.
	baseAnon, baseFile := rssKiB(b, d.Pid(), "RssAnon"), rssKiB(b, d.Pid(), "RssFile")

	reqs := make([]*csipb.NodePublishVolumeRequest, len(images))
	for i, img := range images {
		r, err := k.PublishRequest(harness.NewPod(fmt.Sprintf("burst-%d", i)), "filter", map[string]string{"image": img})
		if err != nil {
			b.Fatal(err)
		}
		reqs[i] = r
	}
	var retries atomic.Int64
	var wg sync.WaitGroup
	errs := make([]error, len(reqs))
	stopProfile := profileBurst(b, d)
	b.StartTimer()
	start, cpu0 := time.Now(), cpuSeconds(b, d.Pid())
	for i, r := range reqs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = publishLikeKubelet(ctx, d, r, &retries)
		}()
	}
	wg.Wait()
	elapsed, cpu := time.Since(start), cpuSeconds(b, d.Pid())-cpu0
	b.StopTimer()
	stopProfile()
	hwm := rssKiB(b, d.Pid(), "VmHWM")
	for i, err := range errs {
		if err != nil {
			b.Fatalf("publish %d of %d (%s): %v\n%s", i, len(reqs), images[i], err, tail(d.Logs(), 4000))
		}
	}
	time.Sleep(settle)
	rest := rssKiB(b, d.Pid(), "VmRSS")
	profileAfter(b, d)
	b.Logf("%d publishes served in %v (daemon CPU %.1f s) with %d kubelet retries; idle RSS %.1f MiB (anon %.1f, file %.1f), peak %.1f MiB, %v later %.1f MiB (anon %.1f, file %.1f)",
		len(reqs), elapsed.Round(time.Millisecond), cpu, retries.Load(), base/1024, baseAnon/1024, baseFile/1024, hwm/1024, settle, rest/1024,
		rssKiB(b, d.Pid(), "RssAnon")/1024, rssKiB(b, d.Pid(), "RssFile")/1024)

	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(16)
	for _, r := range reqs {
		g.Go(func() error {
			_, err := d.Node.NodeUnpublishVolume(gctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: r.VolumeId, TargetPath: r.TargetPath})
			return err
		})
	}
	if err := g.Wait(); err != nil {
		b.Fatal(err)
	}
	d.Stop()
	os.RemoveAll(root)
	b.StartTimer()
	return burstResult{peak: (hwm - base) / 1024, took: elapsed.Seconds(), cpu: cpu, after: (rest - base) / 1024}
}

// publishLikeKubelet calls NodePublishVolume with kubelet's deadline and
// retries, as kubelet does, while the answer says the work is still going
// on (DeadlineExceeded, Aborted, Unavailable), after kubelet's backoff
// (500 ms, doubled after each failure up to 2m2s: kubelet's
// exponentialbackoff for volume operations). It gives up after 15 minutes.
// Each call is made on a connection of its own, closed after it, as
// kubelet's CSI client does (pkg/volume/csi/csi_client.go): N publishes in
// flight are N connections to the daemon, each with its server-side
// buffers and goroutines.
func publishLikeKubelet(ctx context.Context, d *harness.Daemon, r *csipb.NodePublishVolumeRequest, retries *atomic.Int64) error {
	giveUp := time.Now().Add(15 * time.Minute)
	backoff := kubeletFirstBackoff
	for {
		cctx, cancel := context.WithTimeout(ctx, kubeletDeadline)
		conn, err := grpc.NewClient("unix://"+d.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			cancel()
			return err
		}
		_, err = csipb.NewNodeClient(conn).NodePublishVolume(cctx, r)
		conn.Close()
		cancel()
		switch status.Code(err) {
		case codes.OK:
			return nil
		case codes.DeadlineExceeded, codes.Aborted, codes.Unavailable:
			if time.Now().After(giveUp) {
				return err
			}
			retries.Add(1)
			time.Sleep(backoff)
			backoff = min(2*backoff, kubeletMaxBackoff)
		default:
			return err
		}
	}
}

func maxOf(xs []float64) float64 {
	m := xs[0]
	for _, x := range xs[1:] {
		m = max(m, x)
	}
	return m
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[len(s)-n:]
}
