// Package registrytest runs a real OCI registry (distribution's registry
// binary) for integration tests, benchmarks and the demo, puts a counting,
// fault-injecting reverse proxy in front of it, and pushes Wasm modules in
// every image layout the driver accepts (see the README, "Image formats").
//
// Typical use:
//
//	reg := registrytest.StartT(t, registrytest.Options{})
//	desc, err := registrytest.PushWasm(ctx, reg.Host()+"/filters/header:1.0",
//		registrytest.Module("header", 4096), registrytest.LayoutCNCF)
//	// point the driver at reg.ProxyHost() so its downloads are counted:
//	image := reg.ProxyHost() + "/filters/header:1.0"
//
// Content pushed through Host() is not counted; everything that goes through
// ProxyHost() is.
package registrytest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"

	"github.com/opencontainers/go-digest"
	"golang.org/x/crypto/bcrypt"
)

// EnvRegistryBinary names the environment variable that overrides the path of
// the registry binary.
const EnvRegistryBinary = "WASM_CSI_REGISTRY_BIN"

// RegistryVersion is the version of github.com/distribution/distribution/v3
// whose cmd/registry this package is written against.
const RegistryVersion = "v3.1.2"

const (
	defaultStartTimeout = 30 * time.Second
	startAttempts       = 3
	logTailBytes        = 4 << 10
)

// Options configures Start.
type Options struct {
	// Htpasswd, when not empty, turns on htpasswd (HTTP basic) authentication
	// with these users (name -> password). Every request then needs
	// credentials, pulls included.
	Htpasswd map[string]string

	// Binary is the path of the registry binary. When empty, the environment
	// variable WASM_CSI_REGISTRY_BIN is used, else <repo root>/bin/registry,
	// the repo root being the first directory holding go.mod found walking up
	// from the working directory.
	Binary string

	// StartTimeout bounds how long Start waits for the registry to answer
	// GET /v2/ (default 30s). The context given to Start can cut it shorter.
	StartTimeout time.Duration

	// AllowIncompleteIndexes lets image indexes and manifest lists reference
	// manifests the registry does not hold (validation.manifests.indexes.
	// platforms: none). By default every entry must have been pushed first.
	AllowIncompleteIndexes bool

	// ProxyRemoteURL, when set, runs the registry as a pull-through cache
	// of that registry (distribution's proxy.remoteurl): a miss is fetched
	// from there, stored, and served. Such a registry refuses pushes.
	ProxyRemoteURL string
}

// FaultFunc decides, for one request arriving at the proxy, whether to answer
// it with an injected fault. When handled is true the request never reaches
// the registry: a status of 0 drops the connection without an answer, any
// other status is sent with a registry-style JSON error body.
type FaultFunc func(r *http.Request) (status int, handled bool)

// Counts is a snapshot of what the proxy has seen since start or the last
// ResetCounts. Requests answered by a fault are counted too.
type Counts struct {
	// Requests is every request the proxy received.
	Requests int
	// BlobGets and BlobHeads count GET and HEAD /v2/<name>/blobs/<digest> by
	// digest, whatever the repository.
	BlobGets  map[digest.Digest]int
	BlobHeads map[digest.Digest]int
	// ManifestGets and ManifestHeads count GET and HEAD
	// /v2/<name>/manifests/<reference>, keyed by "<name>:<tag>" or
	// "<name>@<digest>".
	ManifestGets  map[string]int
	ManifestHeads map[string]int
	// BytesSent is the response bytes (bodies) the proxy sent to clients.
	BytesSent int64
}

// Registry is a running registry process plus its counting proxy. Its
// methods are safe for concurrent use.
type Registry struct {
	dir      string
	logPath  string
	host     string
	cmd      *exec.Cmd
	exited   chan struct{}
	waitErr  error
	proxyLn  net.Listener
	proxySrv *http.Server
	proxyTr  *http.Transport
	users    map[string]string

	mu          sync.Mutex
	counts      Counts
	fault       FaultFunc
	interceptor func(http.Handler) http.Handler

	closeOnce sync.Once
	closeErr  error
}

