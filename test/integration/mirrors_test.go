package integration

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

// hostDir is containerd's directory name for a host:port ("host_port_").
func hostDir(hostport string) string {
	i := strings.LastIndex(hostport, ":")
	return hostport[:i] + "_" + hostport[i+1:] + "_"
}

func writeFile(t *testing.T, path, body string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	writeConfig(t, path, body)
}

// pushTo pushes mod as repoTag to each registry directly (uncounted).
func pushTo(t *testing.T, repoTag string, mod []byte, regs ...*registrytest.Registry) digest.Digest {
	t.Helper()
	var d digest.Digest
	for _, r := range regs {
		desc, err := registrytest.PushWasm(context.Background(), r.Host()+"/"+repoTag, mod, registrytest.LayoutCNCF)
		if err != nil {
			t.Fatal(err)
		}
		d = desc.Digest
	}
	return d
}

// TestRuntimeHostsTOML: containerd's hosts.toml for the image's registry
// puts its hosts before the registry, in file order; a mirror that is
// refused, answers 5xx or 404, or sends bytes that do not match their
// digest passes the pull on; a pull-only mirror serves the bytes of a tag
// another host resolved; override_path and header reach the mirror; the
// file is re-read live, and one that does not parse keeps the last good.
// The mirrors are on loopback and named nowhere but in hosts.toml.
func TestRuntimeHostsTOML(t *testing.T) {
	t.Parallel()
	harness.RequireRoot(t)
	origin := registrytest.StartT(t, registrytest.Options{})
	mirror := registrytest.StartT(t, registrytest.Options{})
	certs := filepath.Join(t.TempDir(), "certs.d")
	hostsFile := filepath.Join(certs, hostDir(origin.ProxyHost()), "hosts.toml")
	mirrorFirst := fmt.Sprintf("server = \"http://%s\"\n[host.\"http://%s\"]\n", origin.ProxyHost(), mirror.ProxyHost())
	writeFile(t, hostsFile, mirrorFirst)
	cfg := filepath.Join(t.TempDir(), "config.yaml")
	writeConfig(t, cfg, "registries:\n  containerdHostsDir: "+certs+"\n")
	e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--config=" + cfg, "--insecure-registry=" + origin.ProxyHost()}})
	img := func(repoTag string) string { return origin.ProxyHost() + "/" + repoTag }
	served := func(name string, mod []byte, fromMirror, fromOrigin int) {
		t.Helper()
		d := digest.FromBytes(mod)
		if m, o := mirror.BlobGets(d), origin.BlobGets(d); m != fromMirror || o != fromOrigin {
			t.Errorf("%s: blob downloads mirror %d origin %d, want %d and %d", name, m, o, fromMirror, fromOrigin)
		}
	}

	// On both: the mirror serves it.
	a := module(t, "a")
	pushTo(t, "ht/a:1", a, origin, mirror)
	checkFile(t, e.mustPublish(img("ht/a:1"), nil), "plugin.wasm", a)
	served("A", a, 1, 0)

	// Not on the mirror (404): the registry.
	b := module(t, "b")
	pushTo(t, "ht/b:1", b, origin)
	checkFile(t, e.mustPublish(img("ht/b:1"), nil), "plugin.wasm", b)
	served("B", b, 0, 1)

	// The mirror answers 503: the registry.
	c := module(t, "c")
	pushTo(t, "ht/c:1", c, origin, mirror)
	mirror.SetFault(func(*http.Request) (int, bool) { return http.StatusServiceUnavailable, true })
	checkFile(t, e.mustPublish(img("ht/c:1"), nil), "plugin.wasm", c)
	served("C", c, 0, 1)
	mirror.SetFault(nil)

	// The mirror sends a module that does not match its digest: refused,
	// nothing of it stored, the registry's bytes used.
	dmod := module(t, "d")
	pushTo(t, "ht/d:1", dmod, origin, mirror)
	bad := append([]byte(nil), dmod...)
	bad[len(bad)-1] ^= 0xff
	mirror.SetInterceptor(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if blobGetPath(r, digest.FromBytes(dmod)) {
				w.Header().Set("Content-Length", fmt.Sprint(len(bad)))
				_, _ = w.Write(bad)
				return
			}
			next.ServeHTTP(w, r)
		})
	})
	checkFile(t, e.mustPublish(img("ht/d:1"), nil), "plugin.wasm", dmod)
	served("D", dmod, 1, 1)
	mirror.SetInterceptor(nil)
	e.checkStoreIntegrity()

	// Live: a first host that refuses connections, then the mirror as
	// pull-only: the tag is resolved by the registry, the bytes come from
	// the mirror.
	port, err := harness.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, hostsFile, fmt.Sprintf("server = \"http://%s\"\n[host.\"http://127.0.0.1:%d\"]\n[host.\"http://%s\"]\ncapabilities = [\"pull\"]\n",
		origin.ProxyHost(), port, mirror.ProxyHost()))
	eventually(t, "the changed hosts.toml", func() bool { return countLog(e.d, "containerd hosts.toml loaded") >= 2 })
	f := module(t, "f")
	pushTo(t, "ht/f:1", f, origin, mirror)
	checkFile(t, e.mustPublish(img("ht/f:1"), nil), "plugin.wasm", f)
	served("F", f, 1, 0)
	if n := mirror.Counts().ManifestHeads["ht/f:1"] + mirror.Counts().ManifestGets["ht/f:1"]; n != 0 {
		t.Errorf("the pull-only mirror was asked for the tag %d times", n)
	}
	if n := origin.Counts().ManifestHeads["ht/f:1"] + origin.Counts().ManifestGets["ht/f:1"]; n == 0 {
		t.Errorf("the registry did not resolve the tag")
	}

	// override_path and header: a mirror that serves its API under
	// /cache/api and only to requests with the header.
	// The proxy counts by /v2/ path, so blob GETs are counted here.
	g := module(t, "g")
	pushTo(t, "ht/g:1", g, mirror) // on the mirror only
	var viaPath sync.Map
	mirror.SetInterceptor(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			rest, ok := strings.CutPrefix(r.URL.Path, "/cache/api/")
			if !ok || r.Header.Get("X-Mirror-Token") != "s3cret" {
				http.Error(w, "wrong path or header", http.StatusForbidden)
				return
			}
			r.URL.Path = "/v2/" + rest
			if r.Method == http.MethodGet && strings.Contains(rest, "/blobs/") {
				n, _ := viaPath.LoadOrStore(rest[strings.LastIndex(rest, "/")+1:], new(atomic.Int32))
				n.(*atomic.Int32).Add(1)
			}
			next.ServeHTTP(w, r)
		})
	})
	servedViaPath := func(name string, mod []byte) {
		t.Helper()
		n, ok := viaPath.Load(digest.FromBytes(mod).String())
		if !ok || n.(*atomic.Int32).Load() != 1 {
			t.Errorf("%s was not downloaded once from the mirror's /cache/api root with the header", name)
		}
		if o := origin.BlobGets(digest.FromBytes(mod)); o != 0 {
			t.Errorf("%s: the origin served it %d times", name, o)
		}
	}
	writeFile(t, hostsFile, fmt.Sprintf("server = \"http://%s\"\n[host.\"http://%s/cache/api\"]\noverride_path = true\n[host.\"http://%s/cache/api\".header]\nX-Mirror-Token = \"s3cret\"\n",
		origin.ProxyHost(), mirror.ProxyHost(), mirror.ProxyHost()))
	eventually(t, "the hosts.toml with override_path", func() bool { return countLog(e.d, "containerd hosts.toml loaded") >= 3 })
	checkFile(t, e.mustPublish(img("ht/g:1"), nil), "plugin.wasm", g)
	servedViaPath("G", g)

	// A file that does not parse: said in the log and the metric; the last
	// good file stays in force.
	writeFile(t, hostsFile, "[host.\"http://x\"\ncapabilities = \n")
	eventually(t, "the refusal of the bad hosts.toml", func() bool {
		return strings.Contains(e.d.Logs(), "containerd hosts.toml not applied")
	})
	if m := scrape(t, e.d); strings.Contains(m, `wasmcsi_runtime_config_errors_total{file="hosts.toml"} 0`) ||
		!strings.Contains(m, `wasmcsi_runtime_config_errors_total{file="hosts.toml"}`) ||
		!strings.Contains(m, `wasmcsi_runtime_config_valid{file="hosts.toml"} 0`) {
		t.Errorf("metrics do not count the bad file:\n%s", grepLines(m, "runtime_config"))
	}
	h := module(t, "h")
	pushTo(t, "ht/h:1", h, mirror)
	checkFile(t, e.mustPublish(img("ht/h:1"), nil), "plugin.wasm", h)
	servedViaPath("H", h)
}

