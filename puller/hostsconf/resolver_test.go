package hostsconf

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"log/slog"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

func write(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	// Replace atomically, as an operator's tooling would.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// testCA is a self-signed certificate in PEM.
func testCA(t *testing.T) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

// summary is an endpoint list in a form easy to compare.
func summary(eps []Endpoint) string {
	var parts []string
	for _, e := range eps {
		s := e.Scheme + "://" + e.Registry + e.Root + " " + e.Repository
		var caps []string
		if e.Resolve {
			caps = append(caps, "resolve")
		}
		if e.Pull {
			caps = append(caps, "pull")
		}
		s += " [" + strings.Join(caps, ",") + "]"
		if e.Mirror {
			s += " mirror"
		}
		if e.SkipVerify {
			s += " skip_verify"
		}
		if e.Insecure {
			s += " insecure"
		}
		if len(e.RootCAs) > 0 {
			s += " ca"
		}
		if len(e.Header) > 0 {
			s += " header"
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, "\n")
}

func TestHostsTOML(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "ghcr.io", "ca.pem"), testCA(t))
	write(t, filepath.Join(dir, "ghcr.io", "hosts.toml"), `
server = "https://ghcr.io"

[host."http://10.0.0.5:5000"]
  capabilities = ["pull"]

[host."https://cache.internal/prefix/ghcr"]
  capabilities = ["pull", "resolve"]
  ca = "ca.pem"
  override_path = true
  [host."https://cache.internal/prefix/ghcr".header]
    x-team = "wasm"
    x-list = ["a", "b"]

[host."https://alpha.internal:8443"]
  skip_verify = true
`)
	write(t, filepath.Join(dir, "localhost_5000_", "hosts.toml"), `
[host."https://mirror.example"]
`)
	write(t, filepath.Join(dir, "_default", "hosts.toml"), `
server = "https://default-server.example/sub"
[host."https://everything-mirror.example"]
  capabilities = ["resolve"]
`)
	r := New(Options{HostsDir: dir})
	eps, err := r.Endpoints("ghcr.io", "acme/filter", "1.0", "")
	if err != nil {
		t.Fatal(err)
	}
	want := `http://10.0.0.5:5000/v2 acme/filter [pull] mirror
https://cache.internal/prefix/ghcr acme/filter [resolve,pull] mirror ca header
https://alpha.internal:8443/v2 acme/filter [resolve,pull] mirror skip_verify
https://ghcr.io/v2 acme/filter [resolve,pull]`
	if got := summary(eps); got != want {
		t.Fatalf("ghcr.io endpoints:\n%s\nwant:\n%s", got, want)
	}
	if h := eps[1].Header; h.Get("X-Team") != "wasm" || len(h.Values("X-List")) != 2 {
		t.Errorf("headers: %v", h)
	}
	if !bytes.Contains(eps[1].RootCAs, []byte("BEGIN CERTIFICATE")) {
		t.Errorf("ca not read")
	}
	// host:port looks in host_port_ first.
	eps, _ = r.Endpoints("localhost:5000", "x", "", "sha256:"+strings.Repeat("a", 64))
	if got := summary(eps); got != "https://mirror.example/v2 x [resolve,pull] mirror\nhttps://localhost:5000/v2 x [resolve,pull]" {
		t.Fatalf("localhost:5000:\n%s", got)
	}
	// Anything else takes _default, with its server in place of the registry.
	eps, _ = r.Endpoints("quay.io", "a/b", "1", "")
	if got := summary(eps); got != "https://everything-mirror.example/v2 a/b [resolve] mirror\nhttps://default-server.example/sub/v2 a/b [resolve,pull]" {
		t.Fatalf("_default:\n%s", got)
	}
	for _, hp := range []string{"10.0.0.5:5000", "cache.internal:443", "alpha.internal:8443", "default-server.example:443"} {
		if !r.Names(hp) {
			t.Errorf("Names(%s) = false", hp)
		}
	}
	for _, hp := range []string{"10.0.0.5:5001", "cache.internal:80", "other.example:443"} {
		if r.Names(hp) {
			t.Errorf("Names(%s) = true", hp)
		}
	}
}

func TestNothingConfigured(t *testing.T) {
	r := New(Options{HostsDir: filepath.Join(t.TempDir(), "missing"), RegistriesConf: filepath.Join(t.TempDir(), "registries.conf")})
	eps, err := r.Endpoints("ghcr.io", "a/b", "1", "")
	if err != nil {
		t.Fatal(err)
	}
	if got := summary(eps); got != "https://ghcr.io/v2 a/b [resolve,pull]" {
		t.Fatalf("got\n%s", got)
	}
}