// Start writes a registry configuration into a new temporary directory
// (filesystem storage there, deletes enabled, log level info, htpasswd auth
// when opts.Htpasswd is set), starts the registry binary on a free
// 127.0.0.1 port, starts the counting proxy on another, and returns once the
// registry answers GET /v2/. ctx bounds the start only; the registry runs
// until Close.
func Start(ctx context.Context, opts Options) (*Registry, error) {
	bin, err := registryBinary(opts.Binary)
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "registrytest-")
	if err != nil {
		return nil, fmt.Errorf("registrytest: creating registry directory: %w", err)
	}
	r := &Registry{dir: dir, logPath: filepath.Join(dir, "registry.log"), users: copyUsers(opts.Htpasswd)}
	if err := r.start(ctx, bin, opts); err != nil {
		_ = r.Close()
		return nil, err
	}
	return r, nil
}

// StartT is Start for tests: it fails t on error, and registers a Cleanup
// that closes the registry (printing the tail of the registry's log first
// when the test failed).
func StartT(t testing.TB, opts Options) *Registry {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r, err := Start(ctx, opts)
	if err != nil {
		t.Fatalf("registrytest: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("registrytest: tail of the registry log (%s):\n%s", r.host, r.LogTail())
		}
		if err := r.Close(); err != nil {
			t.Errorf("registrytest: %v", err)
		}
	})
	return r
}

func (r *Registry) start(ctx context.Context, bin string, opts Options) error {
	timeout := opts.StartTimeout
	if timeout <= 0 {
		timeout = defaultStartTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	htpasswdPath := ""
	if len(opts.Htpasswd) > 0 {
		htpasswdPath = filepath.Join(r.dir, "htpasswd")
		if err := writeHtpasswd(htpasswdPath, opts.Htpasswd); err != nil {
			return err
		}
	}
	secret := make([]byte, 16)
	if _, err := rand.Read(secret); err != nil {
		return fmt.Errorf("registrytest: generating http secret: %w", err)
	}

	var lastErr error
	for attempt := 0; attempt < startAttempts; attempt++ {
		port, err := harness.FreePort()
		if err != nil {
			return err
		}
		host := fmt.Sprintf("127.0.0.1:%d", port)
		cfg := registryConfig(filepath.Join(r.dir, "data"), host, hex.EncodeToString(secret), htpasswdPath, opts.AllowIncompleteIndexes)
		if opts.ProxyRemoteURL != "" {
			cfg += fmt.Sprintf("proxy:\n  remoteurl: %q\n", opts.ProxyRemoteURL)
		}
		cfgPath := filepath.Join(r.dir, "config.yml")
		if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
			return fmt.Errorf("registrytest: writing registry config: %w", err)
		}
		err = r.startProcess(ctx, bin, cfgPath, host)
		if err == nil {
			lastErr = nil
			break
		}
		lastErr = err
		var early *exitedEarlyError
		if !errors.As(err, &early) || !strings.Contains(early.log, "address already in use") || ctx.Err() != nil {
			// Only a process that lost its port between freePort and
			// the bind is worth another try.
			break
		}
	}
	if lastErr != nil {
		return lastErr
	}
	return r.startProxy()
}

type exitedEarlyError struct {
	err error
	log string
}

func (e *exitedEarlyError) Error() string { return e.err.Error() }
func (e *exitedEarlyError) Unwrap() error { return e.err }

