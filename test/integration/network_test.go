package integration

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

// The registry is broken or hostile, the node must not be: these tests
// give the daemon registries that fail, hang, redirect and sit on
// addresses it must not dial. Each starts a registry of its own, so its
// faults touch no other test and it runs in parallel.

// dampedMarker is what a publish refused by the damping of a failing
// image says.
const dampedMarker = "retrying after"

// publishRetrying publishes req the way kubelet retries it: while the
// answer is a failure the daemon's damping held back, it waits a little and
// asks again, for up to a minute.
func (e *env) publishRetrying(req *csipb.NodePublishVolumeRequest) error {
	deadline := time.Now().Add(time.Minute)
	for {
		err := e.publish(req)
		if err == nil || !strings.Contains(status.Convert(err).Message(), dampedMarker) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// hostAddr returns an IPv4 address of this host that is not loopback or
// link-local, so a registry can be reached on an address the daemon does
// not block by default; it skips the test when there is none.
func hostAddr(t *testing.T) netip.Addr {
	t.Helper()
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		ipnet, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(ipnet.IP)
		if ip = ip.Unmap(); ok && ip.Is4() && !ip.IsLoopback() && !ip.IsLinkLocalUnicast() && !ip.IsUnspecified() {
			return ip
		}
	}
	t.Skip("this host has no IPv4 address besides loopback and link-local")
	return netip.Addr{}
}

// forwarder listens on ip and forwards every connection to target. It
// returns its address, "IP:PORT".
func forwarder(t *testing.T, ip netip.Addr, target string) string {
	t.Helper()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(ip, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", target)
			if err != nil {
				in.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, in, out)
			mu.Unlock()
			wg.Add(2)
			go func() { defer wg.Done(); io.Copy(out, in); out.Close() }()
			go func() { defer wg.Done(); io.Copy(in, out); in.Close() }()
		}
	}()
	return ln.Addr().String()
}

// nonLoopback returns the address of a forwarder to target on an address
// of this host that is not blocked by default.
func nonLoopback(t *testing.T, target string) string {
	return forwarder(t, hostAddr(t), target)
}

// ownRegistry starts a registry for one test and pushes a module of size
// bytes at repo:1.0. It returns the registry, the module, and how the
// daemon names the image (through the counting proxy).
func ownRegistry(t *testing.T, size int) (*registrytest.Registry, []byte, string) {
	t.Helper()
	r := registrytest.StartT(t, registrytest.Options{})
	mod := wasmgen.ProxyWasm(wasmgen.Options{Message: t.Name(), PadTo: size})
	if _, err := registrytest.PushWasm(context.Background(), r.Host()+"/net/filter:1.0", mod, registrytest.LayoutCNCF); err != nil {
		t.Fatal(err)
	}
	return r, mod, r.ProxyHost() + "/net/filter:1.0"
}

// TestBlockedAddresses: the daemon does not dial loopback, link-local or
// metadata addresses for a pod's image, named by address or by a DNS name
// that resolves to one, unless --insecure-registry names the host. The
// refusal is InvalidArgument, names the image, the host, the address, the
// rule and the way to allow it, and no request reaches the registry.
func TestBlockedAddresses(t *testing.T) {
	t.Parallel()
	r, mod, img := ownRegistry(t, 4096)
	_, port, _ := net.SplitHostPort(r.ProxyHost())

	t.Run("loopback-not-named", func(t *testing.T) {
		t.Parallel()
		e := newEnvOpts(t, harness.DaemonOptions{})
		e.failPublish(t, map[string]string{"image": img}, codes.InvalidArgument,
			img, "blocked address", r.ProxyHost(), "127.0.0.0/8", "loopback", "--insecure-registry")
	})
	t.Run("named", func(t *testing.T) {
		t.Parallel()
		e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--insecure-registry=" + r.ProxyHost()}})
		// A DNS name for the same address is not the name given.
		viaName := "localhost:" + port + "/net/filter:1.0"
		e.failPublish(t, map[string]string{"image": viaName}, codes.InvalidArgument,
			viaName, "blocked address", "localhost:"+port, "resolves to 127.0.0.1", "loopback")
		for _, c := range []struct{ image, rule string }{
			{"169.254.169.254/latest/meta-data:1", "cloud metadata"},
			{"169.254.10.1:5000/filters/x:1", "link-local"},
			{"100.100.100.200/filters/x:1", "cloud metadata"},
			{"[fd00:ec2::254]/filters/x:1", "cloud metadata"},
		} {
			e.failPublish(t, map[string]string{"image": c.image}, codes.InvalidArgument, c.image, "blocked address", c.rule)
		}
		// The named host itself works.
		req := e.mustPublish(img, nil)
		checkFile(t, req, "plugin.wasm", mod)
		e.mustUnpublish(req)
	})
	t.Cleanup(func() {
		// Only the named daemon's one pull reached the registry.
		if n := r.BlobGets(digest.FromBytes(mod)); n != 1 {
			t.Errorf("the module was downloaded %d times, want 1 (by the daemon that names the registry)", n)
		}
	})
}

