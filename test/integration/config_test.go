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

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
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

// healthz returns /healthz's status code and body.
func healthz(t *testing.T, d *harness.Daemon) (int, string) {
	t.Helper()
	base, err := d.MetricsURL()
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get(base + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestRegistriesAllowed: an image outside registries.allowed is refused
// with PermissionDenied before any request to its registry; the list
// changes live; a prePull entry outside it refuses the whole file and the
// last good config stays; running pods keep their mounts.
// TestGarbageCollectorTarget: the daemon runs its collector at GOGC=50
// unless its environment sets GOGC, which wins (the Go runtime's own figure,
// go_gc_gogc_percent, says which it runs with).
func TestGarbageCollectorTarget(t *testing.T) {
	t.Parallel()
	want := 50.0
	if v := os.Getenv("GOGC"); v != "" {
		// The test's own environment reaches the daemon.
		n, err := strconv.Atoi(v)
		if err != nil {
			t.Skipf("GOGC=%q in the test's environment", v)
		}
		want = float64(n)
	}
	def := newEnv(t)
	if got := metric(t, scrape(t, def.d), "go_gc_gogc_percent"); got != want {
		t.Errorf("go_gc_gogc_percent = %v, want %v", got, want)
	}
	set := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--insecure-registry=" + reg.ProxyHost()}, Env: []string{"GOGC=80"}})
	if got := metric(t, scrape(t, set.d), "go_gc_gogc_percent"); got != 80 {
		t.Errorf("with GOGC=80: go_gc_gogc_percent = %v, want 80", got)
	}
}

func TestRegistriesAllowed(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	r := registrytest.StartT(t, registrytest.Options{})
	mods := map[string][]byte{}
	for _, repo := range []string{"team/m", "team/sub/m", "teamx/m", "other/m"} {
		mods[repo] = module(t, repo)
		if _, err := registrytest.PushWasm(ctx, r.Host()+"/"+repo+":1", mods[repo], registrytest.LayoutCNCF); err != nil {
			t.Fatal(err)
		}
	}
	host := r.ProxyHost()
	img := func(repo string) string { return host + "/" + repo + ":1" }
	cfgPath := filepath.Join(t.TempDir(), "config.yaml")
	config := func(allowed []string, prePull ...string) string {
		s := fmt.Sprintf("registries:\n  insecure: [%q]\n  allowed: [%s]\n", host, strings.Join(allowed, ", "))
		if len(prePull) > 0 {
			s += "prePull:\n"
			for _, p := range prePull {
				s += "- image: " + p + "\n"
			}
		}
		return s
	}
	writeConfig(t, cfgPath, config([]string{`"` + host + `/team"`, `"*.example.com"`}))
	e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--config=" + cfgPath}})

	team := e.mustPublish(img("team/m"), nil)
	checkFile(t, team, "plugin.wasm", mods["team/m"])
	sub := e.mustPublish(img("team/sub/m"), nil)
	checkFile(t, sub, "plugin.wasm", mods["team/sub/m"])
	for _, repo := range []string{"teamx/m", "other/m"} {
		e.failPublish(t, map[string]string{"image": img(repo)}, codes.PermissionDenied,
			img(repo), "registries.allowed", host+"/team, *.example.com")
		if n := r.ManifestRequests(repo); n != 0 {
			t.Errorf("%s: the registry saw %d requests for an image outside registries.allowed", repo, n)
		}
	}

	// Live: the list now names other/ only. A new pod of team/m is refused;
	// the running pods keep their files.
	loads := countLog(e.d, "config loaded")
	writeConfig(t, cfgPath, config([]string{`"` + host + `/other"`}))
	eventually(t, "the new list", func() bool { return countLog(e.d, "config loaded") > loads })
	req := e.mustPublish(img("other/m"), nil)
	checkFile(t, req, "plugin.wasm", mods["other/m"])
	e.failPublish(t, map[string]string{"image": img("team/m")}, codes.PermissionDenied, img("team/m"), host+"/other")
	// On the node already, and pullPolicy Never: still refused.
	e.failPublish(t, map[string]string{"image": img("team/m"), "pullPolicy": "Never"}, codes.PermissionDenied, "registries.allowed")
	checkFile(t, team, "plugin.wasm", mods["team/m"])
	checkFile(t, sub, "plugin.wasm", mods["team/sub/m"])
	e.mustUnpublish(team)

	// A prePull entry outside the list refuses the file; the last good
	// config (other/ only) stays, and nothing is pre-pulled.
	before := r.ManifestRequests("teamx/m")
	writeConfig(t, cfgPath, config([]string{`"` + host + `/other"`}, img("teamx/m")))
	eventually(t, "the refusal of the prePull entry", func() bool {
		return strings.Contains(e.d.Logs(), "prePull[0]: image "+img("teamx/m")+" is outside registries.allowed")
	})
	e.failPublish(t, map[string]string{"image": img("team/sub/m")}, codes.PermissionDenied, host+"/other")
	e.mustPublish(img("other/m"), nil)
	time.Sleep(time.Second) // a pre-pull, had it started, would have asked by now
	if n := r.ManifestRequests("teamx/m"); n != before {
		t.Errorf("the refused config's prePull entry was pulled (%d requests)", n-before)
	}

	// An empty list allows nothing.
	writeConfig(t, cfgPath, config(nil))
	eventually(t, "the empty list", func() bool {
		err := e.publish(e.request(harness.NewPod("empty"), "wasm", map[string]string{"image": img("other/m")}))
		return err != nil && strings.Contains(err.Error(), "none: the list is empty")
	})
}

// TestConfigFailsClosed: a config file refused at start serves nothing
// (FailedPrecondition naming the error, no registry request), says so on
// /healthz and in wasmcsi_config_state, and recovers when the file is
// fixed, without a restart. A file refused later keeps the last good
// config. The watcher reacts to the config file only, and logs one line
// per bad content however often other files in its directory change.
func TestConfigFailsClosed(t *testing.T) {
	t.Parallel()
	r := registrytest.StartT(t, registrytest.Options{})
	mod := module(t, "closed")
	if _, err := registrytest.PushWasm(context.Background(), r.Host()+"/fc/m:1", mod, registrytest.LayoutCNCF); err != nil {
		t.Fatal(err)
	}
	img := r.ProxyHost() + "/fc/m:1"
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.yaml")
	good := fmt.Sprintf("registries:\n  insecure: [%q]\n", r.ProxyHost())
	writeConfig(t, cfgPath, good+"validation: strict\n") // not a validation mode
	e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--config=" + cfgPath}})

	e.failPublish(t, map[string]string{"image": img}, codes.FailedPrecondition, img, "config", "validation", `"strict"`)
	if n := r.Counts().Requests; n != 0 {
		t.Errorf("the registry saw %d requests while the config was refused", n)
	}
	if code, body := healthz(t, e.d); code != http.StatusServiceUnavailable || !strings.Contains(body, `"strict"`) {
		t.Errorf("/healthz with a refused config: %d %q, want 503 naming the error", code, body)
	}
	text := scrape(t, e.d)
	if metric(t, text, `wasmcsi_config_state{state="refused"}`) != 1 || metric(t, text, `wasmcsi_config_state{state="ok"}`) != 0 {
		t.Errorf("wasmcsi_config_state does not say refused:\n%s", text)
	}

	// Other files in the directory change: nothing is re-read or re-logged.
	logLines := countLog(e.d, "config not applied")
	if logLines != 1 {
		t.Errorf("the refusal was logged %d times at start, want once", logLines)
	}
	for i := 0; i < 20; i++ {
		if err := os.WriteFile(filepath.Join(dir, "driver.log"), []byte(strings.Repeat("x", i)), 0o644); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	writeConfig(t, cfgPath, good+"validation: strict\n") // the same bad content again
	time.Sleep(time.Second)
	if n := countLog(e.d, "config not applied"); n != 1 {
		t.Errorf("one bad content was logged %d times, want once", n)
	}

	// Fixed: served, healthy, ok, without a restart.
	writeConfig(t, cfgPath, good)
	eventually(t, "the fixed config", func() bool { return countLog(e.d, "config loaded") > 0 })
	req := e.mustPublish(img, nil)
	checkFile(t, req, "plugin.wasm", mod)
	if code, body := healthz(t, e.d); code != http.StatusOK {
		t.Errorf("/healthz after the fix: %d %q", code, body)
	}
	if v := metric(t, scrape(t, e.d), `wasmcsi_config_state{state="ok"}`); v != 1 {
		t.Errorf(`wasmcsi_config_state{state="ok"} = %v after the fix`, v)
	}

	// Refused at reload: the last good config stays, publishes go on.
	writeConfig(t, cfgPath, "registries: [not, a, mapping\n")
	eventually(t, "the refusal at reload", func() bool { return strings.Contains(e.d.Logs(), "keeping the last good config") })
	e.mustPublish(img, nil)
	if code, _ := healthz(t, e.d); code != http.StatusOK {
		t.Errorf("/healthz with the last good config in force: %d, want 200", code)
	}
	if v := metric(t, scrape(t, e.d), `wasmcsi_config_state{state="last_good"}`); v != 1 {
		t.Errorf(`wasmcsi_config_state{state="last_good"} = %v`, v)
	}
	e.mustUnpublish(req)
}

// TestConfigMissingFailsClosed: --config naming a file that is not there
// serves nothing until it appears.
func TestConfigMissingFailsClosed(t *testing.T) {
	t.Parallel()
	cfgPath := filepath.Join(t.TempDir(), "config.yaml")
	e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--config=" + cfgPath}})
	repo := repoName(t, "m")
	mod := module(t, "missing-config")
	push(t, repo+":1", mod, registrytest.LayoutCNCF)
	e.failPublish(t, map[string]string{"image": image(repo + ":1")}, codes.FailedPrecondition, "not found")
	writeConfig(t, cfgPath, fmt.Sprintf("registries:\n  insecure: [%q]\n", reg.ProxyHost()))
	eventually(t, "the config", func() bool { return countLog(e.d, "config loaded") > 0 })
	checkFile(t, e.mustPublish(image(repo+":1"), nil), "plugin.wasm", mod)
}