func (r *Registry) startProcess(ctx context.Context, bin, cfgPath, host string) error {
	logFile, err := os.OpenFile(r.logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("registrytest: opening registry log: %w", err)
	}
	defer logFile.Close() // the child has its own copy of the descriptor
	cmd := exec.Command(bin, "serve", cfgPath)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Dir = r.dir
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("registrytest: starting %s: %w", bin, err)
	}
	exited := make(chan struct{})
	r.cmd, r.exited, r.host = cmd, exited, host
	go func() {
		r.waitErr = cmd.Wait()
		close(exited)
	}()

	client := &http.Client{Timeout: 2 * time.Second}
	ping := "http://" + host + "/v2/"
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, ping, nil)
		if err != nil {
			return fmt.Errorf("registrytest: building readiness request: %w", err)
		}
		resp, err := client.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			// 401 is the answer of a registry with auth: it is up.
			if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusUnauthorized {
				return nil
			}
		}
		select {
		case <-exited:
			log := r.LogTail()
			return &exitedEarlyError{
				err: fmt.Errorf("registrytest: registry %s exited before answering on %s (%v); log:\n%s", bin, host, r.waitErr, log),
				log: log,
			}
		case <-ctx.Done():
			r.kill()
			return fmt.Errorf("registrytest: registry did not answer GET %s: %w; log:\n%s", ping, ctx.Err(), r.LogTail())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (r *Registry) startProxy() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("registrytest: listening for the proxy: %w", err)
	}
	target := &url.URL{Scheme: "http", Host: r.host}
	r.proxyTr = &http.Transport{
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     30 * time.Second,
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			// Keep the client's Host so that the registry builds upload
			// Locations that point back at the proxy.
			pr.Out.Host = pr.In.Host
		},
		Transport: r.proxyTr,
		ErrorHandler: func(w http.ResponseWriter, req *http.Request, err error) {
			if req.Context().Err() != nil {
				return // the client went away
			}
			http.Error(w, "registrytest proxy: "+err.Error(), http.StatusBadGateway)
		},
	}
	r.proxyLn = ln
	r.proxySrv = &http.Server{
		Handler:           r.proxyHandler(rp),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go func() { _ = r.proxySrv.Serve(ln) }()
	return nil
}

func (r *Registry) proxyHandler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(rw http.ResponseWriter, req *http.Request) {
		r.count(req)
		w := &bytesWriter{ResponseWriter: rw, r: r}
		r.mu.Lock()
		fault, interceptor := r.fault, r.interceptor
		r.mu.Unlock()
		if fault != nil {
			if status, handled := fault(req); handled {
				if status == 0 {
					panic(http.ErrAbortHandler) // drops the connection, quietly
				}
				writeRegistryError(w, status)
				return
			}
		}
		if interceptor != nil {
			interceptor(next).ServeHTTP(w, req)
			return
		}
		next.ServeHTTP(w, req)
	})
}

func writeRegistryError(w http.ResponseWriter, status int) {
	code := "UNKNOWN"
	switch status {
	case http.StatusUnauthorized:
		code = "UNAUTHORIZED"
		w.Header().Set("WWW-Authenticate", `Basic realm="registrytest"`)
	case http.StatusForbidden:
		code = "DENIED"
	case http.StatusNotFound:
		code = "NAME_UNKNOWN"
	case http.StatusTooManyRequests:
		code = "TOOMANYREQUESTS"
	case http.StatusServiceUnavailable:
		code = "UNAVAILABLE"
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Docker-Distribution-Api-Version", "registry/2.0")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"errors":[{"code":%q,"message":"registrytest: injected fault (HTTP %d)"}]}`+"\n", code, status)
}

// bytesWriter counts the body bytes sent into the registry's counts.
type bytesWriter struct {
	http.ResponseWriter
	r *Registry
}

func (c *bytesWriter) Write(b []byte) (int, error) {
	n, err := c.ResponseWriter.Write(b)
	c.r.mu.Lock()
	c.r.counts.BytesSent += int64(n)
	c.r.mu.Unlock()
	return n, err
}

// Unwrap lets http.ResponseController (the reverse proxy's flushes) reach
// the connection's writer.
func (c *bytesWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }

// count records one request by kind.
func (r *Registry) count(req *http.Request) {
	kind, name, ref := classify(req.URL.Path)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.counts.Requests++
	switch {
	case kind == "blobs" && req.Method == http.MethodGet:
		increment(&r.counts.BlobGets, digest.Digest(ref))
	case kind == "blobs" && req.Method == http.MethodHead:
		increment(&r.counts.BlobHeads, digest.Digest(ref))
	case kind == "manifests" && req.Method == http.MethodGet:
		increment(&r.counts.ManifestGets, manifestKey(name, ref))
	case kind == "manifests" && req.Method == http.MethodHead:
		increment(&r.counts.ManifestHeads, manifestKey(name, ref))
	}
}

// classify splits /v2/<name>/(blobs|manifests)/<ref>. Upload paths
// (/v2/<name>/blobs/uploads/...) are neither.
func classify(path string) (kind, name, ref string) {
	rest, ok := strings.CutPrefix(path, "/v2/")
	if !ok {
		return "", "", ""
	}
	parts := strings.Split(rest, "/")
	if len(parts) < 3 {
		return "", "", ""
	}
	kind, ref = parts[len(parts)-2], parts[len(parts)-1]
	name = strings.Join(parts[:len(parts)-2], "/")
	switch kind {
	case "blobs":
		if !strings.Contains(ref, ":") {
			return "", "", ""
		}
	case "manifests":
	default:
		return "", "", ""
	}
	return kind, name, ref
}

func manifestKey(name, ref string) string {
	if strings.Contains(ref, ":") {
		return name + "@" + ref
	}
	return name + ":" + ref
}

// Host returns the registry's own address, "127.0.0.1:PORT". Requests to it
// are not counted.
func (r *Registry) Host() string { return r.host }

// ProxyHost returns the address of the counting, fault-injecting proxy in
// front of the registry, "127.0.0.1:PORT".
func (r *Registry) ProxyHost() string { return r.proxyLn.Addr().String() }

// Dir returns the registry's temporary directory (config, storage, log).
func (r *Registry) Dir() string { return r.dir }

// Users returns a copy of the htpasswd users (name -> password).
func (r *Registry) Users() map[string]string { return copyUsers(r.users) }

// BlobGets returns how many GET requests for the blob dgst the proxy
// received.
func (r *Registry) BlobGets(dgst digest.Digest) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.counts.BlobGets[dgst]
}

