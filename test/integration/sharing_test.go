package integration

import (
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/opencontainers/go-digest"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

// TestSharedFile checks pods with one image share one file on the node (one
// inode) and the module was downloaded once, whatever name each pod gives it.
func TestSharedFile(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	repo := repoName(t, "m")
	mod := module(t, "1")
	push(t, repo+":1.0", mod, registrytest.LayoutCNCF)
	layer := digest.FromBytes(mod)
	img := image(repo + ":1.0")

	a := e.mustPublish(img, nil)
	b := e.mustPublish(img, nil)
	checkFile(t, a, "plugin.wasm", mod)
	checkFile(t, b, "plugin.wasm", mod)
	devA, inoA := inode(t, filepath.Join(a.TargetPath, "plugin.wasm"))
	devB, inoB := inode(t, filepath.Join(b.TargetPath, "plugin.wasm"))
	if devA != devB || inoA != inoB {
		t.Errorf("two pods see different files: dev/ino %d/%d and %d/%d", devA, inoA, devB, inoB)
	}
	if n := reg.BlobGets(layer); n != 1 {
		t.Errorf("module downloaded %d times for two pods, want 1", n)
	}

	c := e.mustPublish(img, map[string]string{"fileName": "header.wasm"})
	checkFile(t, c, "header.wasm", mod)
	// Another file name is another read-only view (its own overlay mount,
	// so its own st_dev) of the same file on disk: the blob's inode.
	_, inoC := inode(t, filepath.Join(c.TargetPath, "header.wasm"))
	_, inoBlob := inode(t, filepath.Join(e.blobDir(), digest.FromBytes(mod).Encoded()))
	if inoC != inoA || inoA != inoBlob {
		t.Errorf("a pod naming the file header.wasm sees another file: inode %d, the other pods %d, the stored module %d", inoC, inoA, inoBlob)
	}
	// The other pods' volumes are unchanged by the new name.
	checkFile(t, a, "plugin.wasm", mod)
	checkFile(t, b, "plugin.wasm", mod)
	if n := reg.BlobGets(layer); n != 1 {
		t.Errorf("module downloaded %d times for three pods, want 1", n)
	}

	// One pod leaving does not disturb the others.
	e.mustUnpublish(a)
	checkGone(t, a.TargetPath)
	checkFile(t, b, "plugin.wasm", mod)
	checkFile(t, c, "header.wasm", mod)
	e.mustUnpublish(b)
	e.mustUnpublish(c)
}

// TestConcurrentPublish sends 20 publishes of one uncached image at once,
// for 20 pods: all succeed, and the module is downloaded once.
func TestConcurrentPublish(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	repo := repoName(t, "m")
	mod := module(t, "1")
	push(t, repo+":1.0", mod, registrytest.LayoutCNCF)
	img := image(repo + ":1.0")

	const pods = 20
	reqs := make([]*csipb.NodePublishVolumeRequest, pods)
	for i := range reqs {
		reqs[i] = e.request(harness.NewPod(fmt.Sprintf("gw-%d", i)), "filter", map[string]string{"image": img})
	}
	errs := make([]error, pods)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range reqs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			errs[i] = e.publish(reqs[i])
		}()
	}
	close(start)
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("publish %d: %v", i, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	if n := reg.BlobGets(digest.FromBytes(mod)); n != 1 {
		t.Errorf("module downloaded %d times for %d simultaneous publishes, want 1", n, pods)
	}
	dev0, ino0 := inode(t, filepath.Join(reqs[0].TargetPath, "plugin.wasm"))
	for i, req := range reqs {
		checkFile(t, req, "plugin.wasm", mod)
		if dev, ino := inode(t, filepath.Join(req.TargetPath, "plugin.wasm")); dev != dev0 || ino != ino0 {
			t.Errorf("pod %d sees dev/ino %d/%d, pod 0 %d/%d", i, dev, ino, dev0, ino0)
		}
	}
	for _, req := range reqs {
		e.mustUnpublish(req)
		checkGone(t, req.TargetPath)
	}
}
