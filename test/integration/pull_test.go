package integration

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

// TestPullOutlivesCaller holds the module's download at the registry while
// kubelet's call times out: the pull goes on, and kubelet's retry gets the
// module without a second download.
func TestPullOutlivesCaller(t *testing.T) {
	e := newEnv(t)
	repo := repoName(t, "m")
	mod := module(t, "1")
	push(t, repo+":1.0", mod, registrytest.LayoutCNCF)
	layer := digest.FromBytes(mod)

	g := newGate(t)
	reg.SetInterceptor(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if blobGetPath(r, layer) {
				g.signalArrival()
				select {
				case <-g.open:
				case <-r.Context().Done():
					return
				}
			}
			next.ServeHTTP(w, r)
		})
	})
	t.Cleanup(func() { reg.SetInterceptor(nil) })

	req := e.request(harness.NewPod("slow"), "filter", map[string]string{"image": image(repo + ":1.0")})
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	_, err := e.d.Node.NodePublishVolume(ctx, req)
	cancel()
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("publish with a 1s deadline while the download is held: %v, want DeadlineExceeded", err)
	}
	g.waitArrival(t)
	checkGone(t, req.TargetPath)

	g.release()
	if err := e.publish(req); err != nil {
		t.Fatalf("kubelet's retry: %v", err)
	}
	checkFile(t, req, "plugin.wasm", mod)
	if n := reg.BlobGets(layer); n != 1 {
		t.Errorf("module downloaded %d times, want 1 (the retry joins the first pull or finds it stored)", n)
	}
	e.mustUnpublish(req)
	checkGone(t, req.TargetPath)
}

// TestPullPolicy checks IfNotPresent, Always, Never and the defaults, with
// a tag pushed again with other bytes.
func TestPullPolicy(t *testing.T) {
	t.Parallel()
	e := newEnv(t)

	t.Run("IfNotPresent-and-Always", func(t *testing.T) {
		repo := repoName(t, "m")
		img := image(repo + ":1.0")
		v1, v2 := module(t, "v1"), module(t, "v2")
		push(t, repo+":1.0", v1, registrytest.LayoutCNCF)

		first := e.mustPublish(img, map[string]string{"pullPolicy": "IfNotPresent"})
		checkFile(t, first, "plugin.wasm", v1)

		push(t, repo+":1.0", v2, registrytest.LayoutCNCF)
		manifests := reg.ManifestRequests(repo)
		keep := e.mustPublish(img, map[string]string{"pullPolicy": "IfNotPresent"})
		checkFile(t, keep, "plugin.wasm", v1)
		// The default for a tag other than latest is IfNotPresent.
		byDefault := e.mustPublish(img, nil)
		checkFile(t, byDefault, "plugin.wasm", v1)
		if n := reg.BlobGets(digest.FromBytes(v2)); n != 0 {
			t.Errorf("IfNotPresent downloaded the new module %d times, want 0", n)
		}
		if n := reg.ManifestRequests(repo) - manifests; n != 0 {
			t.Errorf("IfNotPresent with the module on the node asked the registry %d times, want 0", n)
		}

		always := e.mustPublish(img, map[string]string{"pullPolicy": "Always"})
		checkFile(t, always, "plugin.wasm", v2)
		if n := reg.BlobGets(digest.FromBytes(v2)); n != 1 {
			t.Errorf("Always downloaded the new module %d times, want 1", n)
		}
		// A running pod's file never changes.
		checkFile(t, first, "plugin.wasm", v1)
		checkFile(t, keep, "plugin.wasm", v1)
		if n := reg.BlobGets(digest.FromBytes(v1)); n != 1 {
			t.Errorf("the first module was downloaded %d times, want 1", n)
		}
		// Always again with nothing new: no download.
		again := e.mustPublish(img, map[string]string{"pullPolicy": "Always"})
		checkFile(t, again, "plugin.wasm", v2)
		if n := reg.BlobGets(digest.FromBytes(v2)); n != 1 {
			t.Errorf("the new module was downloaded %d times, want 1", n)
		}
		e.mustUnpublish(first)
		e.mustUnpublish(keep)
		e.mustUnpublish(byDefault)
		e.mustUnpublish(always)
		e.mustUnpublish(again)
	})

	t.Run("default-Always-for-latest-and-no-tag", func(t *testing.T) {
		repo := repoName(t, "m")
		a, b, c := module(t, "a"), module(t, "b"), module(t, "c")
		push(t, repo+":latest", a, registrytest.LayoutCNCF)
		ra := e.mustPublish(image(repo+":latest"), nil)
		checkFile(t, ra, "plugin.wasm", a)

		push(t, repo+":latest", b, registrytest.LayoutCNCF)
		rb := e.mustPublish(image(repo+":latest"), nil)
		checkFile(t, rb, "plugin.wasm", b)

		push(t, repo+":latest", c, registrytest.LayoutCNCF)
		rc := e.mustPublish(image(repo), nil)
		checkFile(t, rc, "plugin.wasm", c)

		checkFile(t, ra, "plugin.wasm", a)
		checkFile(t, rb, "plugin.wasm", b)
		for _, m := range [][]byte{a, b, c} {
			if n := reg.BlobGets(digest.FromBytes(m)); n != 1 {
				t.Errorf("module %s downloaded %d times, want 1", digest.FromBytes(m), n)
			}
		}
		e.mustUnpublish(ra)
		e.mustUnpublish(rb)
		e.mustUnpublish(rc)
	})

	t.Run("Never", func(t *testing.T) {
		repo := repoName(t, "m")
		img := image(repo + ":1.0")
		mod := module(t, "1")
		push(t, repo+":1.0", mod, registrytest.LayoutCNCF)

		never := e.request(harness.NewPod("never"), "filter", map[string]string{"image": img, "pullPolicy": "Never"})
		wantCode(t, e.publish(never), codes.FailedPrecondition, img, "Never")
		checkGone(t, never.TargetPath)
		if n := reg.BlobGets(digest.FromBytes(mod)); n != 0 {
			t.Errorf("pullPolicy Never downloaded the module %d times", n)
		}

		other := e.mustPublish(img, map[string]string{"pullPolicy": "IfNotPresent"})
		if err := e.publish(never); err != nil {
			t.Fatalf("pullPolicy Never once another pod pulled the module: %v", err)
		}
		checkFile(t, never, "plugin.wasm", mod)
		if n := reg.BlobGets(digest.FromBytes(mod)); n != 1 {
			t.Errorf("module downloaded %d times, want 1", n)
		}
		e.mustUnpublish(never)
		e.mustUnpublish(other)
	})

	t.Run("unknown", func(t *testing.T) {
		repo := repoName(t, "m")
		img := image(repo + ":1.0")
		push(t, repo+":1.0", module(t, "1"), registrytest.LayoutCNCF)
		req := e.request(harness.NewPod("bad"), "filter", map[string]string{"image": img, "pullPolicy": "Sometimes"})
		wantCode(t, e.publish(req), codes.InvalidArgument, img, "Sometimes")
		checkGone(t, req.TargetPath)
		for _, p := range []string{"always", "ifnotpresent", " Always"} {
			req.VolumeContext["pullPolicy"] = p
			wantCode(t, e.publish(req), codes.InvalidArgument, img)
		}
	})
}
