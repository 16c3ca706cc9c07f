package node

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/wasm-csi/wasm-csi/node/mount"
	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/test/lib/testlog"
)

// newTestService starts a Service over root the way the daemon does at
// start, and returns its log.
func newTestService(t *testing.T, root string) (*Service, *testlog.Buffer) {
	t.Helper()
	var logs testlog.Buffer
	svc, err := NewService(Config{}, openStore(t, root), mount.New(), slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatalf("NewService: %v", err)
	}
	return svc, &logs
}

// wasmBody is a module-shaped body: the Wasm header, then tag.
func wasmBody(tag string) []byte {
	return append([]byte("\x00asm\x01\x00\x00\x00"), tag...)
}

// requireMounts skips where bind mounts are not permitted (not root).
func requireMounts(t *testing.T) {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		if errors.Is(err, unix.EPERM) {
			t.Skipf("cannot bind mount here: %v", err)
		}
		t.Fatal(err)
	}
	if err := unix.Unmount(dir, 0); err != nil {
		t.Fatal(err)
	}
}

// unmountAtEnd detaches target when the test ends, if still mounted.
func unmountAtEnd(t *testing.T, target string) {
	t.Cleanup(func() {
		for {
			if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
				return
			}
		}
	})
}

// unmountTreeAtEnd detaches, when the test ends, every mount under dir
// (the store's read-only views), deepest first, so TempDir can remove it.
func unmountTreeAtEnd(t *testing.T, dir string) {
	t.Cleanup(func() {
		b, err := os.ReadFile("/proc/self/mountinfo")
		if err != nil {
			return
		}
		var under []string
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], dir+"/") {
				under = append(under, f[4])
			}
		}
		sort.Sort(sort.Reverse(sort.StringSlice(under)))
		for _, p := range under {
			_ = unix.Unmount(p, unix.MNT_DETACH)
		}
	})
}

// mountFlags returns the statfs flags of the mount at p.
func mountFlags(t *testing.T, p string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Flags
}

