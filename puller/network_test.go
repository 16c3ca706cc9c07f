package puller_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/errdefs"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

// These tests run the puller against a real distribution registry on
// 127.0.0.1 (test/lib/registrytest), through its fault-injecting proxy, and
// plain httptest servers for redirect targets and token realms.

// memSink is a Sink in memory.
type memSink struct{ bytes.Buffer }

func (s *memSink) Reset() error { s.Buffer.Reset(); return nil }

// fixture is a registry holding one module at repo:1.0.
type fixture struct {
	reg *registrytest.Registry
	mod []byte
	ref puller.Reference
}

func newFixture(t *testing.T, opts registrytest.Options, size int, push ...registrytest.PushOption) *fixture {
	t.Helper()
	if _, err := os.Stat(filepath.Join("..", "bin", "registry")); err != nil && os.Getenv(registrytest.EnvRegistryBinary) == "" {
		t.Skip("no registry binary: run make tools")
	}
	reg := registrytest.StartT(t, opts)
	mod := registrytest.Module(t.Name(), size)
	if _, err := registrytest.PushWasm(context.Background(), reg.Host()+"/net/filter:1.0", mod, registrytest.LayoutCNCF, push...); err != nil {
		t.Fatal(err)
	}
	ref, err := puller.ParseReference(reg.ProxyHost() + "/net/filter:1.0")
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{reg: reg, mod: mod, ref: ref}
}

// pull resolves and pulls ref anonymously.
func pull(ctx context.Context, p *puller.Puller, ref puller.Reference) ([]byte, error) {
	attempts, err := p.Attempts(context.Background(), ref)
	if err != nil {
		return nil, err
	}
	desc, cred, err := p.ResolveWith(ctx, ref, attempts)
	if err != nil {
		return nil, err
	}
	var sink memSink
	if _, err := p.Pull(ctx, ref, desc, &sink, cred); err != nil {
		return nil, err
	}
	return sink.Bytes(), nil
}

func mustPull(t *testing.T, p *puller.Puller, f *fixture) {
	t.Helper()
	got, err := pull(context.Background(), p, f.ref)
	if err != nil {
		t.Fatalf("pull: %v", err)
	}
	if !bytes.Equal(got, f.mod) {
		t.Fatalf("pulled %d bytes, want the module's %d", len(got), len(f.mod))
	}
}

func wantKind(t *testing.T, err, kind error, contains ...string) {
	t.Helper()
	if !errors.Is(err, kind) {
		t.Fatalf("got %v, want %v", err, kind)
	}
	for _, s := range contains {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("%q does not say %q", err.Error(), s)
		}
	}
}

// counter is an httptest server that counts its requests.
type counter struct {
	*httptest.Server
	n atomic.Int64
}

func newCounter(t *testing.T, h http.HandlerFunc) *counter {
	c := &counter{}
	c.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.n.Add(1)
		h(w, r)
	}))
	t.Cleanup(c.Close)
	return c
}

func (c *counter) host() string { return strings.TrimPrefix(c.URL, "http://") }

