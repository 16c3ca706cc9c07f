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

// mirrorStep is one publish of a new module through a runtime's mirror
// configuration, and where its blob must come from.
type mirrorStep struct {
	name                   string // in messages
	mod                    string // module(t, mod): the module, new to the test
	origin, mirror         string // repo:tag it is pushed as on each, "" for not there
	image                  string // what the pod asks for
	byDigest               bool   // image + "@" + the manifest's digest
	fault                  registrytest.FaultFunc
	fromMirror, fromOrigin int // blob downloads of the module from each
}

// runMirrorSteps pushes each step's module, publishes it with the step's
// fault on the mirror (removed after), checks the mounted file and counts
// where its blob came from.
func runMirrorSteps(t *testing.T, e *env, origin, mirror *registrytest.Registry, steps ...mirrorStep) {
	t.Helper()
	for _, s := range steps {
		mod := module(t, s.mod)
		var d digest.Digest
		if s.origin != "" {
			d = pushTo(t, s.origin, mod, origin)
		}
		if s.mirror != "" {
			d = pushTo(t, s.mirror, mod, mirror)
		}
		image := s.image
		if s.byDigest {
			image += "@" + d.String()
		}
		if s.fault != nil {
			mirror.SetFault(s.fault)
		}
		checkFile(t, e.mustPublish(image, nil), "plugin.wasm", mod)
		if s.fault != nil {
			mirror.SetFault(nil)
		}
		checkServed(t, s.name, mod, origin, mirror, s.fromMirror, s.fromOrigin)
	}
}

// checkServed checks how many times mod's blob was downloaded from the
// mirror and from the origin.
func checkServed(t *testing.T, name string, mod []byte, origin, mirror *registrytest.Registry, fromMirror, fromOrigin int) {
	t.Helper()
	b := digest.FromBytes(mod)
	if m, o := mirror.BlobGets(b), origin.BlobGets(b); m != fromMirror || o != fromOrigin {
		t.Errorf("%s: blob downloads mirror %d origin %d, want %d and %d", name, m, o, fromMirror, fromOrigin)
	}
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

	runMirrorSteps(t, e, origin, mirror,
		// On both: the mirror serves it.
		mirrorStep{name: "A", mod: "a", origin: "ht/a:1", mirror: "ht/a:1", image: img("ht/a:1"), fromMirror: 1},
		// Not on the mirror (404): the registry.
		mirrorStep{name: "B", mod: "b", origin: "ht/b:1", image: img("ht/b:1"), fromOrigin: 1},
		// The mirror answers 503: the registry.
		mirrorStep{name: "C", mod: "c", origin: "ht/c:1", mirror: "ht/c:1", image: img("ht/c:1"), fromOrigin: 1,
			fault: func(*http.Request) (int, bool) { return http.StatusServiceUnavailable, true }},
	)

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
	checkServed(t, "D", dmod, origin, mirror, 1, 1)
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
	runMirrorSteps(t, e, origin, mirror, mirrorStep{name: "F", mod: "f", origin: "ht/f:1", mirror: "ht/f:1", image: img("ht/f:1"), fromMirror: 1})
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

	runMirrorSteps(t, e, origin, mirror,
		// prefix -> location, and the mirror's own path.
		mirrorStep{name: "A", mod: "a", origin: "real/a:1", mirror: "mirrored/a:1", image: o + "/team/a:1", fromMirror: 1},
		// The mirror down: the location.
		mirrorStep{name: "B", mod: "b", origin: "real/b:1", mirror: "mirrored/b:1", image: o + "/team/b:1", fromOrigin: 1,
			fault: func(*http.Request) (int, bool) { return 0, true }},
		// digest-only: a tag goes to the registry, a digest to the mirror.
		mirrorStep{name: "C by tag", mod: "c", origin: "pinned/c:1", mirror: "pinned/c:1", image: o + "/pinned/c:1", fromOrigin: 1},
		mirrorStep{name: "D by digest", mod: "d", origin: "pinned/d:1", mirror: "pinned/d:1", image: o + "/pinned/d", byDigest: true, fromMirror: 1},
	)

	// Blocked: PermissionDenied, no request made.
	err := e.publish(e.request(harness.NewPod("blocked"), "wasm", map[string]string{"image": "blocked.example/x:1"}))
	wantCode(t, err, codes.PermissionDenied, "blocked")

	// A drop-in added live.
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
	runMirrorSteps(t, e, origin, mirror, mirrorStep{name: "F", mod: "f", mirror: "dropin/f:1", image: o + "/dropin/f:1", fromMirror: 1})

	// A file that does not parse keeps the last good configuration.
	writeFile(t, conf, "[[registry]\nprefix = \n")
	eventually(t, "the refusal of the bad registries.conf", func() bool {
		return strings.Contains(e.d.Logs(), "registries.conf not applied")
	})
	if s := scrape(t, e.d); !strings.Contains(s, `wasmcsi_runtime_config_valid{file="registries.conf"} 0`) {
		t.Errorf("metrics do not count the bad file:\n%s", grepLines(s, "runtime_config"))
	}
	runMirrorSteps(t, e, origin, mirror, mirrorStep{name: "G", mod: "g", origin: "real/g:1", mirror: "mirrored/g:1", image: o + "/team/g:1", fromMirror: 1})
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
