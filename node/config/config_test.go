package config

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wasm-csi/wasm-csi/test/lib/testlog"
)

func TestParseFileConfig(t *testing.T) {
	good := `
registries:
  insecure: [registry.local:5000, plain.example]
  mirrors:
    ghcr.io: [mirror.internal:5000]
limits:
  maxModuleSize: 64Mi
  maxStoreSize: 2Gi
  unusedModuleAge: 7d
  minimumModuleAge: 5m
  maxConcurrentPulls: 8
validation: wasm
prePull:
- image: ghcr.io/acme/filters/header:1.2.0
`
	c, err := ParseFileConfig([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.Limits.MaxModuleSize.Value(); got != 64<<20 {
		t.Errorf("maxModuleSize = %d", got)
	}
	if got := c.Limits.MaxStoreSize.Value(); got != 2<<30 {
		t.Errorf("maxStoreSize = %d", got)
	}
	if n := c.Limits.MaxConcurrentPulls; n == nil || *n != 8 {
		t.Errorf("maxConcurrentPulls = %v", n)
	}
	if age, _ := c.UnusedModuleAge(); age != 7*24*time.Hour {
		t.Errorf("unusedModuleAge = %v", age)
	}
	if age, err := c.MinimumModuleAge(); age != 5*time.Minute || err != nil {
		t.Errorf("minimumModuleAge = %v, %v", age, err)
	}
	if age, err := (FileConfig{}).MinimumModuleAge(); age != 0 || err != nil {
		t.Errorf("minimumModuleAge unset = %v, %v; want 0 (the store's default)", age, err)
	}
	if len(c.Registries.Insecure) != 2 || c.Registries.Mirrors["ghcr.io"][0] != "mirror.internal:5000" || c.Validation != "wasm" || c.PrePull[0].Image != "ghcr.io/acme/filters/header:1.2.0" {
		t.Errorf("parsed %+v", c)
	}
	if c, err := ParseFileConfig([]byte("  \n")); err != nil || c.Validation != "" {
		t.Errorf("empty file: %+v %v", c, err)
	}
	for name, bad := range map[string]string{
		"unknown field":     "registries:\n  insecrue: [a]\n",
		"bad quantity":      "limits:\n  maxModuleSize: lots\n",
		"negative size":     "limits:\n  maxStoreSize: -1Gi\n",
		"bad age":           "limits:\n  unusedModuleAge: soon\n",
		"bad days":          "limits:\n  unusedModuleAge: 7.5d\n",
		"bad minimum age":   "limits:\n  minimumModuleAge: a while\n",
		"minimum age < 30s": "limits:\n  minimumModuleAge: 0s\n",
		"bad validation":    "validation: strict\n",
		"bad prepull":       "prePull:\n- image: 'UPPER/Case:x:y'\n",
		"url not host":      "registries:\n  insecure: ['http://x']\n",
		"bad mirror":        "registries:\n  mirrors:\n    ghcr.io: ['a b']\n",
		"not yaml mapping":  "- a\n- b\n",
		"no pull slots":     "limits:\n  maxConcurrentPulls: 0\n",
		"too many slots":    "limits:\n  maxConcurrentPulls: 1000\n",
		"fractional slots":  "limits:\n  maxConcurrentPulls: 2.5\n",
	} {
		if _, err := ParseFileConfig([]byte(bad)); err == nil {
			t.Errorf("%s: accepted %q", name, bad)
		}
	}
}

// applied collects what a Watcher applies.
type applied struct {
	mu   sync.Mutex
	cfgs []FileConfig
}

func (a *applied) apply(c FileConfig) error {
	a.mu.Lock()
	a.cfgs = append(a.cfgs, c)
	a.mu.Unlock()
	return nil
}

func (a *applied) last() (FileConfig, int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.cfgs) == 0 {
		return FileConfig{}, 0
	}
	return a.cfgs[len(a.cfgs)-1], len(a.cfgs)
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestConfigWatcherConfigMapSwap follows kubelet's ConfigMap update: files
// live in a timestamped directory, "..data" is a symlink to it, the file
// is a symlink through "..data", and an update swaps "..data" atomically.
func TestConfigWatcherConfigMapSwap(t *testing.T) {
	dir := t.TempDir()
	write := func(gen, body string) {
		ts := filepath.Join(dir, "..2026_"+gen)
		if err := os.Mkdir(ts, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(ts, "config.yaml"), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		tmp := filepath.Join(dir, "..data_tmp")
		if err := os.Symlink(filepath.Base(ts), tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
	}
	write("1", "validation: wasm\n")
	if err := os.Symlink("..data/config.yaml", filepath.Join(dir, "config.yaml")); err != nil {
		t.Fatal(err)
	}
	var logs testlog.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	a := &applied{}
	w := &Watcher{Path: filepath.Join(dir, "config.yaml"), Log: log, Apply: a.apply, Debounce: 50 * time.Millisecond}
	if err := w.Load(); err != nil {
		t.Fatal(err)
	}
	if c, n := a.last(); n != 1 || c.Validation != "wasm" {
		t.Fatalf("initial load: %+v (%d)", c, n)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- w.Run(ctx) }()
	defer func() { cancel(); <-done }()
	time.Sleep(100 * time.Millisecond)

	write("2", "validation: none\n")
	waitFor(t, "the swapped config", func() bool { c, _ := a.last(); return c.Validation == "none" })

	// A bad file keeps the last good config and says why.
	_, n := a.last()
	write("3", "validation: bogus\n")
	waitFor(t, "the error log", func() bool { return strings.Contains(logs.String(), "keeping the last good config") })
	if c, n2 := a.last(); n2 != n || c.Validation != "none" {
		t.Fatalf("bad file was applied: %+v", c)
	}
	write("4", "validation: proxy-wasm\n")
	waitFor(t, "the fixed config", func() bool { c, _ := a.last(); return c.Validation == "proxy-wasm" })
}

// TestConfigWatcherMissingFile: a --config file that is not there is a
// refusal (fail closed), not the defaults.
func TestConfigWatcherMissingFile(t *testing.T) {
	a := &applied{}
	var refused []error
	w := &Watcher{Path: filepath.Join(t.TempDir(), "absent.yaml"), Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Apply: a.apply, Refused: func(err error) { refused = append(refused, err) }}
	if err := w.Load(); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Fatalf("Load of a missing file: %v, want not found", err)
	}
	if _, n := a.last(); n != 0 {
		t.Fatalf("a missing file applied a config")
	}
	if len(refused) != 1 {
		t.Fatalf("Refused called %d times, want 1", len(refused))
	}
}

// refusals counts what a Watcher reports to Refused.
type refusals struct {
	mu sync.Mutex
	n  int
}

func (r *refusals) add(error) { r.mu.Lock(); r.n++; r.mu.Unlock() }

func (r *refusals) count() int { r.mu.Lock(); defer r.mu.Unlock(); return r.n }

// startWatcher loads path and runs a watcher on it until the test ends.
func startWatcher(t *testing.T, path string) (*Watcher, *applied, *testlog.Buffer, *refusals) {
	t.Helper()
	logs := &testlog.Buffer{}
	a := &applied{}
	refused := &refusals{}
	w := &Watcher{Path: path, Log: slog.New(slog.NewTextHandler(logs, nil)), Apply: a.apply, Debounce: 20 * time.Millisecond,
		Refused: refused.add}
	_ = w.Load()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- w.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	time.Sleep(100 * time.Millisecond) // the watch is set up
	return w, a, logs, refused
}

func writeFile(t *testing.T, path, body string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// TestConfigWatcherIgnoresOtherFiles: a bad config beside a file that keeps
// changing (a log) is read and logged once, not on every event; a change to
// the config itself is still seen.
func TestConfigWatcherIgnoresOtherFiles(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "config.yaml")
	writeFile(t, cfg, "validation: wasm\n")
	_, a, logs, refused := startWatcher(t, cfg)
	writeFile(t, cfg, "validation: bogus\n")
	waitFor(t, "the refusal", func() bool { return logs.Count("config not applied") == 1 })
	logf := filepath.Join(dir, "driver.log")
	for i := 0; i < 30; i++ {
		f, err := os.OpenFile(logf, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(f, "line %d\n", i)
		f.Close()
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // ten debounce periods
	if n := logs.Count("config not applied"); n != 1 {
		t.Errorf("the refusal was logged %d times, want once:\n%s", n, logs.String())
	}
	if refused.count() != 1 {
		t.Errorf("Refused was called %d times, want once", refused.count())
	}
	if c, _ := a.last(); c.Validation != "wasm" {
		t.Errorf("the config in force is %+v, want the last good one", c)
	}
	writeFile(t, cfg, "validation: none\n")
	waitFor(t, "the fixed config", func() bool { c, _ := a.last(); return c.Validation == "none" })
}

// TestConfigWatcherLogsOncePerContent: the same bad content written again
// is not logged again; other bad content is; a good file after a bad one
// is applied, even when it is the last good content again.
func TestConfigWatcherLogsOncePerContent(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "config.yaml")
	writeFile(t, cfg, "validation: wasm\n")
	_, a, logs, refused := startWatcher(t, cfg)
	_, n0 := a.last()
	writeFile(t, cfg, "validation: bogus\n")
	waitFor(t, "the first refusal", func() bool { return logs.Count("config not applied") == 1 })
	writeFile(t, cfg, "validation: bogus\n")
	time.Sleep(200 * time.Millisecond)
	if n := logs.Count("config not applied"); n != 1 {
		t.Errorf("the same bad content was logged %d times, want once", n)
	}
	writeFile(t, cfg, "registries: [not, a, mapping\n")
	waitFor(t, "the second refusal", func() bool { return logs.Count("config not applied") == 2 })
	if refused.count() != 2 {
		t.Errorf("Refused was called %d times, want 2", refused.count())
	}
	writeFile(t, cfg, "validation: wasm\n") // the last good content again
	waitFor(t, "the good file", func() bool { _, n := a.last(); return n == n0+1 })
	writeFile(t, cfg, "validation: bogus\n") // bad again: a new refusal
	waitFor(t, "the third refusal", func() bool { return logs.Count("config not applied") == 3 })
}

// TestConfigWatcherRefusals: an oversized file and a config Apply refuses
// are refused like a parse error; nothing is applied.
func TestConfigWatcherRefusals(t *testing.T) {
	cfg := filepath.Join(t.TempDir(), "config.yaml")
	writeFile(t, cfg, "# "+strings.Repeat("x", MaxConfigFileSize)+"\n")
	a := &applied{}
	w := &Watcher{Path: cfg, Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Apply: a.apply}
	if err := w.Load(); err == nil || !strings.Contains(err.Error(), "over") {
		t.Errorf("an oversized file: %v", err)
	}
	writeFile(t, cfg, "validation: wasm\n")
	w.Apply = func(FileConfig) error { return fmt.Errorf("no thanks") }
	if err := w.Load(); err == nil || !strings.Contains(err.Error(), "no thanks") {
		t.Errorf("a config Apply refuses: %v", err)
	}
	if _, n := a.last(); n != 0 {
		t.Errorf("%d configs applied, want none", n)
	}
}

// TestAllowedConfig: registries.allowed is parsed with the image matcher;
// a bad pattern and a prePull image outside the list are refused, naming
// the entry.
func TestAllowedConfig(t *testing.T) {
	c, err := ParseFileConfig([]byte("registries:\n  allowed: [ghcr.io/acme, 'registry.local:5000']\nprePull:\n- image: ghcr.io/acme/x:1\n"))
	if err != nil {
		t.Fatal(err)
	}
	list, restricted, err := c.Registries.AllowedImages()
	if err != nil || !restricted || len(list) != 2 {
		t.Errorf("AllowedImages() = %v, %v, %v", list, restricted, err)
	}
	c, err = ParseFileConfig([]byte("registries:\n  allowed: []\n"))
	if _, restricted, _ := c.Registries.AllowedImages(); err != nil || !restricted {
		t.Errorf("allowed: [] must restrict to nothing: %v %v", restricted, err)
	}
	c, err = ParseFileConfig([]byte("validation: wasm\n"))
	if _, restricted, _ := c.Registries.AllowedImages(); err != nil || restricted {
		t.Errorf("no allowed key must not restrict: %v %v", restricted, err)
	}
	for bad, want := range map[string]string{
		"registries:\n  allowed: [ghcr.io/acme, 'ghcr.io/a*']\n":                            "registries.allowed[1]",
		"registries:\n  allowed: [ghcr.io/acme]\nprePull:\n- image: ghcr.io/acmecorp/x:1\n": "prePull[0]: image ghcr.io/acmecorp/x:1 is outside registries.allowed",
		"registries:\n  allowed: []\nprePull:\n- image: nginx\n":                            "prePull[0]",
	} {
		if _, err := ParseFileConfig([]byte(bad)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want an error naming %s", bad, err, want)
		}
	}
}

// TestBlockedCIDRsConfig: registries.blockedCIDRs is parsed and masked; a
// value that is not a CIDR is refused with the field's name.
func TestBlockedCIDRsConfig(t *testing.T) {
	c, err := ParseFileConfig([]byte("registries:\n  blockedCIDRs: [10.1.2.3/8, 'fd00::/8', ' 192.168.0.0/16 ']\n"))
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.Registries.BlockedNetworks()
	if err != nil || len(got) != 3 || got[0].String() != "10.0.0.0/8" || got[1].String() != "fd00::/8" || got[2].String() != "192.168.0.0/16" {
		t.Errorf("BlockedNetworks() = %v, %v", got, err)
	}
	for _, bad := range []string{"10.0.0.1", "10.0.0.0/33", "example.com/8", ""} {
		_, err := ParseFileConfig([]byte("registries:\n  blockedCIDRs: ['" + bad + "']\n"))
		if err == nil || !strings.Contains(err.Error(), "registries.blockedCIDRs") {
			t.Errorf("blockedCIDRs [%q]: %v, want an error naming registries.blockedCIDRs", bad, err)
		}
	}
}
