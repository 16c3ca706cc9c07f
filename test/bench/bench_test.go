// Package bench measures wasm-csi with the real daemon binary (built without
// the race detector), a real registry and real mounts. Run with `make bench`;
// numbers go in the README, never into assertions.
//
// Needs: root (real mounts), distribution's registry (bin/registry, `make
// tools`), the cosign CLI for the verification benchmarks (bin/cosign); the
// fleet benchmark runs test/lib/fleet. Without root it skips (fails under CI).
package bench

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/signtest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

const bigModule = 64 << 20

func driver(b *testing.B) string {
	b.Helper()
	if p := os.Getenv("WASM_CSI_DRIVER_BIN"); p != "" {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	p, err := harness.BuildDriver(b.TempDir(), false)
	if err != nil {
		b.Fatal(err)
	}
	return p
}

func publish(ctx context.Context, b *testing.B, d *harness.Daemon, k *harness.Kubelet, image string) (*csipb.NodePublishVolumeRequest, time.Duration) {
	b.Helper()
	req, err := k.PublishRequest(harness.NewPod("bench"), "filter", map[string]string{"image": image})
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	if _, err := d.Node.NodePublishVolume(ctx, req); err != nil {
		b.Fatalf("publish: %v\n%s", err, d.Logs())
	}
	return req, time.Since(start)
}

func unpublish(ctx context.Context, b *testing.B, d *harness.Daemon, req *csipb.NodePublishVolumeRequest) {
	b.Helper()
	if _, err := d.Node.NodeUnpublishVolume(ctx, &csipb.NodeUnpublishVolumeRequest{VolumeId: req.VolumeId, TargetPath: req.TargetPath}); err != nil {
		b.Fatal(err)
	}
}

func median(ds []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// BenchmarkPublishCached: NodePublishVolume of a module already on the node
// (a new pod each time), as kubelet calls it over the unix socket.
func BenchmarkPublishCached(b *testing.B) {
	harness.RequireRoot(b)
	ctx := context.Background()
	reg := registrytest.StartT(b, registrytest.Options{})
	image := reg.Host() + "/bench/cached:1.0"
	if _, err := registrytest.PushWasm(ctx, image, wasmgen.ProxyWasm(wasmgen.Options{}), registrytest.LayoutCNCF); err != nil {
		b.Fatal(err)
	}
	d := harness.StartDaemon(b, driver(b), harness.DaemonOptions{Args: []string{"--insecure-registry=" + reg.Host(), "--log-level=warn"}})
	k := harness.NewKubelet(b)
	req, _ := publish(ctx, b, d, k, image) // warm the store
	unpublish(ctx, b, d, req)
	var ds []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		req, took := publish(ctx, b, d, k, image)
		b.StopTimer()
		ds = append(ds, took)
		unpublish(ctx, b, d, req)
		b.StartTimer()
	}
	b.ReportMetric(ms(median(ds)), "p50-ms")
}

// pushBig pushes a 64 MiB proxy-wasm module and returns its blob digest URL.
func pushBig(ctx context.Context, b *testing.B, reg *registrytest.Registry, image string) string {
	b.Helper()
	path := filepath.Join(b.TempDir(), "big.wasm")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := wasmgen.WriteProxyWasm(f, wasmgen.Options{PadTo: bigModule}); err != nil {
		b.Fatal(err)
	}
	f.Close()
	desc, err := registrytest.PushWasmFile(ctx, image, path, registrytest.LayoutCNCF)
	if err != nil {
		b.Fatal(err)
	}
	repo, err := registrytest.Repository(image)
	if err != nil {
		b.Fatal(err)
	}
	rc, err := repo.Manifests().Fetch(ctx, desc)
	if err != nil {
		b.Fatal(err)
	}
	defer rc.Close()
	body, _ := io.ReadAll(rc)
	// The one layer's digest, read from the manifest text.
	i := strings.Index(string(body), `"layers"`)
	j := strings.Index(string(body)[i:], `"digest":"`) + i + len(`"digest":"`)
	dgst := string(body)[j : j+len("sha256:")+64]
	name := strings.TrimPrefix(image[:strings.LastIndex(image, ":")], reg.Host()+"/")
	return "http://" + reg.Host() + "/v2/" + name + "/blobs/" + dgst
}

func plainGet(b *testing.B, url string) time.Duration {
	b.Helper()
	start := time.Now()
	resp, err := http.Get(url)
	if err != nil {
		b.Fatal(err)
	}
	n, err := io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if err != nil || n != bigModule {
		b.Fatalf("GET %s: %d bytes, %v", url, n, err)
	}
	return time.Since(start)
}

// BenchmarkColdPublish64MiB: a publish that downloads, verifies, syncs and
// mounts a 64 MiB module into an empty store, against a plain HTTP GET of
// the same blob from the same registry, alternating.
func BenchmarkColdPublish64MiB(b *testing.B) {
	harness.RequireRoot(b)
	ctx := context.Background()
	reg := registrytest.StartT(b, registrytest.Options{})
	image := reg.Host() + "/bench/big:1.0"
	url := pushBig(ctx, b, reg, image)
	bin := driver(b)
	k := harness.NewKubelet(b)
	var pubs, gets []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		root := filepath.Join(b.TempDir(), "store")
		d := harness.StartDaemon(b, bin, harness.DaemonOptions{Root: root, Args: []string{"--insecure-registry=" + reg.Host(), "--log-level=" + logLevel()}})
		gets = append(gets, plainGet(b, url))
		b.StartTimer()
		req, took := publish(ctx, b, d, k, image)
		b.StopTimer()
		pubs = append(pubs, took)
		if os.Getenv("BENCH_DEBUG") != "" {
			for _, l := range strings.Split(d.Logs(), "\n") {
				if strings.Contains(l, "module pulled") || strings.Contains(l, "volume published") {
					b.Logf("%s", l)
				}
			}
		}
		unpublish(ctx, b, d, req)
		d.Stop()
		os.RemoveAll(root)
		b.StartTimer()
	}
	p, g := median(pubs), median(gets)
	b.ReportMetric(ms(p), "publish-p50-ms")
	b.ReportMetric(ms(g), "http-get-p50-ms")
	b.ReportMetric(float64(p)/float64(g), "ratio")
}