// TestBlockedCIDRs: registries.blockedCIDRs of the config file blocks a
// network that is not blocked by default, the config's reload lifts it,
// and naming the host allows it.
func TestBlockedCIDRs(t *testing.T) {
	t.Parallel()
	r, mod, _ := ownRegistry(t, 4096)
	fwd := nonLoopback(t, r.ProxyHost())
	ip, _, _ := net.SplitHostPort(fwd)
	img := fwd + "/net/filter:1.0"
	cfg := filepath.Join(t.TempDir(), "config.yaml")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(cfg+".tmp", []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(cfg+".tmp", cfg); err != nil {
			t.Fatal(err)
		}
	}
	write(fmt.Sprintf("registries:\n  blockedCIDRs: [%s/32]\n", ip))
	e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--config=" + cfg}})
	e.failPublish(t, map[string]string{"image": img}, codes.InvalidArgument,
		img, "blocked address", fwd, ip+"/32", "registries.blockedCIDRs")
	if n := r.Counts().Requests; n != 0 {
		t.Errorf("%d requests reached the blocked registry", n)
	}

	// until publishes a new pod's volume until its code is code (the
	// config is re-read in the background), and returns the request.
	until := func(code codes.Code, contains ...string) *csipb.NodePublishVolumeRequest {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			req := e.request(harness.NewPod("cidr"), "filter", map[string]string{"image": img})
			err := e.publish(req)
			if status.Code(err) == code || time.Now().After(deadline) {
				if code == codes.OK {
					if err != nil {
						t.Fatalf("publish: %v", err)
					}
				} else {
					wantCode(t, err, code, contains...)
				}
				return req
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	// Not blocked any more: dialed, over HTTPS, which a plain-HTTP
	// registry does not speak.
	write("registries:\n  blockedCIDRs: []\n")
	until(codes.Unavailable, img, "--insecure-registry")
	// Named (over plain HTTP), it works, even while its network is blocked.
	write(fmt.Sprintf("registries:\n  insecure: [%s]\n  blockedCIDRs: [%s/32]\n", fwd, ip))
	req := until(codes.OK)
	checkFile(t, req, "plugin.wasm", mod)
	e.mustUnpublish(req)
}

// TestRetriedFaults: a connection dropped once (on a new connection, which
// net/http does not retry on its own), then 503 twice, then 429: the
// daemon retries each with backoff and the publishes succeed with no
// error.
func TestRetriedFaults(t *testing.T) {
	t.Parallel()
	r := registrytest.StartT(t, registrytest.Options{})
	e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--insecure-registry=" + r.ProxyHost()}})
	for _, c := range []struct {
		name   string
		n      int64
		status int
	}{
		{"dropped", 1, 0}, // first: the daemon has no connection yet
		{"503-twice", 2, http.StatusServiceUnavailable},
		{"429", 1, http.StatusTooManyRequests},
	} {
		repo := "net/" + c.name
		mod := module(t, c.name)
		if _, err := registrytest.PushWasm(context.Background(), r.Host()+"/"+repo+":1.0", mod, registrytest.LayoutCNCF); err != nil {
			t.Fatal(err)
		}
		// The first n requests for the image and the first n for its
		// module fail.
		var manifests, blobs atomic.Int64
		layer := digest.FromBytes(mod)
		r.SetFault(func(req *http.Request) (int, bool) {
			switch {
			case strings.HasPrefix(req.URL.Path, "/v2/"+repo+"/manifests/") && manifests.Add(1) <= c.n:
				return c.status, true
			case blobGetPath(req, layer) && blobs.Add(1) <= c.n:
				return c.status, true
			}
			return 0, false
		})
		req := e.request(harness.NewPod(c.name), "filter", map[string]string{"image": r.ProxyHost() + "/" + repo + ":1.0"})
		if err := e.publish(req); err != nil {
			t.Fatalf("%s: publish through faults that retries get past: %v", c.name, err)
		}
		checkFile(t, req, "plugin.wasm", mod)
		if manifests.Load() <= c.n || blobs.Load() <= c.n {
			t.Errorf("%s: %d manifest and %d blob requests, want more than the %d that failed of each", c.name, manifests.Load(), blobs.Load(), c.n)
		}
		e.mustUnpublish(req)
	}
	r.SetFault(nil)
}

// stalledBody sends the first n bytes of a body, then nothing until the
// client goes away.
type stalledBody struct {
	http.ResponseWriter
	ctx context.Context
	n   int
}

func (s *stalledBody) Write(p []byte) (int, error) {
	if s.n <= 0 {
		<-s.ctx.Done()
		return 0, s.ctx.Err()
	}
	k := min(len(p), s.n)
	n, err := s.ResponseWriter.Write(p[:k])
	s.n -= n
	if f, ok := s.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
	if err == nil && k < len(p) {
		<-s.ctx.Done()
		return n, s.ctx.Err()
	}
	return n, err
}

// TestStalledBlob: the registry sends the module's headers and half its
// bytes, then nothing: the daemon cuts the download off after its idle
// timeout (30s), the publish is Unavailable, nothing is stored, and once
// the registry is well a publish works.
func TestStalledBlob(t *testing.T) {
	t.Parallel()
	r, mod, img := ownRegistry(t, 1<<20)
	layer := digest.FromBytes(mod)
	var stall atomic.Bool
	stall.Store(true)
	r.SetInterceptor(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
			if blobGetPath(req, layer) && stall.Load() {
				w = &stalledBody{ResponseWriter: w, ctx: req.Context(), n: len(mod) / 2}
			}
			next.ServeHTTP(w, req)
		})
	})
	e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--insecure-registry=" + r.ProxyHost()}})
	req := e.request(harness.NewPod("stalled"), "filter", map[string]string{"image": img})
	start := time.Now()
	wantCode(t, e.publish(req), codes.Unavailable, img, "sent nothing for 30s")
	t.Logf("the stalled download was cut off after %v", time.Since(start))
	checkGone(t, req.TargetPath)
	if got := e.storedBlobs(); len(got) != 0 {
		t.Errorf("the store holds %v after a stalled download", got)
	}

	stall.Store(false)
	if err := e.publishRetrying(req); err != nil {
		t.Fatalf("publish once the registry is well: %v", err)
	}
	checkFile(t, req, "plugin.wasm", mod)
	e.checkStoreIntegrity()
	e.mustUnpublish(req)
}

