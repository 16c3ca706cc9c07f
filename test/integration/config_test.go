package integration

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/opencontainers/go-digest"

	"github.com/wasm-csi/wasm-csi/test/harness"
	"github.com/wasm-csi/wasm-csi/test/registrytest"
	"github.com/wasm-csi/wasm-csi/test/wasmgen"
)

// writeConfig replaces the config file atomically, as an editor or kubelet
// would, so the daemon sees one complete file.
func writeConfig(t *testing.T, path, body string) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// eventually polls cond until it holds or 20s pass.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func countLog(d *harness.Daemon, s string) int { return strings.Count(d.Logs(), s) }

// TestConfigLive: mirrors with fallback, the pre-pull list on start and on
// change, a size limit changed live, and a bad file keeping the last good
// config. The daemon is never restarted.
func TestConfigLive(t *testing.T) {
	t.Parallel()
	harness.RequireRoot(t)
	ctx := context.Background()
	origin := registrytest.StartT(t, registrytest.Options{})
	mirror := registrytest.StartT(t, registrytest.Options{})
	modA, modB, modC := module(t, "a"), module(t, "b"), module(t, "c")
	// A is on the origin and the mirror; B and C on the origin only.
	for _, r := range []*registrytest.Registry{origin, mirror} {
		if _, err := registrytest.PushWasm(ctx, r.Host()+"/live/a:1", modA, registrytest.LayoutCNCF); err != nil {
			t.Fatal(err)
		}
	}
	for tag, m := range map[string][]byte{"live/b:1": modB, "live/c:1": modC} {
		if _, err := registrytest.PushWasm(ctx, origin.Host()+"/"+tag, m, registrytest.LayoutCNCF); err != nil {
			t.Fatal(err)
		}
	}
	imgA, imgB, imgC := origin.ProxyHost()+"/live/a:1", origin.ProxyHost()+"/live/b:1", origin.ProxyHost()+"/live/c:1"
	cfgPath := filepath.Join(t.TempDir(), "config.yaml")
	base := fmt.Sprintf("registries:\n  insecure: [%q, %q]\n  mirrors:\n    %q: [%q]\n", origin.ProxyHost(), mirror.ProxyHost(), origin.ProxyHost(), mirror.ProxyHost())
	writeConfig(t, cfgPath, base+fmt.Sprintf("prePull:\n- image: %s\n", imgA))
	e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--config=" + cfgPath}})

	// Pre-pulled at start, from the mirror: on the node before any pod asks.
	eventually(t, "the pre-pull of A", func() bool { return mirror.BlobGets(digest.FromBytes(modA)) == 1 })
	if n := origin.BlobGets(digest.FromBytes(modA)); n != 0 {
		t.Errorf("origin served A %d times; the mirror should have", n)
	}
	req := e.mustPublish(imgA, nil)
	checkFile(t, req, "plugin.wasm", modA)
	if mirror.BlobGets(digest.FromBytes(modA)) != 1 || origin.BlobGets(digest.FromBytes(modA)) != 0 {
		t.Errorf("publishing a pre-pulled module downloaded it again")
	}

	// The mirror lacks B: the pull falls back to the origin.
	req = e.mustPublish(imgB, nil)
	checkFile(t, req, "plugin.wasm", modB)
	if origin.BlobGets(digest.FromBytes(modB)) != 1 {
		t.Errorf("B was not fetched from the origin after the mirror missed")
	}

	// A new pre-pull entry is fetched on change, without a restart.
	loads := countLog(e.d, "config loaded")
	writeConfig(t, cfgPath, base+fmt.Sprintf("prePull:\n- image: %s\n- image: %s\n", imgA, imgC))
	eventually(t, "the pre-pull of C after the change", func() bool { return origin.BlobGets(digest.FromBytes(modC)) == 1 })
	if countLog(e.d, "config loaded") <= loads {
		t.Errorf("the change was not logged")
	}

	// A bad file keeps the last good config and says why.
	writeConfig(t, cfgPath, "registries: [not, a, mapping\n")
	eventually(t, "the refusal of the bad file", func() bool { return strings.Contains(e.d.Logs(), "keeping the last good config") })
	req = e.mustPublish(imgC, nil) // the mirror and insecure settings still hold
	checkFile(t, req, "plugin.wasm", modC)

	// A size limit takes effect live.
	big := wasmgen.ProxyWasm(wasmgen.Options{Message: t.Name() + " big", PadTo: 8 << 10})
	if _, err := registrytest.PushWasm(ctx, origin.Host()+"/live/big:1", big, registrytest.LayoutCNCF); err != nil {
		t.Fatal(err)
	}
	loads = countLog(e.d, "config loaded")
	writeConfig(t, cfgPath, base+"limits:\n  maxModuleSize: 4Ki\n")
	eventually(t, "the size limit", func() bool { return countLog(e.d, "config loaded") > loads })
	err := e.publish(e.request(harness.NewPod("big"), "wasm", map[string]string{"image": origin.ProxyHost() + "/live/big:1"}))
	wantCode(t, err, codes.FailedPrecondition, "limit")
	if n := origin.BlobGets(digest.FromBytes(big)); n != 0 {
		t.Errorf("a module over the limit was downloaded %d times; its size is known from the manifest", n)
	}
}