// rssKiB reads a field (VmRSS, VmHWM) of /proc/<pid>/status in KiB.
func rssKiB(b *testing.B, pid int, field string) float64 {
	b.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, field+":") {
			f := strings.Fields(line)
			v, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				b.Fatal(err)
			}
			return v
		}
	}
	b.Fatalf("%s not in /proc/%d/status", field, pid)
	return 0
}

// cpuSeconds is the CPU time (user and system) process pid has used, from
// /proc/<pid>/stat (fields 14 and 15, in clock ticks of 1/100 s: Linux's
// USER_HZ on every architecture Kubernetes runs on).
func cpuSeconds(b *testing.B, pid int) float64 {
	b.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// The command name (field 2) may hold spaces: fields are counted
	// after its closing parenthesis.
	f := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
	if len(f) < 13 {
		b.Fatalf("/proc/%d/stat: %q", pid, data)
	}
	var ticks float64
	for _, s := range f[11:13] {
		v, err := strconv.ParseFloat(s, 64)
		if err != nil {
			b.Fatal(err)
		}
		ticks += v
	}
	return ticks / 100
}

// BenchmarkDaemonMemory: the daemon's resident memory idle, and its peak
// (VmHWM) growth over idle while it pulls a 64 MiB module.
func BenchmarkDaemonMemory(b *testing.B) {
	harness.RequireRoot(b)
	ctx := context.Background()
	reg := registrytest.StartT(b, registrytest.Options{})
	image := reg.Host() + "/bench/mem:1.0"
	pushBig(ctx, b, reg, image)
	bin := driver(b)
	k := harness.NewKubelet(b)
	var idle, growth []float64
	for i := 0; i < b.N; i++ {
		d := harness.StartDaemon(b, bin, harness.DaemonOptions{Args: []string{"--insecure-registry=" + reg.Host(), "--log-level=warn"}})
		time.Sleep(500 * time.Millisecond)
		base := rssKiB(b, d.Pid(), "VmRSS")
		req, _ := publish(ctx, b, d, k, image)
		peak := rssKiB(b, d.Pid(), "VmHWM")
		idle = append(idle, base/1024)
		growth = append(growth, (peak-base)/1024)
		unpublish(ctx, b, d, req)
		d.Stop()
	}
	sort.Float64s(idle)
	sort.Float64s(growth)
	b.ReportMetric(idle[len(idle)/2], "idle-rss-MiB")
	b.ReportMetric(growth[len(growth)-1], "max-pull-growth-MiB")
}