// TestDialRefusesBlockedAddresses: loopback, link-local, metadata and
// configured networks are refused at the dial, before a byte is sent,
// including a DNS name that resolves to loopback; a host named by
// --insecure-registry is dialed.
func TestDialRefusesBlockedAddresses(t *testing.T) {
	t.Parallel()
	srv := newCounter(t, func(w http.ResponseWriter, r *http.Request) { http.NotFound(w, r) })
	_, port, _ := net.SplitHostPort(srv.host())
	ctx := context.Background()
	resolve := func(cfg puller.Config, image string) error {
		ref, err := puller.ParseReference(image)
		if err != nil {
			t.Fatal(err)
		}
		_, err = puller.New(cfg).Resolve(ctx, ref, puller.Credential{})
		return err
	}

	for _, c := range []struct {
		image string
		cfg   puller.Config
		says  []string
	}{
		// Nothing listens at these: the dial is refused before connect.
		{"169.254.169.254/latest/meta-data:1", puller.Config{}, []string{"169.254.169.254:443", "cloud metadata"}},
		{"169.254.169.254/x:1", puller.Config{InsecureRegistries: []string{"registry.example"}}, []string{"169.254.169.254:443"}},
		{"100.100.100.200/x:1", puller.Config{}, []string{"100.100.100.200", "Alibaba"}},
		{"169.254.10.20:5000/x:1", puller.Config{}, []string{"169.254.10.20", "link-local"}},
		{"203.0.113.7/x:1", puller.Config{BlockedCIDRs: []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")}},
			[]string{"203.0.113.7", "remove 203.0.113.0/24 from registries.blockedCIDRs"}},
		// A live server on loopback, not named: no request reaches it.
		{"127.0.0.1:" + port + "/x:1", puller.Config{}, []string{"127.0.0.1:" + port, "loopback", "--insecure-registry"}},
		{"localhost:" + port + "/x:1", puller.Config{InsecureRegistries: []string{"127.0.0.1:" + port}}, []string{"localhost:" + port, "loopback"}},
		{"0.0.0.0:" + port + "/x:1", puller.Config{}, []string{"0.0.0.0", "this host"}},
		{"[::ffff:127.0.0.1]:" + port + "/x:1", puller.Config{}, []string{"127.0.0.1", "loopback"}},
	} {
		err := resolve(c.cfg, c.image)
		wantKind(t, err, errdefs.ErrBlockedAddress, append([]string{c.image, "blocked address"}, c.says...)...)
	}
	if n := srv.n.Load(); n != 0 {
		t.Errorf("%d requests reached the loopback server", n)
	}

	// Named, the same server is reached (and answers 404).
	err := resolve(puller.Config{InsecureRegistries: []string{"localhost:" + port}}, "localhost:"+port+"/x:1")
	wantKind(t, err, errdefs.ErrNotFound)
	err = resolve(puller.Config{InsecureRegistries: []string{"127.0.0.1"}}, "127.0.0.1:"+port+"/x:1")
	wantKind(t, err, errdefs.ErrNotFound)
	if srv.n.Load() == 0 {
		t.Error("the named registry was not reached")
	}
}

// blobForwarder is "blob storage": it serves what the registry has at the
// same path.
func blobForwarder(t *testing.T, registryHost string) *counter {
	return newCounter(t, func(w http.ResponseWriter, r *http.Request) {
		resp, err := http.Get("http://" + registryHost + r.URL.Path)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		w.WriteHeader(resp.StatusCode)
		io.Copy(w, resp.Body)
	})
}

// TestRedirectFollowsTheSameRules: a registry redirects the module's blob
// to storage on an address that is not named: refused, and the storage gets
// no request; named, the redirect is followed and the pull works.
func TestRedirectFollowsTheSameRules(t *testing.T) {
	t.Parallel()
	f := newFixture(t, registrytest.Options{}, 64<<10)
	storage := blobForwarder(t, f.reg.Host())
	layer := digest.FromBytes(f.mod)
	f.reg.SetInterceptor(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+layer.String()) {
				http.Redirect(w, r, storage.URL+r.URL.Path, http.StatusTemporaryRedirect)
				return
			}
			next.ServeHTTP(w, r)
		})
	})

	p := puller.New(puller.Config{InsecureRegistries: []string{f.ref.Registry}})
	_, err := pull(context.Background(), p, f.ref)
	wantKind(t, err, errdefs.ErrBlockedAddress, f.ref.Original, storage.host(), "reached from registry "+f.ref.Registry, "loopback")
	if n := storage.n.Load(); n != 0 {
		t.Errorf("the blocked blob storage got %d requests", n)
	}

	p = puller.New(puller.Config{InsecureRegistries: []string{f.ref.Registry, storage.host()}})
	mustPull(t, p, f)
	if n := storage.n.Load(); n != 1 {
		t.Errorf("blob storage got %d requests, want 1", n)
	}
}

// TestTokenRealmFollowsTheSameRules: a registry asks for a bearer token
// from a realm on another port of its own host (which oras-go's own realm
// check lets through, as the same host name): the token request is refused
// at the dial, and the realm gets no request; named, the token is fetched
// and the pull works.
func TestTokenRealmFollowsTheSameRules(t *testing.T) {
	t.Parallel()
	f := newFixture(t, registrytest.Options{}, 4096)
	realm := newCounter(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"token":"good-token"}`)
	})
	f.reg.SetInterceptor(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("Authorization") != "Bearer good-token" {
				w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="%s/token",service="registrytest",scope="repository:net/filter:pull"`, realm.URL))
				http.Error(w, `{"errors":[{"code":"UNAUTHORIZED"}]}`, http.StatusUnauthorized)
				return
			}
			r.Header.Del("Authorization")
			next.ServeHTTP(w, r)
		})
	})

	p := puller.New(puller.Config{InsecureRegistries: []string{f.ref.Registry}})
	_, err := p.Resolve(context.Background(), f.ref, puller.Credential{})
	wantKind(t, err, errdefs.ErrBlockedAddress, f.ref.Original, realm.host(), "loopback")
	if n := realm.n.Load(); n != 0 {
		t.Errorf("the blocked token realm got %d requests", n)
	}

	p = puller.New(puller.Config{InsecureRegistries: []string{f.ref.Registry, realm.host()}})
	mustPull(t, p, f)
	if realm.n.Load() == 0 {
		t.Error("the named token realm was not asked for a token")
	}
}

