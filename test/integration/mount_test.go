package integration

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/wasm-csi/wasm-csi/test/lib/harness"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
)

// mountCount is how many mounts are stacked on target.
func mountCount(t *testing.T, target string) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && f[4] == target {
			n++
		}
	}
	return n
}

// TestMount checks the volume is a read-only, nosuid, nodev mount whatever
// the request's readonly says, and that publish and unpublish are idempotent.
func TestMount(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	repo := repoName(t, "m")
	mod := module(t, "1")
	push(t, repo+":1.0", mod, registrytest.LayoutCNCF)

	req := e.request(harness.NewPod("writer"), "filter", map[string]string{"image": image(repo + ":1.0")})
	req.Readonly = false
	if err := e.publish(req); err != nil {
		t.Fatal(err)
	}
	checkFile(t, req, "plugin.wasm", mod)
	target := req.TargetPath

	opts, err := harness.MountOptions(target)
	if err != nil {
		t.Fatal(err)
	}
	have := map[string]bool{}
	for _, o := range strings.Split(opts, ",") {
		have[o] = true
	}
	for _, o := range []string{"ro", "nosuid", "nodev"} {
		if !have[o] {
			t.Errorf("mount options of %s are %q, missing %s", target, opts, o)
		}
	}
	if have["rw"] {
		t.Errorf("mount options of %s are %q: rw", target, opts)
	}

	// Writes fail with EROFS, even for root, who ignores file modes.
	if err := os.WriteFile(filepath.Join(target, "new.txt"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("creating a file in the volume: %v, want EROFS", err)
	}
	for _, flag := range []int{os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND} {
		f, err := os.OpenFile(filepath.Join(target, "plugin.wasm"), flag, 0)
		if err == nil {
			f.Close()
		}
		if !errors.Is(err, syscall.EROFS) {
			t.Errorf("opening the module with flags %#x: %v, want EROFS", flag, err)
		}
	}
	if err := os.Remove(filepath.Join(target, "plugin.wasm")); !errors.Is(err, syscall.EROFS) {
		t.Errorf("removing the module: %v, want EROFS", err)
	}
	if err := os.Chmod(filepath.Join(target, "plugin.wasm"), 0o777); !errors.Is(err, syscall.EROFS) {
		t.Errorf("chmod of the module: %v, want EROFS", err)
	}
	// What kubelet and the container runtime do next cannot make it
	// writable: a bind of the target into a "container", remounted rw as
	// runc does for a volume that is not readOnly, still refuses writes.
	ctr := t.TempDir()
	if err := syscall.Mount(target, ctr, "", syscall.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Unmount(ctr, syscall.MNT_DETACH) })
	if err := syscall.Mount("", ctr, "", syscall.MS_BIND|syscall.MS_REMOUNT, ""); err != nil {
		t.Fatalf("remounting the bind rw: %v", err)
	}
	if err := os.WriteFile(filepath.Join(ctr, "plugin.wasm"), []byte("x"), 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("writing through a bind remounted rw: %v, want EROFS", err)
	}
	syscall.Unmount(ctr, syscall.MNT_DETACH)

	entries, err := os.ReadDir(target)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "plugin.wasm" {
		t.Errorf("the volume holds %v, want only plugin.wasm", entries)
	}
	checkFile(t, req, "plugin.wasm", mod)

	// Publish again: OK, one mount, the same file.
	if err := e.publish(req); err != nil {
		t.Fatalf("second publish: %v", err)
	}
	if n := mountCount(t, target); n != 1 {
		t.Errorf("%d mounts on %s after two publishes, want 1", n, target)
	}
	checkFile(t, req, "plugin.wasm", mod)

	// Unpublish: unmounted and removed; again: still OK, still gone.
	e.mustUnpublish(req)
	checkGone(t, target)
	if _, err := os.Stat(filepath.Dir(target)); err != nil {
		t.Errorf("unpublish removed the target's parent, which kubelet owns: %v", err)
	}
	e.mustUnpublish(req)
	checkGone(t, target)

	// A target never published: OK.
	never := e.request(harness.NewPod("never"), "filter", map[string]string{"image": image(repo + ":1.0")})
	if err := e.unpublish(never); err != nil {
		t.Errorf("unpublish of a never-published target: %v", err)
	}
	checkGone(t, never.TargetPath)

	// The module is still stored: the next pod mounts it with no download.
	again := e.mustPublish(image(repo+":1.0"), nil)
	checkFile(t, again, "plugin.wasm", mod)
	if n := reg.BlobGets(digest.FromBytes(mod)); n != 1 {
		t.Errorf("module downloaded %d times, want 1", n)
	}
	e.mustUnpublish(again)
	checkGone(t, again.TargetPath)
}