func isMounted(t *testing.T, p string) bool {
	t.Helper()
	ok, err := mount.New().IsMountPoint(p)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// TestReconcileVolumes starts a service over records left by a daemon that
// went away: a target kubelet removed, a target left unmounted, a healthy
// mount, a mount left writable by a crash between bind and remount, and a
// mount the driver has no record of.
func TestReconcileVolumes(t *testing.T) {
	requireMounts(t)
	root := t.TempDir()
	unmountTreeAtEnd(t, root)
	kubelet := t.TempDir()
	s := openStore(t, root)
	modA := putBlob(t, s, wasmBody("a"))
	modB := putBlob(t, s, wasmBody("b"))
	view, err := s.ViewDir(modA, DefaultFileName)
	if err != nil {
		t.Fatal(err)
	}
	target := func(pod string) string {
		dir := filepath.Join(kubelet, "pods", pod, "volumes", "kubernetes.io~csi", "wasm")
		if err := os.MkdirAll(dir, 0o750); err != nil {
			t.Fatal(err)
		}
		return filepath.Join(dir, "mount")
	}
	record := func(id, tgt string, mod digest.Digest) store.VolumeRecord {
		rec := store.VolumeRecord{VolumeID: id, TargetPath: tgt, Image: "reg.example/" + id + ":1", PullPolicy: string(PullIfNotPresent),
			FileName: DefaultFileName, Module: mod, PublishedAt: time.Now().UTC()}
		if err := s.PutVolume(rec); err != nil {
			t.Fatal(err)
		}
		return rec
	}

	// Gone: kubelet unmounted and removed the pod while the daemon was down
	// (its parent directory is gone too for one, only the target for the
	// other).
	gone1 := record("gone1", target("gone1"), modA)
	if err := os.RemoveAll(filepath.Join(kubelet, "pods", "gone1")); err != nil {
		t.Fatal(err)
	}
	gone2 := record("gone2", target("gone2"), modB)
	// Pending: the target was made, the mount was not (or was undone by an
	// interrupted unpublish).
	pending := record("pending", target("pending"), modA)
	if err := os.Mkdir(pending.TargetPath, 0o750); err != nil {
		t.Fatal(err)
	}
	// Healthy: published, read-only.
	healthy := record("healthy", target("healthy"), modA)
	if err := os.Mkdir(healthy.TargetPath, 0o750); err != nil {
		t.Fatal(err)
	}
	unmountAtEnd(t, healthy.TargetPath)
	if err := mount.New().BindReadOnly(view, healthy.TargetPath); err != nil {
		t.Fatal(err)
	}
	// Writable: the crash came between the bind mount and its read-only
	// remount.
	writable := record("writable", target("writable"), modA)
	if err := os.Mkdir(writable.TargetPath, 0o750); err != nil {
		t.Fatal(err)
	}
	unmountAtEnd(t, writable.TargetPath)
	if err := unix.Mount(view, writable.TargetPath, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	// Unknown: mounted (writable) where a pod's volume would be, by someone
	// else; and a record of ours for a gone target in the same pod.
	foreign := t.TempDir()
	if err := os.WriteFile(filepath.Join(foreign, "theirs"), []byte("not ours"), 0o644); err != nil {
		t.Fatal(err)
	}
	unknown := target("unknown")
	if err := os.Mkdir(unknown, 0o750); err != nil {
		t.Fatal(err)
	}
	unmountAtEnd(t, unknown)
	if err := unix.Mount(foreign, unknown, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	gone3 := record("gone3", filepath.Join(filepath.Dir(unknown), "other-mount"), modB)
	unknownFlags := mountFlags(t, unknown)

	svc, logs := newTestService(t, root)
	res, err := svc.reconcile() // a second run finds nothing more to do
	if err != nil {
		t.Fatal(err)
	}
	if res.Removed != 0 || res.Remounted != 0 || res.Volumes != 3 || res.Mounted != 2 || res.Pending != 1 {
		t.Errorf("second reconcile: %+v, want nothing to do over 3 records (2 mounted, 1 pending)", res)
	}

	for _, rec := range []store.VolumeRecord{gone1, gone2, gone3} {
		if _, ok, err := s.GetVolume(rec.VolumeID, rec.TargetPath); err != nil || ok {
			t.Errorf("record of %s (target gone) still there (err %v)", rec.VolumeID, err)
		}
	}
	for _, rec := range []store.VolumeRecord{pending, healthy, writable} {
		if _, ok, err := s.GetVolume(rec.VolumeID, rec.TargetPath); err != nil || !ok {
			t.Errorf("record of %s was removed (err %v)", rec.VolumeID, err)
		}
	}
	// Uses: modA by pending, healthy, writable; modB by nothing left.
	if n := svc.uses.Count(modA); n != 3 {
		t.Errorf("uses of module A = %d, want 3 (pending, healthy, writable)", n)
	}
	if n := svc.uses.Count(modB); n != 0 {
		t.Errorf("uses of module B = %d, want 0: its volumes' targets are gone", n)
	}
	// Modules are kept: their removal is the collector's business.
	if !s.HasBlob(modA) || !s.HasBlob(modB) {
		t.Error("a module was removed by reconcile")
	}
	// The pending target is left as it was, for kubelet.
	if fi, err := os.Stat(pending.TargetPath); err != nil || !fi.IsDir() || isMounted(t, pending.TargetPath) {
		t.Errorf("pending target changed: stat %v, mounted %v", err, isMounted(t, pending.TargetPath))
	}
	if !strings.Contains(logs.String(), "left for kubelet") {
		t.Errorf("the pending volume was not logged:\n%s", logs)
	}
	// Our mounts serve the module, read-only.
	for _, rec := range []store.VolumeRecord{healthy, writable} {
		if got := mustRead(t, filepath.Join(rec.TargetPath, DefaultFileName)); !bytes.Equal(got, wasmBody("a")) {
			t.Errorf("%s serves %q", rec.VolumeID, got)
		}
		want := int64(unix.ST_RDONLY | unix.ST_NOSUID | unix.ST_NODEV)
		if f := mountFlags(t, rec.TargetPath); f&want != want {
			t.Errorf("%s is mounted with flags %#x, want ro,nosuid,nodev", rec.VolumeID, f)
		}
		err := os.WriteFile(filepath.Join(rec.TargetPath, "x"), nil, 0o644)
		if !errors.Is(err, unix.EROFS) {
			t.Errorf("writing into %s: %v, want EROFS", rec.VolumeID, err)
		}
	}
	// The unknown mount is untouched: still mounted, same flags, same file.
	if !isMounted(t, unknown) {
		t.Fatal("the mount the driver has no record of was unmounted")
	}
	if f := mountFlags(t, unknown); f != unknownFlags {
		t.Errorf("the unknown mount's flags changed from %#x to %#x", unknownFlags, f)
	}
	if got := mustRead(t, filepath.Join(unknown, "theirs")); string(got) != "not ours" {
		t.Errorf("the unknown mount serves %q", got)
	}

	// kubelet's calls still work on what was left: the pending volume's
	// retried publish mounts module A again, a gone volume's unpublish is
	// success.
	err = svc.Publish(context.Background(), PublishRequest{VolumeID: pending.VolumeID, TargetPath: pending.TargetPath,
		Image: mustRef(t, pending.Image), PullPolicy: PullIfNotPresent, FileName: DefaultFileName})
	unmountAtEnd(t, pending.TargetPath)
	if err != nil {
		t.Fatalf("retried publish of the pending volume: %v", err)
	}
	if got := mustRead(t, filepath.Join(pending.TargetPath, DefaultFileName)); !bytes.Equal(got, wasmBody("a")) {
		t.Errorf("pending volume serves %q after its retry", got)
	}
	if err := svc.Unpublish(context.Background(), gone1.VolumeID, gone1.TargetPath); err != nil {
		t.Errorf("unpublish of a forgotten volume: %v", err)
	}
	for _, rec := range []store.VolumeRecord{pending, healthy, writable} {
		if err := svc.Unpublish(context.Background(), rec.VolumeID, rec.TargetPath); err != nil {
			t.Fatalf("unpublish %s: %v", rec.VolumeID, err)
		}
	}
	if n := svc.uses.Count(modA); n != 0 {
		t.Errorf("uses of module A after every unpublish = %d", n)
	}
	if !isMounted(t, unknown) {
		t.Error("the unknown mount was unmounted by the unpublishes")
	}
}

// TestReconcileBlobs checks stored modules' sizes at start: a module too
// short to be Wasm, or not the size its tag record says, is removed unless
// a volume uses it; good modules and foreign files are kept.
func TestReconcileBlobs(t *testing.T) {
	root := t.TempDir()
	s := openStore(t, root)
	putRef := func(name string, d digest.Digest, size int64) {
		if err := s.PutRef(store.RefRecord{Ref: "reg.example/" + name + ":1", Manifest: digest.FromString(name), Module: d, Size: size}); err != nil {
			t.Fatal(err)
		}
	}
	good := putBlob(t, s, wasmBody("good"))
	putRef("good", good, int64(len(wasmBody("good"))))
	short := putBlob(t, s, []byte("\x00asm"))
	putRef("short", short, 4)
	wrongSize := putBlob(t, s, wasmBody("wrong"))
	putRef("wrong", wrongSize, 1<<20)
	// An old record without a size says nothing.
	noSize := putBlob(t, s, wasmBody("nosize"))
	putRef("nosize", noSize, 0)
	// Damaged and in use: kept, logged.
	inUse := putBlob(t, s, wasmBody("inuse"))
	putRef("inuse", inUse, 3)
	if err := s.PutVolume(store.VolumeRecord{VolumeID: "v", TargetPath: t.TempDir(), Module: inUse, FileName: DefaultFileName}); err != nil {
		t.Fatal(err)
	}
	foreign := filepath.Join(root, "blobs", "sha256", "README")
	if err := os.WriteFile(foreign, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}

	svc, logs := newTestService(t, root)
	_ = svc
	for _, d := range []digest.Digest{short, wrongSize} {
		if s.HasBlob(d) {
			t.Errorf("damaged unused module %s kept", d)
		}
		if _, err := os.Stat(filepath.Join(root, "views", d.Encoded())); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("views of removed module %s: %v", d, err)
		}
	}
	if _, ok := s.GetRef("reg.example/short:1"); ok {
		t.Error("the tag record of a removed module is still found")
	}
	for _, d := range []digest.Digest{good, noSize, inUse} {
		if !s.HasBlob(d) {
			t.Errorf("module %s was removed", d)
		}
	}
	if _, err := os.Stat(foreign); err != nil {
		t.Errorf("foreign file: %v", err)
	}
	for _, want := range []string{"damaged stored module removed", "damaged and in use", "foreign file"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log does not say %q:\n%s", want, logs)
		}
	}
	res, err := svc.reconcile()
	if err != nil {
		t.Fatal(err)
	}
	if res.BadBlobs != 1 || res.RemovedBlobs != 0 {
		t.Errorf("second reconcile: %+v, want only the in-use damaged module found", res)
	}
}

func mustRef(t *testing.T, s string) puller.Reference {
	t.Helper()
	ref, err := puller.ParseReference(s)
	if err != nil {
		t.Fatal(err)
	}
	return ref
}