// stallWriter sends the first n bytes of a body, then nothing until the
// client goes away or release is closed.
type stallWriter struct {
	http.ResponseWriter
	ctx     context.Context
	release <-chan struct{}
	n       int
}

func (s *stallWriter) Write(p []byte) (int, error) {
	if s.n <= 0 {
		select {
		case <-s.ctx.Done():
			return 0, s.ctx.Err()
		case <-s.release:
			return s.ResponseWriter.Write(p)
		}
	}
	k := min(len(p), s.n)
	n, err := s.ResponseWriter.Write(p[:k])
	s.n -= n
	if f, ok := s.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
	if err != nil || k == len(p) {
		return n, err
	}
	m, err := s.Write(p[k:])
	return n + m, err
}

// TestIdleBodyTimeout: the registry sends the module's headers and half
// its bytes, then stalls: the pull is cut off as Unavailable, and once the
// stall is gone a pull works.
func TestIdleBodyTimeout(t *testing.T) {
	t.Parallel()
	f := newFixture(t, registrytest.Options{}, 512<<10)
	layer := digest.FromBytes(f.mod)
	release := make(chan struct{})
	var once sync.Once
	t.Cleanup(func() { once.Do(func() { close(release) }) })
	var stalled atomic.Int64
	f.reg.SetInterceptor(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+layer.String()) && stalled.Add(1) == 1 {
				w = &stallWriter{ResponseWriter: w, ctx: r.Context(), release: release, n: len(f.mod) / 2}
			}
			next.ServeHTTP(w, r)
		})
	})
	p := puller.New(puller.Config{InsecureRegistries: []string{f.ref.Registry}, IdleTimeout: 500 * time.Millisecond})
	start := time.Now()
	_, err := pull(context.Background(), p, f.ref)
	wantKind(t, err, errdefs.ErrUnavailable, f.ref.Original, "sent nothing for 500ms", "retried")
	t.Logf("cut off after %v: %v", time.Since(start), err)
	if time.Since(start) > 20*time.Second {
		t.Errorf("the stalled pull took %v with a 500ms idle timeout", time.Since(start))
	}
	// The stall is over (only the first download stalled): a pull works.
	mustPull(t, p, f)
}

// TestResponseHeaderTimeout: a registry that never answers a request is
// cut off after the header timeout, retried inside the retry budget, and
// the pull fails Unavailable instead of hanging.
func TestResponseHeaderTimeout(t *testing.T) {
	t.Parallel()
	f := newFixture(t, registrytest.Options{}, 4096)
	var hang atomic.Bool
	hang.Store(true)
	var asked atomic.Int64
	f.reg.SetInterceptor(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if hang.Load() {
				asked.Add(1)
				<-r.Context().Done()
				return
			}
			next.ServeHTTP(w, r)
		})
	})
	p := puller.New(puller.Config{InsecureRegistries: []string{f.ref.Registry},
		ResponseHeaderTimeout: 300 * time.Millisecond, RetryBudget: 2 * time.Second})
	start := time.Now()
	_, err := pull(context.Background(), p, f.ref)
	wantKind(t, err, errdefs.ErrUnavailable, f.ref.Original)
	if took := time.Since(start); took > 20*time.Second {
		t.Errorf("a hanging registry held the pull %v", took)
	}
	if n := asked.Load(); n < 2 {
		t.Errorf("the registry was asked %d times: a header timeout was not retried", n)
	}
	hang.Store(false)
	mustPull(t, p, f)
}

// failFirst answers the first n requests (of any kind) with status (0
// drops the connection), then lets the rest through.
func failFirst(reg *registrytest.Registry, n int64, status int) *atomic.Int64 {
	var seen atomic.Int64
	reg.SetFault(func(r *http.Request) (int, bool) {
		if seen.Add(1) <= n {
			return status, true
		}
		return 0, false
	})
	return &seen
}

