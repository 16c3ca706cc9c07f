package integration

import (
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

// stallWriter sends the first limit bytes of a response body, then holds
// the rest until the gate opens or the client goes away.
type stallWriter struct {
	http.ResponseWriter
	r     *http.Request
	g     *gate
	limit int
	n     int
}

func (s *stallWriter) Write(p []byte) (int, error) {
	if s.n+len(p) <= s.limit {
		n, err := s.ResponseWriter.Write(p)
		s.n += n
		return n, err
	}
	head := p[:s.limit-s.n]
	n, err := s.ResponseWriter.Write(head)
	s.n += n
	if err != nil {
		return n, err
	}
	http.NewResponseController(s.ResponseWriter).Flush()
	s.g.signalArrival()
	select {
	case <-s.g.open:
	case <-s.r.Context().Done():
	}
	return n, errors.New("stalled response abandoned")
}

// tempFiles lists the .tmp- files in dir with their sizes.
func tempFiles(t *testing.T, dir string) map[string]int64 {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int64{}
	for _, en := range entries {
		if strings.HasPrefix(en.Name(), ".tmp-") {
			if fi, err := en.Info(); err == nil {
				out[en.Name()] = fi.Size()
			}
		}
	}
	return out
}

// TestRestart kills the daemon with SIGKILL while three volumes are
// published and a pull is half-way: the pods' files keep working, and the
// restarted daemon unpublishes them, reuses the stored modules, drops the
// leftovers of the pull it lost and never serves a partial module.
func TestRestart(t *testing.T) {
	e := newEnv(t)
	repoA, repoB, repoC := repoName(t, "a"), repoName(t, "b"), repoName(t, "c")
	modA, modB := module(t, "a"), module(t, "b")
	modC := wasmgen.ProxyWasm(wasmgen.Options{Message: t.Name() + " c", PadTo: 256 << 10})
	push(t, repoA+":1.0", modA, registrytest.LayoutCNCF)
	descB := push(t, repoB+":1.0", modB, registrytest.LayoutDockerGzip)
	push(t, repoC+":1.0", modC, registrytest.LayoutCNCF)
	imgA, imgB, imgC := image(repoA+":1.0"), image(repoB+":1.0"), image(repoC+":1.0")
	_, layersB := manifestBlobs(t, repoB, descB)
	layerA, layerB, layerC := digest.FromBytes(modA), layersB[0], digest.FromBytes(modC)

	vol1 := e.mustPublish(imgA, nil)
	vol2 := e.mustPublish(imgA, nil)
	vol3 := e.mustPublish(imgB, nil)

	// A pull the daemon will not finish: half the module arrives, then the
	// registry holds the rest.
	g := newGate(t)
	reg.SetInterceptor(func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if blobGetPath(r, layerC) {
				w = &stallWriter{ResponseWriter: w, r: r, g: g, limit: len(modC) / 2}
			}
			next.ServeHTTP(w, r)
		})
	})
	t.Cleanup(func() { reg.SetInterceptor(nil) })
	volC := e.request(harness.NewPod("interrupted"), "filter", map[string]string{"image": imgC})
	pending := make(chan error, 1)
	go func() { pending <- e.publish(volC) }()
	g.waitArrival(t)
	// Wait for the pull's temp file (how much of the half it holds depends
	// on the daemon's buffering).
	var partial string
	for deadline := time.Now().Add(callTimeout); partial == ""; {
		for name := range tempFiles(t, e.blobDir()) {
			partial = name
		}
		if time.Now().After(deadline) {
			t.Fatal("the interrupted pull has no temp file in blobs/sha256")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// And a leftover of an older crash.
	leftover := filepath.Join(e.blobDir(), ".tmp-xyz")
	if err := os.WriteFile(leftover, modC[:len(modC)/3], 0o600); err != nil {
		t.Fatal(err)
	}

	e.d.Kill()
	if err := <-pending; err == nil {
		t.Fatal("the publish interrupted by SIGKILL succeeded")
	}
	g.release()
	reg.SetInterceptor(nil)

	// The pods' files outlive the daemon.
	checkFile(t, vol1, "plugin.wasm", modA)
	checkFile(t, vol2, "plugin.wasm", modA)
	checkFile(t, vol3, "plugin.wasm", modB)
	if got := tempFiles(t, e.blobDir()); len(got) != 2 {
		t.Fatalf("temp files before the restart: %v, want the partial module and .tmp-xyz", got)
	}

	if err := e.d.Start(); err != nil {
		t.Fatal(err)
	}
	if got := tempFiles(t, e.blobDir()); len(got) != 0 {
		t.Errorf("temp files after the restart: %v, want none", got)
	}
	if _, err := os.Stat(filepath.Join(e.blobDir(), partial)); !os.IsNotExist(err) {
		t.Errorf("the partial module %s survived the restart: %v", partial, err)
	}
	checkFile(t, vol1, "plugin.wasm", modA)
	checkFile(t, vol3, "plugin.wasm", modB)

	// Publishing a published volume again is still OK, and changes nothing.
	if err := e.publish(vol2); err != nil {
		t.Errorf("publish of a volume published before the restart: %v", err)
	}
	if n := mountCount(t, vol2.TargetPath); n != 1 {
		t.Errorf("%d mounts on %s, want 1", n, vol2.TargetPath)
	}

	// The restarted daemon unpublishes what its predecessor published.
	e.mustUnpublish(vol1)
	checkGone(t, vol1.TargetPath)
	checkFile(t, vol2, "plugin.wasm", modA)

	// The stored modules serve new pods with no download.
	getsA, getsB := reg.BlobGets(layerA), reg.BlobGets(layerB)
	if getsA != 1 || getsB != 1 {
		t.Errorf("before the restart: %d and %d downloads, want 1 and 1", getsA, getsB)
	}
	manifestsA, manifestsB := reg.ManifestRequests(repoA), reg.ManifestRequests(repoB)
	newA := e.mustPublish(imgA, map[string]string{"pullPolicy": "IfNotPresent"})
	newB := e.mustPublish(imgB, nil)
	checkFile(t, newA, "plugin.wasm", modA)
	checkFile(t, newB, "plugin.wasm", modB)
	if a, b := reg.BlobGets(layerA), reg.BlobGets(layerB); a != getsA || b != getsB {
		t.Errorf("publishing stored modules after the restart downloaded %d and %d blobs, want 0", a-getsA, b-getsB)
	}
	if a, b := reg.ManifestRequests(repoA), reg.ManifestRequests(repoB); a != manifestsA || b != manifestsB {
		t.Errorf("IfNotPresent asked the registry for manifests %d and %d times after the restart, want 0", a-manifestsA, b-manifestsB)
	}
	devOld, inoOld := inode(t, filepath.Join(vol2.TargetPath, "plugin.wasm"))
	devNew, inoNew := inode(t, filepath.Join(newA.TargetPath, "plugin.wasm"))
	if devOld != devNew || inoOld != inoNew {
		t.Errorf("a pod after the restart sees another file than a pod before it")
	}

	// The interrupted module is pulled whole, never served partial.
	if err := e.publish(volC); err != nil {
		t.Fatalf("kubelet's retry of the interrupted publish: %v", err)
	}
	checkFile(t, volC, "plugin.wasm", modC)
	if n := reg.BlobGets(layerC); n != 2 {
		t.Errorf("the interrupted module was downloaded %d times, want 2", n)
	}
	want := map[string]bool{layerA.Encoded(): true, digest.FromBytes(modB).Encoded(): true, layerC.Encoded(): true}
	got := e.storedBlobs()
	if len(got) != len(want) {
		t.Errorf("the store holds %v, want the three modules", got)
	}
	for _, name := range got {
		if !want[name] {
			t.Errorf("unexpected file blobs/sha256/%s", name)
		}
	}
	e.checkStoreIntegrity()

	e.mustUnpublish(vol2)
	e.mustUnpublish(vol3)
	e.mustUnpublish(newA)
	e.mustUnpublish(newB)
	e.mustUnpublish(volC)
	checkGone(t, vol3.TargetPath)
}