// TestRuntimeRegistriesConf: CRI-O's registries.conf rewrites a prefix to
// another location, tries its insecure mirror first (plain HTTP after the
// TLS attempt fails), falls back to the location, keeps a digest-only
// mirror to digests, reads registries.conf.d, and refuses a blocked
// registry with PermissionDenied before any request.
func TestRuntimeRegistriesConf(t *testing.T) {
	t.Parallel()
	harness.RequireRoot(t)
	origin := registrytest.StartT(t, registrytest.Options{})
	mirror := registrytest.StartT(t, registrytest.Options{})
	dir := filepath.Join(t.TempDir(), "containers")
	conf := filepath.Join(dir, "registries.conf")
	o, m := origin.ProxyHost(), mirror.ProxyHost()
	writeFile(t, conf, fmt.Sprintf(`
[[registry]]
prefix = "%[1]s/team"
location = "%[1]s/real"
insecure = true
[[registry.mirror]]
location = "%[2]s/mirrored"
insecure = true

[[registry]]
prefix = "%[1]s/pinned"
location = "%[1]s/pinned"
insecure = true
[[registry.mirror]]
location = "%[2]s/pinned"
insecure = true
pull-from-mirror = "digest-only"

[[registry]]
location = "blocked.example"
blocked = true
`, o, m))
	cfg := filepath.Join(t.TempDir(), "config.yaml")
	writeConfig(t, cfg, "registries:\n  registriesConf: "+conf+"\n")
	// The origin is not named by --insecure-registry: registries.conf's
	// insecure is what lets it be reached over plain HTTP on loopback.
	e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--config=" + cfg}})
	served := func(name string, mod []byte, fromMirror, fromOrigin int) {
		t.Helper()
		d := digest.FromBytes(mod)
		if mm, oo := mirror.BlobGets(d), origin.BlobGets(d); mm != fromMirror || oo != fromOrigin {
			t.Errorf("%s: blob downloads mirror %d origin %d, want %d and %d", name, mm, oo, fromMirror, fromOrigin)
		}
	}

	// prefix -> location, and the mirror's own path.
	a := module(t, "a")
	pushTo(t, "real/a:1", a, origin)
	pushTo(t, "mirrored/a:1", a, mirror)
	checkFile(t, e.mustPublish(o+"/team/a:1", nil), "plugin.wasm", a)
	served("A", a, 1, 0)
	// The mirror down: the location.
	b := module(t, "b")
	pushTo(t, "real/b:1", b, origin)
	pushTo(t, "mirrored/b:1", b, mirror)
	mirror.SetFault(func(*http.Request) (int, bool) { return 0, true })
	checkFile(t, e.mustPublish(o+"/team/b:1", nil), "plugin.wasm", b)
	served("B", b, 0, 1)
	mirror.SetFault(nil)

	// digest-only: a tag goes to the registry, a digest to the mirror.
	c := module(t, "c")
	pushTo(t, "pinned/c:1", c, origin)
	pushTo(t, "pinned/c:1", c, mirror)
	checkFile(t, e.mustPublish(o+"/pinned/c:1", nil), "plugin.wasm", c)
	served("C by tag", c, 0, 1)
	d := module(t, "d")
	pushTo(t, "pinned/d:1", d, origin)
	dd := pushTo(t, "pinned/d:1", d, mirror)
	checkFile(t, e.mustPublish(o+"/pinned/d@"+dd.String(), nil), "plugin.wasm", d)
	served("D by digest", d, 1, 0)

	// Blocked: PermissionDenied, no request made.
	err := e.publish(e.request(harness.NewPod("blocked"), "wasm", map[string]string{"image": "blocked.example/x:1"}))
	wantCode(t, err, codes.PermissionDenied, "blocked")

	// A drop-in added live.
	f := module(t, "f")
	pushTo(t, "dropin/f:1", f, mirror)
	writeFile(t, filepath.Join(dir, "registries.conf.d", "50-dropin.conf"), fmt.Sprintf(`
[[registry]]
prefix = "%[1]s/dropin"
location = "%[1]s/dropin"
insecure = true
[[registry.mirror]]
location = "%[2]s/dropin"
insecure = true
`, o, m))
	eventually(t, "the drop-in", func() bool { return countLog(e.d, "registries.conf loaded") >= 2 })
	checkFile(t, e.mustPublish(o+"/dropin/f:1", nil), "plugin.wasm", f)
	served("F", f, 1, 0)

	// A file that does not parse keeps the last good configuration.
	writeFile(t, conf, "[[registry]\nprefix = \n")
	eventually(t, "the refusal of the bad registries.conf", func() bool {
		return strings.Contains(e.d.Logs(), "registries.conf not applied")
	})
	if s := scrape(t, e.d); !strings.Contains(s, `wasmcsi_runtime_config_valid{file="registries.conf"} 0`) {
		t.Errorf("metrics do not count the bad file:\n%s", grepLines(s, "runtime_config"))
	}
	g := module(t, "g")
	pushTo(t, "real/g:1", g, origin)
	pushTo(t, "mirrored/g:1", g, mirror)
	checkFile(t, e.mustPublish(o+"/team/g:1", nil), "plugin.wasm", g)
	served("G", g, 1, 0)
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