// TotalBlobGets returns how many blob GET requests the proxy received.
func (r *Registry) TotalBlobGets() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return sum(r.counts.BlobGets)
}

// ManifestGets returns how many manifest GET requests the proxy received.
func (r *Registry) ManifestGets() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return sum(r.counts.ManifestGets)
}

// ManifestHeads returns how many manifest HEAD requests the proxy received.
func (r *Registry) ManifestHeads() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return sum(r.counts.ManifestHeads)
}

// Counts returns a copy of all the proxy's counters.
func (r *Registry) Counts() Counts {
	r.mu.Lock()
	defer r.mu.Unlock()
	return Counts{
		Requests:      r.counts.Requests,
		BlobGets:      copyCounts(r.counts.BlobGets),
		BlobHeads:     copyCounts(r.counts.BlobHeads),
		ManifestGets:  copyCounts(r.counts.ManifestGets),
		ManifestHeads: copyCounts(r.counts.ManifestHeads),
		BytesSent:     r.counts.BytesSent,
	}
}

// ManifestRequests counts the manifest GETs and HEADs of repo the proxy
// saw, by tag or by digest: every pull of a tag starts with one.
func (r *Registry) ManifestRequests(repo string) int {
	c := r.Counts()
	n := 0
	for _, m := range []map[string]int{c.ManifestGets, c.ManifestHeads} {
		for key, v := range m {
			if strings.HasPrefix(key, repo+":") || strings.HasPrefix(key, repo+"@") {
				n += v
			}
		}
	}
	return n
}

// ResetCounts sets every proxy counter back to zero.
func (r *Registry) ResetCounts() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.counts = Counts{}
}

// SetFault installs f to answer requests at the proxy in place of the
// registry (see FaultFunc); nil removes it. Requests are counted before f
// sees them.
func (r *Registry) SetFault(f func(r *http.Request) (status int, handled bool)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.fault = f
}

// SetInterceptor wraps the proxy's forwarding handler with mw, for faults a
// status code cannot express (corrupted or truncated bodies, delays); nil
// removes it. It runs after the FaultFunc, when that did not handle the
// request.
func (r *Registry) SetInterceptor(mw func(next http.Handler) http.Handler) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.interceptor = mw
}

// LogTail returns the last few KiB of the registry's log.
func (r *Registry) LogTail() string {
	b, err := os.ReadFile(r.logPath)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	if len(b) > logTailBytes {
		b = b[len(b)-logTailBytes:]
		if i := bytes.IndexByte(b, '\n'); i >= 0 {
			b = b[i+1:]
		}
	}
	return string(b)
}