// TestDamping: a registry answers 503 for one image. After the first
// failed pull, twenty publishes of it (ten at once, ten in a row) fail at
// once with the same code and a message saying when the registry will be
// asked again, and cause at most one more pull; another image of the same
// registry is not held back. Once the registry is well and the window has
// passed, a publish works, and the damping is over: the next publish asks
// the registry at once.
func TestDamping(t *testing.T) {
	t.Parallel()
	r, mod, img := ownRegistry(t, 4096)
	const repo = "net/filter"
	other := module(t, "other")
	if _, err := registrytest.PushWasm(context.Background(), r.Host()+"/net/other:1.0", other, registrytest.LayoutCNCF); err != nil {
		t.Fatal(err)
	}
	var failing atomic.Bool
	failing.Store(true)
	r.SetFault(func(req *http.Request) (int, bool) {
		if failing.Load() && strings.HasPrefix(req.URL.Path, "/v2/"+repo+"/") {
			return http.StatusServiceUnavailable, true
		}
		return 0, false
	})
	e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--insecure-registry=" + r.ProxyHost()}})

	first := e.request(harness.NewPod("first"), "filter", map[string]string{"image": img})
	err := e.publish(first)
	wantCode(t, err, codes.Unavailable, img, "503")
	if strings.Contains(err.Error(), dampedMarker) {
		t.Fatalf("the first failure was damped: %v", err)
	}
	onePull := r.ManifestRequests(repo)
	if onePull == 0 {
		t.Fatal("the first publish did not reach the registry")
	}

	// Ten at once, then ten in a row.
	var errs []error
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i := 0; i < 10; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := e.publish(e.request(harness.NewPod(fmt.Sprintf("burst-%d", i)), "filter", map[string]string{"image": img}))
			mu.Lock()
			errs = append(errs, err)
			mu.Unlock()
		}()
	}
	wg.Wait()
	for i := 0; i < 10; i++ {
		errs = append(errs, e.publish(e.request(harness.NewPod(fmt.Sprintf("row-%d", i)), "filter", map[string]string{"image": img})))
	}
	damped := 0
	for _, err := range errs {
		wantCode(t, err, codes.Unavailable, img, "503")
		if strings.Contains(status.Convert(err).Message(), dampedMarker) {
			damped++
		}
	}
	extra := r.ManifestRequests(repo) - onePull
	t.Logf("one pull made %d requests; 20 more publishes: %d damped, %d more requests", onePull, damped, extra)
	if extra > onePull {
		t.Errorf("20 publishes inside the damping window made %d requests, more than one more pull (%d)", extra, onePull)
	}
	if damped < 10 {
		t.Errorf("%d of 20 publishes were damped, want most", damped)
	}
	// Another image of the registry is not held back.
	otherReq := e.mustPublish(r.ProxyHost()+"/net/other:1.0", nil)
	checkFile(t, otherReq, "plugin.wasm", other)
	e.mustUnpublish(otherReq)

	// Well again: once the window passes, kubelet's retry works.
	failing.Store(false)
	if err := e.publishRetrying(first); err != nil {
		t.Fatalf("publish once the registry is well: %v", err)
	}
	checkFile(t, first, "plugin.wasm", mod)
	// The success ended the damping: the next pull asks the registry at
	// once (Always resolves the tag again).
	before := r.ManifestRequests(repo)
	always := e.mustPublish(img, map[string]string{"pullPolicy": "Always"})
	if r.ManifestRequests(repo) == before {
		t.Error("a pull right after a success did not ask the registry")
	}
	e.mustUnpublish(always)
	e.mustUnpublish(first)
}