func TestBadHostsFileKeepsLastGood(t *testing.T) {
	dir := t.TempDir()
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	file := filepath.Join(dir, "ghcr.io", "hosts.toml")
	write(t, file, `[host."https://good.example"]`+"\n")
	r := New(Options{HostsDir: dir, Metrics: m, Log: slog.New(slog.NewTextHandler(&logs, nil))})
	bad := map[string]string{
		"syntax":           "[host.\"https://x\"\ncapabilities = [\n",
		"unknown cap":      "[host.\"https://x\"]\ncapabilities = [\"fly\"]\n",
		"missing ca":       "[host.\"https://x\"]\nca = \"nope.pem\"\n",
		"ca type":          "[host.\"https://x\"]\nca = 3\n",
		"not a URL":        "[host.\"https://x/%zz\"]\n",
		"header type":      "[host.\"https://x\"]\nheader = {a = 1}\n",
		"server with user": "server = \"https://u:p@x\"\n",
	}
	n := 0
	for name, data := range bad {
		write(t, file, data)
		r.Reload()
		n++
		eps, _ := r.Endpoints("ghcr.io", "a", "1", "")
		if got := summary(eps); got != "https://good.example/v2 a [resolve,pull] mirror\nhttps://ghcr.io/v2 a [resolve,pull]" {
			t.Errorf("%s: the last good file is not in force:\n%s", name, got)
		}
		if got := testutil.ToFloat64(m.errors.WithLabelValues("hosts.toml")); got != float64(n) {
			t.Errorf("%s: errors_total = %v, want %d", name, got, n)
		}
		if got := testutil.ToFloat64(m.good.WithLabelValues("hosts.toml")); got != 0 {
			t.Errorf("%s: valid = %v", name, got)
		}
	}
	if !strings.Contains(logs.String(), file) || !strings.Contains(logs.String(), "unknown capability") {
		t.Errorf("the log does not say which file and why:\n%s", logs.String())
	}
	write(t, file, `[host."https://new.example"]`+"\n")
	r.Reload()
	eps, _ := r.Endpoints("ghcr.io", "a", "1", "")
	if eps[0].Registry != "new.example" || testutil.ToFloat64(m.good.WithLabelValues("hosts.toml")) != 1 {
		t.Errorf("a fixed file is not applied: %s", summary(eps))
	}
}

func TestRegistriesConf(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "registries.conf")
	write(t, conf, `
unqualified-search-registries = ["docker.io"]

[[registry]]
prefix = "ghcr.io/acme"
location = "ghcr.io/acme-prod"

[[registry.mirror]]
location = "127.0.0.1:5001/ghcr-acme"
insecure = true

[[registry.mirror]]
location = "digest-mirror.example/acme"
pull-from-mirror = "digest-only"

[[registry.mirror]]
location = "tag-mirror.example/acme"
pull-from-mirror = "tag-only"

[[registry]]
location = "blocked.example"
blocked = true
`)
	write(t, filepath.Join(dir, "registries.conf.d", "50-quay.conf"), `
[[registry]]
prefix = "quay.io"
location = "quay.io"
[[registry.mirror]]
location = "quay-mirror.example:5000"
`)
	r := New(Options{RegistriesConf: conf})
	eps, err := r.Endpoints("ghcr.io", "acme/filters/x", "1.0", "")
	if err != nil {
		t.Fatal(err)
	}
	want := `https://127.0.0.1:5001/v2 ghcr-acme/filters/x [resolve,pull] mirror skip_verify insecure
https://tag-mirror.example/v2 acme/filters/x [resolve,pull] mirror
https://ghcr.io/v2 acme-prod/filters/x [resolve,pull]`
	if got := summary(eps); got != want {
		t.Fatalf("tag:\n%s\nwant:\n%s", got, want)
	}
	eps, err = r.Endpoints("ghcr.io", "acme/filters/x", "", "sha256:"+strings.Repeat("b", 64))
	if err != nil {
		t.Fatal(err)
	}
	want = `https://127.0.0.1:5001/v2 ghcr-acme/filters/x [resolve,pull] mirror skip_verify insecure
https://digest-mirror.example/v2 acme/filters/x [resolve,pull] mirror
https://ghcr.io/v2 acme-prod/filters/x [resolve,pull]`
	if got := summary(eps); got != want {
		t.Fatalf("digest:\n%s\nwant:\n%s", got, want)
	}
	// The drop-in directory is read.
	eps, _ = r.Endpoints("quay.io", "a/b", "1", "")
	if got := summary(eps); got != "https://quay-mirror.example:5000/v2 a/b [resolve,pull] mirror\nhttps://quay.io/v2 a/b [resolve,pull]" {
		t.Fatalf("drop-in:\n%s", got)
	}
	// Other registries are untouched.
	eps, _ = r.Endpoints("docker.io", "library/busybox", "1", "")
	if got := summary(eps); got != "https://docker.io/v2 library/busybox [resolve,pull]" {
		t.Fatalf("docker.io:\n%s", got)
	}
	if _, err := r.Endpoints("blocked.example", "x", "1", ""); !errors.Is(err, errdefs.ErrRegistryBlocked) {
		t.Fatalf("blocked: %v", err)
	}
	if !r.Names("127.0.0.1:5001") || !r.Names("quay-mirror.example:5000") || r.Names("127.0.0.1:5002") {
		t.Error("Names does not match the mirrors")
	}

	// A file that stops parsing keeps the last good configuration.
	reg := prometheus.NewRegistry()
	m, _ := NewMetrics(reg)
	r.opts.Metrics = m
	write(t, conf, "[[registry]\nprefix = \n")
	r.Reload()
	if got := testutil.ToFloat64(m.errors.WithLabelValues("registries.conf")); got != 1 {
		t.Errorf("errors_total = %v", got)
	}
	eps, _ = r.Endpoints("ghcr.io", "acme/filters/x", "1.0", "")
	if len(eps) != 3 || eps[2].Repository != "acme-prod/filters/x" {
		t.Fatalf("last good not kept:\n%s", summary(eps))
	}
}

