package credprovider

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/errdefs"
	"github.com/wasm-csi/wasm-csi/test/lib/harness"
)

// These tests run a real plugin executable (test/tools/credplugin), built
// once, the way kubelet runs one: request on stdin, answer on stdout.

var (
	pluginOnce sync.Once
	pluginDir  string
	pluginBin  string
	pluginErr  error
)

// buildPlugin builds the plugin once per test binary, when a test first
// needs it (fuzz workers need none), into a directory removed at exit.
func buildPlugin(t *testing.T) string {
	t.Helper()
	pluginOnce.Do(func() {
		pluginDir, pluginErr = os.MkdirTemp("", "credprovider-test-")
		if pluginErr == nil {
			pluginBin, pluginErr = harness.BuildCredentialPlugin(pluginDir)
		}
	})
	if pluginErr != nil {
		t.Fatal(pluginErr)
	}
	return pluginBin
}

func TestMain(m *testing.M) {
	code := m.Run()
	if pluginDir != "" {
		os.RemoveAll(pluginDir)
	}
	os.Exit(code)
}

// env is a bin dir holding the plugin under the given names, and a config.
type env struct {
	t      *testing.T
	dir    string
	binDir string
	log    string // the plugin's per-run log
	logs   *bytes.Buffer
}

func newEnv(t *testing.T, names ...string) *env {
	t.Helper()
	e := &env{t: t, dir: t.TempDir(), logs: &bytes.Buffer{}}
	e.binDir = filepath.Join(e.dir, "bin")
	e.log = filepath.Join(e.dir, "runs.log")
	if err := os.Mkdir(e.binDir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := buildPlugin(t)
	for _, n := range names {
		if err := os.Symlink(bin, filepath.Join(e.binDir, n)); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

func (e *env) write(name, content string) string {
	e.t.Helper()
	p := filepath.Join(e.dir, name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		e.t.Fatal(err)
	}
	return p
}

// load writes config and loads it, with the given options on top.
func (e *env) load(config string, opts Options) *Providers {
	e.t.Helper()
	opts.Config = e.write("config.yaml", config)
	opts.BinDir = e.binDir
	var mu sync.Mutex
	opts.Log = slog.New(slog.NewTextHandler(lockedWriter{&mu, e.logs}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ps, err := Load(opts)
	if err != nil {
		e.t.Fatal(err)
	}
	return ps
}

type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// runs returns the plugin's runs, one "apiVersion image" line each.
func (e *env) runs() []string {
	b, err := os.ReadFile(e.log)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		e.t.Fatal(err)
	}
	return strings.Fields(strings.ReplaceAll(string(b), "\n", " \n"))
}

func (e *env) runCount() int {
	b, _ := os.ReadFile(e.log)
	return strings.Count(string(b), "\n")
}

// provider renders one provider of a config.
func provider(name, apiVersion, defaultCache string, matchImages []string, args ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "- name: %s\n  apiVersion: %s\n  defaultCacheDuration: %q\n  matchImages:\n", name, apiVersion, defaultCache)
	for _, m := range matchImages {
		fmt.Fprintf(&b, "  - %q\n", m)
	}
	if len(args) > 0 {
		b.WriteString("  args:\n")
		for _, a := range args {
			fmt.Fprintf(&b, "  - %q\n", a)
		}
	}
	return b.String()
}

func config(providers ...string) string {
	return "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n" + strings.Join(providers, "")
}

func ref(t *testing.T, s string) puller.Reference {
	t.Helper()
	r, err := puller.ParseReference(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

const v1 = "credentialprovider.kubelet.k8s.io/v1"

func TestProvideAsksThePluginAsKubeletDoes(t *testing.T) {
	for _, version := range []string{v1, "credentialprovider.kubelet.k8s.io/v1beta1", "credentialprovider.kubelet.k8s.io/v1alpha1"} {
		t.Run(version, func(t *testing.T) {
			e := newEnv(t, "ecr-credential-provider")
			ps := e.load(config(provider("ecr-credential-provider", version, "0s", []string{"*.dkr.ecr.*.amazonaws.com"},
				"-user=AWS", "-password=t0ken-Secret", "-log="+e.log)), Options{})
			r := ref(t, "123456789.dkr.ecr.us-east-1.amazonaws.com/filters/header:1.0")
			creds := ps.Provide(context.Background(), r)
			if len(creds) != 1 {
				t.Fatalf("got %d credentials, want 1: %+v", len(creds), creds)
			}
			c := creds[0]
			if c.Err != nil || c.Cred.Username != "AWS" || c.Cred.Password != "t0ken-Secret" {
				t.Fatalf("credential %+v", c)
			}
			if !c.Node || c.FromPodSecret() || c.Source != "credential provider ecr-credential-provider" {
				t.Errorf("credential is not the node's: %+v", c)
			}
			// The plugin is asked for host/repository in the configured
			// apiVersion, as kubelet asks it.
			want := []string{version, "123456789.dkr.ecr.us-east-1.amazonaws.com/filters/header"}
			if got := e.runs(); strings.Join(got, " ") != strings.Join(want, " ") {
				t.Errorf("plugin runs %q, want %q", got, want)
			}
			// An image its matchImages do not match does not run it.
			if creds := ps.Provide(context.Background(), ref(t, "ghcr.io/acme/filter:1")); len(creds) != 0 {
				t.Errorf("unmatched image got %+v", creds)
			}
			if n := e.runCount(); n != 1 {
				t.Errorf("plugin ran %d times, want 1", n)
			}
		})
	}
}

func TestArgsAndEnv(t *testing.T) {
	e := newEnv(t, "p")
	cfg := config(provider("p", v1, "0s", []string{"registry.io"}, "-user=u", "-password=p", "-require-env=REGION=eu-west-1", "-log="+e.log) +
		"  env:\n  - name: REGION\n    value: eu-west-1\n")
	ps := e.load(cfg, Options{})
	creds := ps.Provide(context.Background(), ref(t, "registry.io/a:1"))
	if len(creds) != 1 || creds[0].Err != nil {
		t.Fatalf("with env: %+v (log: %s)", creds, e.logs)
	}
	// The same plugin without the env fails: the env is what made it work.
	e2 := newEnv(t, "p")
	ps = e2.load(config(provider("p", v1, "0s", []string{"registry.io"}, "-user=u", "-password=p", "-require-env=REGION=eu-west-1")), Options{})
	creds = ps.Provide(context.Background(), ref(t, "registry.io/a:1"))
	if len(creds) != 1 || creds[0].Err == nil {
		t.Fatalf("without env: %+v", creds)
	}
	if !strings.Contains(e2.logs.String(), "environment variable REGION") {
		t.Errorf("the plugin's stderr is not in the log: %s", e2.logs)
	}
}

// fakeClock is the cache's clock.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

func TestCache(t *testing.T) {
	images := []string{"r1.io/a/x:1", "r1.io/a/x:2", "r1.io/b/y:1", "r2.io/c/z:1"}
	for _, c := range []struct {
		name         string
		defaultCache string
		args         []string
		// runs after asking for each image in turn, twice over
		wantRuns int
		// expire is how long until an answer must be asked again
		expire time.Duration
	}{
		// Image: one run per repository (tags share it).
		{"Image key", "10m", []string{"-cache-key-type=Image"}, 3, 10 * time.Minute},
		// Registry: one run per registry.
		{"Registry key", "10m", []string{"-cache-key-type=Registry"}, 2, 10 * time.Minute},
		// Global: one run for everything.
		{"Global key", "10m", []string{"-cache-key-type=Global"}, 1, 10 * time.Minute},
		// The answer's cacheDuration wins over the default.
		{"cacheDuration", "10m", []string{"-cache-key-type=Global", "-cache-duration=1m"}, 1, time.Minute},
		// A cacheDuration of 0 caches nothing, whatever the default.
		{"cacheDuration 0", "10m", []string{"-cache-key-type=Global", "-cache-duration=0s"}, 8, 0},
		// No cacheDuration and a default of 0: nothing cached either.
		{"default 0", "0s", []string{"-cache-key-type=Global"}, 8, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t, "p")
			clock := &fakeClock{now: time.Unix(1e9, 0)}
			args := append([]string{"-user=u", "-password=p", "-key=*.io", "-log=" + e.log}, c.args...)
			ps := e.load(config(provider("p", v1, c.defaultCache, []string{"*.io"}, args...)), Options{Now: clock.Now})
			for range 2 {
				for _, img := range images {
					creds := ps.Provide(context.Background(), ref(t, img))
					if len(creds) != 1 || creds[0].Err != nil || creds[0].Cred.Username != "u" {
						t.Fatalf("%s: %+v", img, creds)
					}
				}
			}
			if n := e.runCount(); n != c.wantRuns {
				t.Fatalf("plugin ran %d times, want %d: %q", n, c.wantRuns, e.runs())
			}
			if c.expire == 0 {
				return
			}
			// Still fresh at the end of its duration; asked again after.
			clock.Add(c.expire)
			ps.Provide(context.Background(), ref(t, images[0]))
			if n := e.runCount(); n != c.wantRuns {
				t.Fatalf("asked again before the answer expired: %d runs", n)
			}
			clock.Add(time.Second)
			ps.Provide(context.Background(), ref(t, images[0]))
			if n := e.runCount(); n != c.wantRuns+1 {
				t.Fatalf("not asked again after the answer expired: %d runs, want %d", n, c.wantRuns+1)
			}
		})
	}
}

func TestCacheIsBounded(t *testing.T) {
	e := newEnv(t, "p")
	ps := e.load(config(provider("p", v1, "1h", []string{"r.io"}, "-user=u", "-password=p")), Options{MaxCacheEntries: 3})
	for i := range 10 {
		ps.Provide(context.Background(), ref(t, fmt.Sprintf("r.io/repo%d:1", i)))
	}
	p := ps.plugins[0]
	p.mu.Lock()
	n := len(p.cache)
	p.mu.Unlock()
	if n != 3 {
		t.Errorf("cache holds %d answers, want 3", n)
	}
}

// Concurrent publishes of one image run the plugin once, even with
// nothing cached: the callers share the run.
func TestConcurrentCallersShareOneRun(t *testing.T) {
	e := newEnv(t, "p")
	gate := filepath.Join(e.dir, "go")
	// The plugin waits for the gate file, so that every caller is waiting
	// on its run before it answers.
	script := fmt.Sprintf("#!/bin/sh\nwhile [ ! -e %q ]; do sleep 0.05; done\nexec %q \"$@\"\n", gate, pluginBin)
	if err := os.Remove(filepath.Join(e.binDir, "p")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(e.binDir, "p"), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	ps := e.load(config(provider("p", v1, "0s", []string{"r.io"}, "-user=u", "-password=p", "-log="+e.log)), Options{})
	const callers = 20
	var wg sync.WaitGroup
	results := make([][]puller.Credential, callers)
	for i := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = ps.Provide(context.Background(), ref(t, "r.io/team/filter:1"))
		}()
	}
	p := ps.plugins[0]
	for p.waiting.Load() < callers {
		time.Sleep(10 * time.Millisecond)
	}
	if err := os.WriteFile(gate, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	for i, r := range results {
		if len(r) != 1 || r[0].Err != nil || r[0].Cred.Password != "p" {
			t.Fatalf("caller %d: %+v", i, r)
		}
	}
	if n := e.runCount(); n != 1 {
		t.Errorf("%d concurrent callers ran the plugin %d times, want once", callers, n)
	}
}

// A caller that gives up stops waiting; the run goes on for the others.
func TestCallerGivingUpDoesNotStopTheRun(t *testing.T) {
	e := newEnv(t, "p")
	ps := e.load(config(provider("p", v1, "1h", []string{"r.io"}, "-user=u", "-password=p", "-delay=1s", "-log="+e.log)), Options{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan []puller.Credential)
	go func() { done <- ps.Provide(ctx, ref(t, "r.io/a:1")) }()
	for ps.plugins[0].waiting.Load() < 1 {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	creds := <-done
	if len(creds) != 1 || creds[0].Err == nil || !errors.Is(creds[0].Err, errdefs.ErrUnavailable) {
		t.Fatalf("cancelled caller got %+v", creds)
	}
	// The run finished and was cached: the next caller gets it, no new run.
	creds = ps.Provide(context.Background(), ref(t, "r.io/a:1"))
	if len(creds) != 1 || creds[0].Err != nil {
		t.Fatalf("next caller: %+v", creds)
	}
	if n := e.runCount(); n != 1 {
		t.Errorf("plugin ran %d times, want 1", n)
	}
}

// A plugin that fails, hangs or prints garbage gives an Unavailable
// failure naming the plugin, and nothing it printed on stdout.
func TestPluginFailures(t *testing.T) {
	const secret = "Sup3r-Secret-t0ken"
	for _, c := range []struct {
		mode string
		want string
	}{
		{"fail", "it failed (exit status 3)"},
		{"hang", "did not answer within 1s and was killed"},
		{"garbage", "its stdout is not a JSON object"},
		{"flood", "more than 65536 bytes on stdout"},
		{"wrong-version", "not a CredentialProviderResponse of apiVersion credentialprovider.kubelet.k8s.io/v1 as configured (it has apiVersion credentialprovider.kubelet.k8s.io/v1alpha1)"},
		{"bad-cache-key", "cacheKeyType is not Image, Registry or Global"},
		{"unknown-field", "does not decode"},
	} {
		t.Run(c.mode, func(t *testing.T) {
			e := newEnv(t, "acme-plugin")
			pidFile := filepath.Join(e.dir, "child.pid")
			// Only the hanging plugin meets the 1 s timeout; the others get
			// time enough on a loaded machine to fail the way they test
			// (a flood of 64 KiB took more than 1 s at load 40).
			timeout := 30 * time.Second
			if c.mode == "hang" {
				timeout = time.Second
			}
			ps := e.load(config(provider("acme-plugin", v1, "1h", []string{"r.io"},
				"-mode="+c.mode, "-user=u", "-password="+secret, "-child-pid-file="+pidFile)),
				Options{Timeout: timeout, MaxOutput: 64 << 10})
			creds := ps.Provide(context.Background(), ref(t, "r.io/team/filter:1"))
			if len(creds) != 1 || creds[0].Err == nil {
				t.Fatalf("got %+v, want one failed source", creds)
			}
			err := creds[0].Err
			if !errors.Is(err, errdefs.ErrUnavailable) {
				t.Errorf("%v is not Unavailable", err)
			}
			msg := err.Error()
			for _, want := range []string{"credential provider plugin acme-plugin", "r.io/team/filter", c.want} {
				if !strings.Contains(msg, want) {
					t.Errorf("message %q does not say %q", msg, want)
				}
			}
			if strings.Contains(msg, secret) || strings.Contains(e.logs.String(), secret) {
				t.Errorf("the plugin's output reached a message or the log:\n%s\n%s", msg, e.logs)
			}
			if creds[0].Source != "credential provider acme-plugin" || !creds[0].Node {
				t.Errorf("failed source %+v", creds[0])
			}
			// A failure is not cached: the next publish asks again.
			if ps.Runs()["acme-plugin"] != 1 {
				t.Fatalf("runs %v", ps.Runs())
			}
			ps.Provide(context.Background(), ref(t, "r.io/team/filter:1"))
			if ps.Runs()["acme-plugin"] != 2 {
				t.Errorf("a failure was cached: runs %v", ps.Runs())
			}
			if c.mode == "hang" {
				// The plugin's whole process group is killed, its child too.
				b, err := os.ReadFile(pidFile)
				if err != nil {
					t.Fatal(err)
				}
				pid, _ := strconv.Atoi(string(b))
				deadline := time.Now().Add(10 * time.Second)
				for syscall.Kill(pid, 0) == nil {
					if time.Now().After(deadline) {
						t.Fatalf("the hanging plugin's child %d still runs", pid)
					}
					time.Sleep(50 * time.Millisecond)
				}
			}
		})
	}
}

func TestLoadRefusesWhatKubeletRefuses(t *testing.T) {
	good := provider("p", v1, "5m", []string{"*.azurecr.io"})
	for _, c := range []struct {
		name, config, want string
	}{
		{"no providers", config(), "at least one provider"},
		{"missing binary", config(provider("nope", v1, "5m", []string{"r.io"})), `plugin "nope": no executable`},
		{"slash in name", config(provider("../p", v1, "5m", []string{"r.io"})), "must be a file name"},
		{"duplicate", config(good, good), "appears twice"},
		{"bad apiVersion", config(provider("p", "credentialprovider.kubelet.k8s.io/v2", "5m", []string{"r.io"})), `apiVersion "credentialprovider.kubelet.k8s.io/v2" is not one of`},
		{"no matchImages", config(provider("p", v1, "5m", nil)), "matchImages needs at least one"},
		{"bad pattern", config(provider("p", v1, "5m", []string{"[.r.io"})), `matchImages "[.r.io"`},
		{"no defaultCacheDuration", "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n- name: p\n  apiVersion: " + v1 + "\n  matchImages: [r.io]\n", "defaultCacheDuration is required"},
		{"negative defaultCacheDuration", config(provider("p", v1, "-5m", []string{"r.io"})), "must not be negative"},
		{"unknown field", config(good + "  matchImage: [typo.io]\n"), "unknown field"},
		{"wrong kind", "apiVersion: kubelet.config.k8s.io/v1\nkind: KubeletConfiguration\n", `want kind CredentialProviderConfig`},
		{"tokenAttributes", config(good + "  tokenAttributes:\n    serviceAccountTokenAudience: sts.amazonaws.com\n    cacheType: ServiceAccount\n    requireServiceAccount: true\n"),
			"tokenAttributes (service-account-token mode, KEP-4412) is not supported by wasm-csi"},
		{"not yaml", "{", "not YAML or JSON"},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t, "p")
			_, err := Load(Options{Config: e.write("config.yaml", c.config), BinDir: e.binDir})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Load: %v, want an error saying %q", err, c.want)
			}
			if !strings.Contains(err.Error(), "config.yaml") {
				t.Errorf("the error does not name the file: %v", err)
			}
		})
	}
}

// A directory of configs is read in lexical order, as kubelet reads it, and
// JSON is as good as YAML.
func TestLoadDirectory(t *testing.T) {
	e := newEnv(t, "a", "b")
	dir := filepath.Join(e.dir, "conf.d")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{
		"20-b.json": `{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[{"name":"b","apiVersion":"` + v1 + `","matchImages":["r.io"],"defaultCacheDuration":"1m"}]}`,
		"10-a.yaml": config(provider("a", v1, "1m", []string{"r.io"})),
		"README.md": "not a config",
	}
	for n, c := range files {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(c), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ps, err := Load(Options{Config: dir, BinDir: e.binDir})
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(ps.Names(), ","); got != "a,b" {
		t.Errorf("providers %s, want a,b", got)
	}
	// The same provider in two files is refused.
	if err := os.WriteFile(filepath.Join(dir, "30-a.yml"), []byte(config(provider("a", v1, "1m", []string{"r.io"}))), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(Options{Config: dir, BinDir: e.binDir}); err == nil || !strings.Contains(err.Error(), "appears twice") {
		t.Errorf("duplicate across files: %v", err)
	}
}

// Every provider whose matchImages match is asked, in the config's order.
func TestProvidersInOrder(t *testing.T) {
	e := newEnv(t, "first", "second", "other")
	ps := e.load(config(
		provider("first", v1, "0s", []string{"*.r.io"}, "-user=first", "-password=1"),
		provider("other", v1, "0s", []string{"elsewhere.io"}, "-user=other", "-password=3"),
		provider("second", v1, "0s", []string{"eu.r.io/team"}, "-user=second", "-password=2"),
	), Options{})
	var got []string
	for _, c := range ps.Provide(context.Background(), ref(t, "eu.r.io/team/x:1")) {
		got = append(got, c.Source+"="+c.Cred.Username)
	}
	want := "credential provider first=first,credential provider second=second"
	if strings.Join(got, ",") != want {
		t.Errorf("got %v, want %s", got, want)
	}
}

// Runs are counted per plugin and result in the injected registry; no
// label names an image.
func TestMetrics(t *testing.T) {
	e := newEnv(t, "good", "broken", "slow")
	reg := prometheus.NewRegistry()
	ps := e.load(config(
		provider("good", v1, "0s", []string{"a.io"}, "-user=u", "-password=p"),
		provider("broken", v1, "0s", []string{"b.io"}, "-mode=fail"),
		provider("slow", v1, "0s", []string{"c.io"}, "-mode=hang"),
	), Options{Metrics: reg, Timeout: time.Second})
	for _, img := range []string{"a.io/x:1", "a.io/y:1", "b.io/x:1", "c.io/x:1"} {
		ps.Provide(context.Background(), ref(t, img))
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	runs, durations := map[string]float64{}, map[string]uint64{}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			switch f.GetName() {
			case "wasmcsi_credential_provider_runs_total":
				runs[labels["plugin"]+"/"+labels["result"]] = m.GetCounter().GetValue()
			case "wasmcsi_credential_provider_duration_seconds":
				durations[labels["plugin"]] = m.GetHistogram().GetSampleCount()
			}
			if len(labels) > 2 || labels["image"] != "" {
				t.Errorf("%s has labels %v", f.GetName(), labels)
			}
		}
	}
	wantRuns := map[string]float64{"good/success": 2, "broken/error": 1, "slow/timeout": 1}
	if fmt.Sprint(runs) != fmt.Sprint(wantRuns) {
		t.Errorf("runs_total %v, want %v", runs, wantRuns)
	}
	wantDurations := map[string]uint64{"good": 2, "broken": 1, "slow": 1}
	if fmt.Sprint(durations) != fmt.Sprint(wantDurations) {
		t.Errorf("duration_seconds counts %v, want %v", durations, wantDurations)
	}
}