func logLevel() string {
	// BURST_PROFILE reads the metrics address from the "serving" line.
	if os.Getenv("BENCH_DEBUG") != "" || os.Getenv("BURST_PROFILE") != "" {
		return "info"
	}
	return "warn"
}

// BenchmarkColdPublishVerification: a cold publish of a small module (a
// new one each iteration, so each is a pull) with no verification policy,
// and with a cosign key policy and the module signed by the cosign CLI (its
// .sig tag). The difference of the two p50s is what verification adds:
// reading the .sig tag and the referrers, and checking the signature.
func BenchmarkColdPublishVerification(b *testing.B) {
	harness.RequireRoot(b)
	ctx := context.Background()
	reg := registrytest.StartT(b, registrytest.Options{})
	kp := signtest.GenerateKeyPair(b)
	cfgPath := filepath.Join(b.TempDir(), "config.yaml")
	var pem strings.Builder
	for _, l := range strings.Split(strings.TrimSpace(kp.PublicPEM), "\n") {
		pem.WriteString("          " + l + "\n")
	}
	policy := fmt.Sprintf("verification:\n  policies:\n  - name: bench\n    images: [%q]\n    cosign:\n      ignoreTlog: true\n      keys:\n      - pem: |\n%s",
		reg.Host()+"/bench/signed", pem.String())
	if err := os.WriteFile(cfgPath, []byte(policy), 0o644); err != nil {
		b.Fatal(err)
	}
	bin := driver(b)
	for _, tc := range []struct {
		name   string
		repo   string
		signed bool
	}{{"no-policy", "bench/plain", false}, {"cosign-key-policy", "bench/signed", true}} {
		b.Run(tc.name, func(b *testing.B) {
			d := harness.StartDaemon(b, bin, harness.DaemonOptions{Args: []string{"--insecure-registry=" + reg.Host(), "--log-level=" + logLevel(), "--config=" + cfgPath}})
			k := harness.NewKubelet(b)
			var ds []time.Duration
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				image := fmt.Sprintf("%s/%s:%d", reg.Host(), tc.repo, i)
				desc, err := registrytest.PushWasm(ctx, image, wasmgen.ProxyWasm(wasmgen.Options{Message: fmt.Sprintf("%s %d %d", tc.name, i, time.Now().UnixNano())}), registrytest.LayoutCNCF)
				if err != nil {
					b.Fatal(err)
				}
				if tc.signed {
					signtest.SignKey(b, kp, reg.Host()+"/"+tc.repo+"@"+desc.Digest.String(), false)
				}
				b.StartTimer()
				req, took := publish(ctx, b, d, k, image)
				b.StopTimer()
				ds = append(ds, took)
				unpublish(ctx, b, d, req)
				b.StartTimer()
			}
			b.ReportMetric(ms(median(ds)), "p50-ms")
		})
	}
}