// scrape fetches the daemon's /metrics and returns the sample lines.
func scrape(t *testing.T, d *harness.Daemon) string {
	t.Helper()
	base, err := d.MetricsURL()
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func metric(t *testing.T, text, name string) float64 {
	t.Helper()
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` ([0-9.e+]+)$`).FindStringSubmatch(text)
	if m == nil {
		t.Fatalf("metric %s not found in:\n%s", name, text)
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

// TestMetricsAndHealth: the numbers follow what happened, nothing is
// labelled per volume or digest, and /healthz answers.
func TestMetricsAndHealth(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	m1, m2 := module(t, "1"), module(t, "2")
	push(t, repoName(t, "m")+":1", m1, registrytest.LayoutCNCF)
	push(t, repoName(t, "m")+":2", m2, registrytest.LayoutOCIGzip)
	a := e.mustPublish(image(repoName(t, "m")+":1"), nil)
	e.mustPublish(image(repoName(t, "m")+":1"), nil)
	e.mustPublish(image(repoName(t, "m")+":2"), nil)
	err := e.publish(e.request(harness.NewPod("missing"), "wasm", map[string]string{"image": image(repoName(t, "absent") + ":1")}))
	wantCode(t, err, codes.NotFound)
	e.mustUnpublish(a)

	text := scrape(t, e.d)
	for name, want := range map[string]float64{
		`wasmcsi_pulls_total{result="success"}`:                    2,
		`wasmcsi_cache_lookups_total{result="hit"}`:                1,
		`wasmcsi_cache_lookups_total{result="miss"}`:               2,
		`wasmcsi_downloaded_bytes_total`:                           float64(len(m1) + len(m2)),
		`wasmcsi_store_modules`:                                    2,
		`wasmcsi_store_bytes`:                                      float64(len(m1) + len(m2)),
		`wasmcsi_volumes_published`:                                2,
		`wasmcsi_pull_duration_seconds_count`:                      2,
		`wasmcsi_publish_duration_seconds_count{result="success"}`: 3,
		`wasmcsi_publish_duration_seconds_count{result="error"}`:   1,
	} {
		if got := metric(t, text, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, "wasmcsi_") && (strings.Contains(line, "volume=") || strings.Contains(line, "digest=") || strings.Contains(line, "image=")) {
			t.Errorf("per-volume/digest/image label: %s", line)
		}
	}
	base, _ := e.d.MetricsURL()
	resp, err := http.Get(base + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || strings.TrimSpace(string(body)) != "ok" {
		t.Errorf("/healthz: %d %q", resp.StatusCode, body)
	}
}