// TestRetries: 503 twice, then OK, and a connection dropped once, on a
// fresh connection (which net/http does not retry on its own), then OK:
// both pulls succeed without an error.
func TestRetries(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name   string
		n      int64
		status int
	}{
		{"503-twice", 2, http.StatusServiceUnavailable},
		{"connection-dropped", 1, 0},
		{"429-once", 1, http.StatusTooManyRequests},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t, registrytest.Options{}, 4096)
			seen := failFirst(f.reg, c.n, c.status)
			// A new puller: its first request goes on a new connection.
			mustPull(t, puller.New(puller.Config{InsecureRegistries: []string{f.ref.Registry}}), f)
			if got := seen.Load(); got <= c.n {
				t.Errorf("%d requests, want more than the %d that failed", got, c.n)
			}
		})
	}
}

// TestRetryBudget: a registry that always answers 503 is retried with
// backoff, and given up on once the budget is spent.
func TestRetryBudget(t *testing.T) {
	t.Parallel()
	f := newFixture(t, registrytest.Options{}, 4096)
	seen := failFirst(f.reg, 1<<30, http.StatusServiceUnavailable)
	p := puller.New(puller.Config{InsecureRegistries: []string{f.ref.Registry}, RetryBudget: 500 * time.Millisecond})
	_, err := p.Resolve(context.Background(), f.ref, puller.Credential{})
	wantKind(t, err, errdefs.ErrUnavailable, f.ref.Original, "503")
	if n := seen.Load(); n < 2 || n > 3 {
		t.Errorf("%d requests in a 500ms budget (waits of 200ms, then 500ms), want 2 or 3", n)
	}
	// The default: oras-go's 5 retries.
	seen.Store(0)
	_, err = puller.New(puller.Config{InsecureRegistries: []string{f.ref.Registry}}).Resolve(context.Background(), f.ref, puller.Credential{})
	wantKind(t, err, errdefs.ErrUnavailable, "503")
	if n := seen.Load(); n != 6 {
		t.Errorf("%d requests with the default budget, want 6 (5 retries)", n)
	}
}

// TestUnauthorizedNamesSourcesNotSecrets: against an htpasswd registry, a
// pod's secret and the node's --docker-config with wrong passwords: the
// error names both sources, never a password or its base64 form; the right
// password pulls.
func TestUnauthorizedNamesSourcesNotSecrets(t *testing.T) {
	t.Parallel()
	const user, pass = "alice", "s3cret-Pa55word"
	f := newFixture(t, registrytest.Options{Htpasswd: map[string]string{user: pass}}, 4096, registrytest.WithBasicAuth(user, pass))
	config := func(password string) []byte {
		auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
		return []byte(fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, f.ref.Registry, auth))
	}
	const podPass, nodePass = "wr0ng-pod-Pa55", "wr0ng-node-Pa55"
	secret, err := puller.ParseDockerConfigJSON("secret team-a/registry-creds", config(podPass))
	if err != nil {
		t.Fatal(err)
	}
	nodeFile := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(nodeFile, config(nodePass), 0o600); err != nil {
		t.Fatal(err)
	}
	p := puller.New(puller.Config{InsecureRegistries: []string{f.ref.Registry}, DockerConfig: nodeFile})
	attempts, err := p.Attempts(context.Background(), f.ref, secret)
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = p.ResolveWith(context.Background(), f.ref, attempts)
	wantKind(t, err, errdefs.ErrUnauthorized, f.ref.Original, "secret team-a/registry-creds", "node --docker-config")
	for _, leaked := range []string{podPass, nodePass, pass,
		base64.StdEncoding.EncodeToString([]byte(user + ":" + podPass)),
		base64.StdEncoding.EncodeToString([]byte(user + ":" + nodePass))} {
		if strings.Contains(err.Error(), leaked) {
			t.Errorf("the error %q holds a secret", err)
		}
	}

	good, err := puller.ParseDockerConfigJSON("secret team-a/good", config(pass))
	if err != nil {
		t.Fatal(err)
	}
	attempts, err = p.Attempts(context.Background(), f.ref, secret, good)
	if err != nil {
		t.Fatal(err)
	}
	desc, cred, err := p.ResolveWith(context.Background(), f.ref, attempts)
	if err != nil {
		t.Fatalf("with the right password: %v", err)
	}
	if cred.Source != "secret team-a/good" {
		t.Errorf("resolved with %q, want the good secret", cred.Source)
	}
	var sink memSink
	if _, err := p.Pull(context.Background(), f.ref, desc, &sink, cred); err != nil || !bytes.Equal(sink.Bytes(), f.mod) {
		t.Fatalf("pull with the right password: %v", err)
	}
}