// Close stops the proxy, kills the registry and removes its directory. It is
// safe to call more than once.
func (r *Registry) Close() error {
	r.closeOnce.Do(func() {
		var errs []error
		if r.proxySrv != nil {
			if err := r.proxySrv.Close(); err != nil {
				errs = append(errs, fmt.Errorf("registrytest: closing proxy: %w", err))
			}
			r.proxyTr.CloseIdleConnections()
		}
		r.kill()
		if err := os.RemoveAll(r.dir); err != nil {
			errs = append(errs, fmt.Errorf("registrytest: removing %s: %w", r.dir, err))
		}
		r.closeErr = errors.Join(errs...)
	})
	return r.closeErr
}

func (r *Registry) kill() {
	if r.cmd == nil || r.cmd.Process == nil {
		return
	}
	select {
	case <-r.exited:
		return
	default:
	}
	_ = r.cmd.Process.Kill()
	<-r.exited
}

func registryBinary(override string) (string, error) {
	bin := override
	source := "Options.Binary"
	if bin == "" {
		bin, source = os.Getenv(EnvRegistryBinary), EnvRegistryBinary
	}
	if bin == "" {
		root, err := harness.RepoRoot()
		if err != nil {
			return "", err
		}
		bin, source = filepath.Join(root, "bin", "registry"), "the default location"
	}
	info, err := os.Stat(bin)
	if err != nil || info.IsDir() || info.Mode()&0o111 == 0 {
		return "", fmt.Errorf("registrytest: no registry binary at %s (%s): run make tools to build it "+
			"(GOBIN=<repo>/bin go install github.com/distribution/distribution/v3/cmd/registry@%s), or set %s",
			bin, source, RegistryVersion, EnvRegistryBinary)
	}
	return bin, nil
}

func registryConfig(dataDir, addr, secret, htpasswdPath string, incompleteIndexes bool) string {
	var b strings.Builder
	fmt.Fprintf(&b, "version: 0.1\n")
	fmt.Fprintf(&b, "log:\n  level: info\n")
	fmt.Fprintf(&b, "storage:\n  filesystem:\n    rootdirectory: %q\n  delete:\n    enabled: true\n", dataDir)
	fmt.Fprintf(&b, "http:\n  addr: %q\n  secret: %q\n", addr, secret)
	if htpasswdPath != "" {
		fmt.Fprintf(&b, "auth:\n  htpasswd:\n    realm: registrytest\n    path: %q\n", htpasswdPath)
	}
	if incompleteIndexes {
		fmt.Fprintf(&b, "validation:\n  manifests:\n    indexes:\n      platforms: none\n")
	}
	return b.String()
}

// writeHtpasswd writes bcrypt entries. The minimum cost keeps the registry's
// per-request password check cheap; these are test passwords.
func writeHtpasswd(path string, users map[string]string) error {
	names := make([]string, 0, len(users))
	for name := range users {
		if name == "" || strings.ContainsAny(name, ":\n") {
			return fmt.Errorf("registrytest: invalid htpasswd user name %q", name)
		}
		names = append(names, name)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, name := range names {
		hash, err := bcrypt.GenerateFromPassword([]byte(users[name]), bcrypt.MinCost)
		if err != nil {
			return fmt.Errorf("registrytest: hashing the password of %q: %w", name, err)
		}
		fmt.Fprintf(&b, "%s:%s\n", name, hash)
	}
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		return fmt.Errorf("registrytest: writing htpasswd: %w", err)
	}
	return nil
}

func copyUsers(m map[string]string) map[string]string {
	if len(m) == 0 {
		return nil
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func increment[K comparable](m *map[K]int, key K) {
	if *m == nil {
		*m = make(map[K]int)
	}
	(*m)[key]++
}

func copyCounts[K comparable](m map[K]int) map[K]int {
	out := make(map[K]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func sum[K comparable](m map[K]int) int {
	n := 0
	for _, v := range m {
		n += v
	}
	return n
}
