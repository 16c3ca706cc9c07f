package integration

import (
	"context"
	"encoding/base64"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

// failPublish publishes attrs for a new pod, asserts code and message, and
// that nothing was mounted or left at the target.
func (e *env) failPublish(t *testing.T, attrs map[string]string, code codes.Code, contains ...string) {
	t.Helper()
	req := e.request(harness.NewPod("failing"), "filter", attrs)
	wantCode(t, e.publish(req), code, contains...)
	checkGone(t, req.TargetPath)
}

// TestInvalidRequests checks caller mistakes are InvalidArgument.
func TestInvalidRequests(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	e.failPublish(t, map[string]string{}, codes.InvalidArgument, `"image"`)
	e.failPublish(t, map[string]string{"image": "  "}, codes.InvalidArgument, `"image"`)
	for _, ref := range []string{
		reg.ProxyHost() + "/UPPER/Case:1.0",
		reg.ProxyHost() + "/repo:bad tag",
		reg.ProxyHost() + "/repo@sha256:1234",
		"oci://",
		"ghcr.io/acme/filter:1.0:extra",
	} {
		e.failPublish(t, map[string]string{"image": ref}, codes.InvalidArgument, ref)
	}
}

// TestOversizedReference: a reference beyond the distribution grammar's
// limits (a name over 255 characters; a 100 KB image attribute) is
// InvalidArgument at once, with a short message, and the registry sees no
// request at all.
func TestOversizedReference(t *testing.T) {
	t.Parallel()
	r := registrytest.StartT(t, registrytest.Options{})
	e := newEnv(t, "--insecure-registry="+r.ProxyHost())
	host := r.ProxyHost() + "/"
	for _, img := range []string{
		host + strings.Repeat("a", 256-len(host)) + ":1.0",
		host + strings.Repeat("a/", 50<<10) + "a:1.0",
		host + "m:" + strings.Repeat("t", 100<<10),
	} {
		req := e.request(harness.NewPod("oversized"), "filter", map[string]string{"image": img})
		err := e.publish(req)
		wantCode(t, err, codes.InvalidArgument, "at most")
		if n := len(status.Convert(err).Message()); n > 1024 {
			t.Errorf("a %d-byte image gave a %d-byte message", len(img), n)
		}
		checkGone(t, req.TargetPath)
	}
	if n := r.Counts().Requests; n != 0 {
		t.Errorf("the registry saw %d requests for oversized references, want 0", n)
	}
}

// TestNotFound checks a missing repository, tag or digest is NotFound.
func TestNotFound(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	repo := repoName(t, "m")
	push(t, repo+":1.0", module(t, "1"), registrytest.LayoutCNCF)
	missingDigest := digest.FromString("no such manifest")
	for _, img := range []string{
		image(repoName(t, "nope") + ":1.0"),
		image(repo + ":2.0"),
		image(repo + "@" + missingDigest.String()),
	} {
		e.failPublish(t, map[string]string{"image": img}, codes.NotFound, img)
	}
}

// dockerConfig writes a Docker config.json with credentials for host.
func dockerConfig(t *testing.T, host, user, pass string) string {
	t.Helper()
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	p := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(p, []byte(fmt.Sprintf(`{"auths":{%q:{"auth":%q}}}`, host, auth)), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestAuth uses a registry with htpasswd auth: no credentials and wrong ones
// are refused, the right ones in --docker-config pull.
func TestAuth(t *testing.T) {
	t.Parallel()
	harness.RequireRoot(t)
	private := registrytest.StartT(t, registrytest.Options{Htpasswd: map[string]string{"alice": "s3cret"}})
	mod := module(t, "1")
	if _, err := registrytest.PushWasm(context.Background(), private.Host()+"/private/filter:1.0", mod, registrytest.LayoutCNCF,
		registrytest.WithBasicAuth("alice", "s3cret")); err != nil {
		t.Fatal(err)
	}
	img := private.ProxyHost() + "/private/filter:1.0"
	insecure := "--insecure-registry=" + private.ProxyHost()
	refused := func(t *testing.T, e *env) {
		t.Helper()
		req := e.request(harness.NewPod("private"), "filter", map[string]string{"image": img})
		err := e.publish(req)
		if c := status.Code(err); c != codes.PermissionDenied && c != codes.Unauthenticated {
			t.Fatalf("publish from a registry that refuses: %v, want PermissionDenied or Unauthenticated", err)
		}
		wantCode(t, err, status.Code(err), img, "docker-config")
		checkGone(t, req.TargetPath)
		if n := private.BlobGets(digest.FromBytes(mod)); n != 0 {
			t.Errorf("the module was downloaded %d times without valid credentials", n)
		}
	}

	t.Run("no-credentials", func(t *testing.T) {
		refused(t, newEnvOpts(t, harness.DaemonOptions{Args: []string{insecure}}))
	})
	t.Run("wrong-credentials", func(t *testing.T) {
		cfg := dockerConfig(t, private.ProxyHost(), "alice", "wrong")
		refused(t, newEnvOpts(t, harness.DaemonOptions{Args: []string{insecure, "--docker-config=" + cfg}}))
	})
	t.Run("other-host-credentials", func(t *testing.T) {
		cfg := dockerConfig(t, "registry.example.com", "alice", "s3cret")
		refused(t, newEnvOpts(t, harness.DaemonOptions{Args: []string{insecure, "--docker-config=" + cfg}}))
	})
	t.Run("docker-config", func(t *testing.T) {
		cfg := dockerConfig(t, private.ProxyHost(), "alice", "s3cret")
		e := newEnvOpts(t, harness.DaemonOptions{Args: []string{insecure, "--docker-config=" + cfg}})
		req := e.mustPublish(img, nil)
		checkFile(t, req, "plugin.wasm", mod)
		if n := private.BlobGets(digest.FromBytes(mod)); n != 1 {
			t.Errorf("module downloaded %d times, want 1", n)
		}
		e.mustUnpublish(req)
	})
}

// freeAddr returns a loopback address nothing listens on.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

// TestUnreachable checks a registry that does not answer is Unavailable.
func TestUnreachable(t *testing.T) {
	t.Parallel()
	closed := freeAddr(t)
	e := newEnv(t, "--insecure-registry="+closed)
	img := closed + "/filters/header:1.0"
	e.failPublish(t, map[string]string{"image": img}, codes.Unavailable, img)
}

// TestNoPlainHTTPFallback checks a registry not named by --insecure-registry
// is spoken to over HTTPS only: a plain-HTTP registry is an error, and no
// plain-HTTP request reaches it.
func TestNoPlainHTTPFallback(t *testing.T) {
	t.Parallel()
	// The daemon trusts another port of the same host, not the proxy's.
	e := newEnvOpts(t, harness.DaemonOptions{Args: []string{"--insecure-registry=" + freeAddr(t)}})
	repo := repoName(t, "m")
	mod := module(t, "1")
	push(t, repo+":1.0", mod, registrytest.LayoutCNCF)
	// Reached on an address of this host that is not loopback: the daemon
	// does not dial loopback at all unless it is named (TestBlockedAddresses).
	img := nonLoopback(t, reg.ProxyHost()) + "/" + repo + ":1.0"
	req := e.request(harness.NewPod("https"), "filter", map[string]string{"image": img})
	err := e.publish(req)
	if err == nil {
		t.Fatal("publish from a plain-HTTP registry not named by --insecure-registry succeeded")
	}
	// The message says what to do.
	wantCode(t, err, status.Code(err), img, "--insecure-registry")
	if c := status.Code(err); c == codes.InvalidArgument || c == codes.Internal {
		t.Errorf("code %s for a registry that does not speak HTTPS", c)
	}
	checkGone(t, req.TargetPath)
	c := reg.Counts()
	if n := c.ManifestGets[repo+":1.0"] + c.ManifestHeads[repo+":1.0"]; n != 0 {
		t.Errorf("%d plain-HTTP manifest requests reached the registry", n)
	}
	if n := reg.BlobGets(digest.FromBytes(mod)); n != 0 {
		t.Errorf("%d plain-HTTP blob requests reached the registry", n)
	}
}

// TestRegistry5xx answers 503 for one image's manifest and another's blob:
// both publishes are Unavailable once oras gave up retrying, nothing is
// stored, and both work once the registry is well again.
func TestRegistry5xx(t *testing.T) {
	e := newEnv(t)
	manifestRepo, blobRepo := repoName(t, "manifest"), repoName(t, "blob")
	modM, modB := module(t, "manifest"), module(t, "blob")
	push(t, manifestRepo+":1.0", modM, registrytest.LayoutCNCF)
	push(t, blobRepo+":1.0", modB, registrytest.LayoutCNCF)
	reg.SetFault(func(r *http.Request) (int, bool) {
		if strings.HasPrefix(r.URL.Path, "/v2/"+manifestRepo+"/manifests/") || blobGetPath(r, digest.FromBytes(modB)) {
			return http.StatusServiceUnavailable, true
		}
		return 0, false
	})
	t.Cleanup(func() { reg.SetFault(nil) })

	imgM, imgB := image(manifestRepo+":1.0"), image(blobRepo+":1.0")
	reqM := e.request(harness.NewPod("manifest"), "filter", map[string]string{"image": imgM})
	reqB := e.request(harness.NewPod("blob"), "filter", map[string]string{"image": imgB})
	var errM, errB error
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); errM = e.publish(reqM) }()
	go func() { defer wg.Done(); errB = e.publish(reqB) }()
	wg.Wait()
	wantCode(t, errM, codes.Unavailable, imgM, "503")
	wantCode(t, errB, codes.Unavailable, imgB, "503")
	checkGone(t, reqM.TargetPath)
	checkGone(t, reqB.TargetPath)
	if n := reg.BlobGets(digest.FromBytes(modB)); n < 2 {
		t.Errorf("the blob was asked for %d times: oras did not retry the 503", n)
	}
	if got := e.storedBlobs(); len(got) != 0 {
		t.Errorf("the store holds %v after failed pulls", got)
	}

	reg.SetFault(nil)
	for _, c := range []struct {
		req *csipb.NodePublishVolumeRequest
		mod []byte
	}{{reqM, modM}, {reqB, modB}} {
		// As kubelet, past the damping of the image that just failed.
		if err := e.publishRetrying(c.req); err != nil {
			t.Fatalf("publish once the registry is well: %v", err)
		}
		checkFile(t, c.req, "plugin.wasm", c.mod)
		e.mustUnpublish(c.req)
	}
}

// corruptWriter flips one byte of a response body in flight.
type corruptWriter struct {
	http.ResponseWriter
	at, n int
}

func (c *corruptWriter) Write(p []byte) (int, error) {
	if i := c.at - c.n; i >= 0 && i < len(p) {
		q := append([]byte(nil), p...)
		q[i] ^= 0xff
		p = q
	}
	n, err := c.ResponseWriter.Write(p)
	c.n += n
	return n, err
}

// TestCorruptBlob flips a byte of the module's layer in flight: the publish
// is Unavailable, nothing is stored, and a clean retry works.
func TestCorruptBlob(t *testing.T) {
	e := newEnv(t)
	for _, layout := range []registrytest.Layout{registrytest.LayoutCNCF, registrytest.LayoutOCIGzip} {
		t.Run(layout.String(), func(t *testing.T) {
			repo := repoName(t, "m")
			mod := module(t, "1")
			desc := push(t, repo+":1.0", mod, layout)
			_, layers := manifestBlobs(t, repo, desc)
			layer := layers[len(layers)-1]
			reg.SetInterceptor(func(next http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if blobGetPath(r, layer) {
						w = &corruptWriter{ResponseWriter: w, at: len(mod) / 2}
					}
					next.ServeHTTP(w, r)
				})
			})
			t.Cleanup(func() { reg.SetInterceptor(nil) })

			img := image(repo + ":1.0")
			req := e.request(harness.NewPod("corrupt"), "filter", map[string]string{"image": img})
			wantCode(t, e.publish(req), codes.Unavailable, img, "digest")
			checkGone(t, req.TargetPath)
			if got := e.storedBlobs(); len(got) != 0 {
				t.Errorf("the store holds %v after a corrupted download", got)
			}

			reg.SetInterceptor(nil)
			if err := e.publishRetrying(req); err != nil { // past the damping
				t.Fatalf("publish once the bytes are clean: %v", err)
			}
			checkFile(t, req, "plugin.wasm", mod)
			if got, want := e.storedBlobs(), []string{digest.FromBytes(mod).Encoded()}; len(got) != 1 || got[0] != want[0] {
				t.Errorf("the store holds %v, want %v", got, want)
			}
			e.checkStoreIntegrity()
			e.mustUnpublish(req)
			// Empty the store for the next layout (the daemon keeps modules).
			for _, name := range e.storedBlobs() {
				if err := os.Remove(filepath.Join(e.blobDir(), name)); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// TestNotWasm checks images that hold no Wasm module are FailedPrecondition
// with a message saying what was found.
func TestNotWasm(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ctx := context.Background()

	t.Run("container-image-with-text-file", func(t *testing.T) {
		repo := repoName(t, "m")
		if _, err := registrytest.PushContainerImage(ctx, reg.Host()+"/"+repo+":1.0", []registrytest.Layer{
			{Entries: []registrytest.TarEntry{{Name: "plugin.wasm", Body: module(t, "lower")}}, Compression: registrytest.Gzip},
			{Entries: []registrytest.TarEntry{{Name: "etc/motd", Body: []byte("hello\n")}}, Compression: registrytest.Gzip},
		}); err != nil {
			t.Fatal(err)
		}
		img := image(repo + ":1.0")
		e.failPublish(t, map[string]string{"image": img}, codes.FailedPrecondition, img, "no plugin.wasm and no *.wasm")
	})

	t.Run("unknown-layer-media-type", func(t *testing.T) {
		repo := repoName(t, "m")
		const mt = "application/vnd.acme.filter.layer.v1+bin"
		if _, err := registrytest.PushArtifact(ctx, reg.Host()+"/"+repo+":1.0", registrytest.Artifact{
			ArtifactType: "application/vnd.acme.filter.v1",
			Layers:       []registrytest.Blob{{MediaType: mt, Data: module(t, "1")}},
		}); err != nil {
			t.Fatal(err)
		}
		img := image(repo + ":1.0")
		e.failPublish(t, map[string]string{"image": img}, codes.FailedPrecondition, img, mt)
	})

	t.Run("wasm-layer-not-wasm", func(t *testing.T) {
		repo := repoName(t, "m")
		push(t, repo+":1.0", wasmgen.Garbage(1000), registrytest.LayoutCNCF)
		img := image(repo + ":1.0")
		e.failPublish(t, map[string]string{"image": img}, codes.FailedPrecondition, img, "Wasm magic")
	})

	t.Run("two-plugin-wasm", func(t *testing.T) {
		repo := repoName(t, "m")
		if _, err := registrytest.PushContainerImage(ctx, reg.Host()+"/"+repo+":1.0", []registrytest.Layer{
			{Entries: []registrytest.TarEntry{
				{Name: "a/plugin.wasm", Body: module(t, "a")},
				{Name: "b/plugin.wasm", Body: module(t, "b")},
			}},
		}); err != nil {
			t.Fatal(err)
		}
		img := image(repo + ":1.0")
		e.failPublish(t, map[string]string{"image": img}, codes.FailedPrecondition, img, "2 files named plugin.wasm")
	})
	if got := e.storedBlobs(); len(got) != 0 {
		t.Errorf("the store holds %v after refused images", got)
	}
}

// TestVolumeConflict publishes a volume id at a target, then asks for the
// same volume and target with another image.
func TestVolumeConflict(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	repo := repoName(t, "m")
	a, b := module(t, "a"), module(t, "b")
	push(t, repo+":a", a, registrytest.LayoutCNCF)
	push(t, repo+":b", b, registrytest.LayoutCNCF)
	req := e.mustPublish(image(repo+":a"), nil)

	other := proto.Clone(req).(*csipb.NodePublishVolumeRequest)
	other.VolumeContext["image"] = image(repo + ":b")
	wantCode(t, e.publish(other), codes.AlreadyExists, image(repo+":b"), image(repo+":a"))
	checkFile(t, req, "plugin.wasm", a)

	e.mustUnpublish(req)
	if err := e.publish(other); err != nil {
		t.Fatalf("publish with the new image once the volume is gone: %v", err)
	}
	checkFile(t, other, "plugin.wasm", b)
	e.mustUnpublish(other)
}

// TestDiskFull puts the store on a 2 MiB tmpfs and publishes a 4 MiB module.
func TestDiskFull(t *testing.T) {
	t.Parallel()
	harness.RequireRoot(t)
	root := t.TempDir()
	if err := syscall.Mount("tmpfs", root, "tmpfs", 0, "size=2m"); err != nil {
		t.Fatalf("mounting a tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := syscall.Unmount(root, syscall.MNT_DETACH); err != nil {
			t.Errorf("unmounting the tmpfs: %v", err)
		}
	})
	e := newEnvOpts(t, harness.DaemonOptions{Root: root, Args: []string{"--insecure-registry=" + reg.ProxyHost()}})
	repo := repoName(t, "m")
	big := wasmgen.ProxyWasm(wasmgen.Options{Message: t.Name(), PadTo: 4 << 20})
	small := module(t, "small")
	push(t, repo+":1.0", big, registrytest.LayoutCNCF)
	// The same big module in a container image, before the small
	// plugin.wasm that wins: the store fills up on the first candidate.
	if _, err := registrytest.PushContainerImage(context.Background(), reg.Host()+"/"+repo+":image", []registrytest.Layer{{
		Entries: []registrytest.TarEntry{{Name: "big.wasm", Body: big}, {Name: "plugin.wasm", Body: small}},
	}}); err != nil {
		t.Fatal(err)
	}
	for _, tag := range []string{"1.0", "image"} {
		img := image(repo + ":" + tag)
		e.failPublish(t, map[string]string{"image": img}, codes.ResourceExhausted, img, "full")
		if got := e.storedBlobs(); len(got) != 0 {
			t.Errorf("blobs/sha256 holds %v after a full disk", got)
		}
	}

	// A small module still fits.
	push(t, repo+":small", small, registrytest.LayoutCNCF)
	req := e.mustPublish(image(repo+":small"), nil)
	checkFile(t, req, "plugin.wasm", small)
	e.mustUnpublish(req)
}