func TestBothFiles(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "certs.d", "ghcr.io", "hosts.toml"), `[host."http://containerd-mirror.example"]`+"\n")
	conf := filepath.Join(dir, "containers", "registries.conf")
	write(t, conf, `
[[registry]]
location = "ghcr.io"
[[registry.mirror]]
location = "crio-mirror.example"
`)
	r := New(Options{HostsDir: filepath.Join(dir, "certs.d"), RegistriesConf: conf})
	eps, err := r.Endpoints("ghcr.io", "a", "1", "")
	if err != nil {
		t.Fatal(err)
	}
	want := `http://containerd-mirror.example/v2 a [resolve,pull] mirror
https://crio-mirror.example/v2 a [resolve,pull] mirror
https://ghcr.io/v2 a [resolve,pull]`
	if got := summary(eps); got != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
}

func TestRunRereads(t *testing.T) {
	dir := t.TempDir()
	hosts := filepath.Join(dir, "certs.d")
	conf := filepath.Join(dir, "containers", "registries.conf")
	if err := os.MkdirAll(hosts, 0o755); err != nil {
		t.Fatal(err)
	}
	r := New(Options{HostsDir: hosts, RegistriesConf: conf, Debounce: 20 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- r.Run(ctx) }()
	defer func() {
		cancel()
		<-done
	}()
	waitFor := func(what, registry, want string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			eps, _ := r.Endpoints(registry, "a", "1", "")
			if eps[0].Registry == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: first endpoint still %s, want %s", what, eps[0].Registry, want)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	// A registry directory that appears after start, then a change in it.
	time.Sleep(50 * time.Millisecond)
	write(t, filepath.Join(hosts, "ghcr.io", "hosts.toml"), `[host."https://one.example"]`+"\n")
	waitFor("new hosts.toml", "ghcr.io", "one.example")
	write(t, filepath.Join(hosts, "ghcr.io", "hosts.toml"), `[host."https://two.example"]`+"\n")
	waitFor("changed hosts.toml", "ghcr.io", "two.example")
	// registries.conf created after start, then a drop-in.
	write(t, conf, "[[registry]]\nlocation = \"quay.io\"\n[[registry.mirror]]\nlocation = \"three.example\"\n")
	waitFor("new registries.conf", "quay.io", "three.example")
	write(t, filepath.Join(dir, "containers", "registries.conf.d", "10.conf"), "[[registry]]\nlocation = \"docker.io\"\n[[registry.mirror]]\nlocation = \"four.example\"\n")
	waitFor("drop-in", "docker.io", "four.example")
	// Removing a hosts.toml removes its mirrors.
	if err := os.RemoveAll(filepath.Join(hosts, "ghcr.io")); err != nil {
		t.Fatal(err)
	}
	waitFor("removed hosts.toml", "ghcr.io", "ghcr.io")
}
