package store

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// mountFS mounts a fresh filesystem of type fstype on a temp dir and
// unmounts it when the test ends. It skips the test where mounting is not
// permitted (not root).
func mountFS(t *testing.T, fstype, opts string) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount(fstype, dir, fstype, 0, opts); err != nil {
		if errors.Is(err, unix.EPERM) {
			t.Skipf("cannot mount %s here: %v", fstype, err)
		}
		t.Fatalf("mount %s on %s: %v", fstype, dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}

func openStore(t *testing.T, root string) *Store {
	t.Helper()
	s, err := Open(root)
	if err != nil {
		t.Fatalf("Open(%s): %v", root, err)
	}
	return s
}

func content(n int, seed uint64) []byte {
	var s [32]byte
	binary.LittleEndian.PutUint64(s[:], seed)
	binary.LittleEndian.PutUint64(s[8:], uint64(n))
	b := make([]byte, n)
	rand.NewChaCha8(s).Read(b)
	return b
}

func sha(b []byte) digest.Digest {
	sum := sha256.Sum256(b)
	return digest.Digest("sha256:" + hex.EncodeToString(sum[:]))
}

// writePieces writes b to w in random-sized pieces.
func writePieces(t *testing.T, w *BlobWriter, b []byte, seed uint64) {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, 99))
	for len(b) > 0 {
		n := 1 + r.IntN(min(len(b), 300_000))
		switch r.IntN(4) { // some tiny writes too
		case 0:
			n = min(n, 1+r.IntN(17))
		}
		m, err := w.Write(b[:n])
		if err != nil || m != n {
			t.Fatalf("Write(%d bytes) = %d, %v", n, m, err)
		}
		b = b[n:]
	}
}

// temps lists the temp files and directories anywhere under root.
func temps(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != root && strings.HasPrefix(d.Name(), tmpPrefix) {
			out = append(out, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func noTemps(t *testing.T, root string) {
	t.Helper()
	if tt := temps(t, root); len(tt) > 0 {
		t.Errorf("temp files left: %v", tt)
	}
}

// checkBlob checks the blob of want is stored, exactly, read-only.
func checkBlob(t *testing.T, s *Store, d digest.Digest, want []byte) {
	t.Helper()
	p := s.BlobPath(d)
	if p != filepath.Join(s.Root(), "blobs", "sha256", d.Encoded()) {
		t.Errorf("BlobPath = %s", p)
	}
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatalf("blob %s: %v", d, err)
	}
	if !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o444 {
		t.Errorf("blob mode %v, want a regular file, 0444", fi.Mode())
	}
	got, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("blob holds %d bytes (sha %s), want %d (sha %s)", len(got), sha(got), len(want), sha(want))
	}
	if !s.HasBlob(d) {
		t.Errorf("HasBlob(%s) = false", d)
	}
}

// filesystems are the store roots BlobWriter is tested on: ext4 (O_DIRECT),
// tmpfs (O_DIRECT since Linux 6.6, buffered before) and ramfs (which
// refuses O_DIRECT: the buffered fallback).
var filesystems = []struct {
	name   string
	root   func(t *testing.T) string
	direct int // 1: O_DIRECT expected, 0: buffered expected, -1: either
}{
	{"ext4", func(t *testing.T) string { return t.TempDir() }, 1},
	{"tmpfs", func(t *testing.T) string { return mountFS(t, "tmpfs", "size=64m") }, -1},
	{"ramfs", func(t *testing.T) string { return mountFS(t, "ramfs", "") }, 0},
}

func checkMode(t *testing.T, w *BlobWriter, direct int) {
	t.Helper()
	if direct >= 0 && w.direct != (direct == 1) {
		t.Errorf("BlobWriter direct = %v, want %v", w.direct, direct == 1)
	}
}

func TestOpenStoreLayout(t *testing.T) {
	root := filepath.Join(t.TempDir(), "store")
	s := openStore(t, root)
	if s.Root() != root {
		t.Errorf("Root() = %q", s.Root())
	}
	for _, d := range []string{"blobs/sha256", "refs", "views", "volumes", "pulls"} {
		fi, err := os.Stat(filepath.Join(root, d))
		if err != nil || !fi.IsDir() {
			t.Errorf("%s: %v", d, err)
		}
	}
	// Opening again is fine.
	openStore(t, root)
}

func TestOpenStoreRemovesTemps(t *testing.T) {
	// The root's own name starts with the temp prefix: it is not a temp.
	root := filepath.Join(t.TempDir(), ".tmp-store")
	hexd := strings.Repeat("ab", 32)
	keep := []string{
		"blobs/sha256/" + hexd,
		"refs/" + hexd + ".json",
		"views/" + hexd + "/plugin.wasm/plugin.wasm",
		"views/" + hexd + "/x.tmp-/x.tmp-",
		"volumes/" + hexd + ".json",
		"volumes/tmp-1.json",
		"volumes/x.tmp-1",
		"refs/.tmp",
		"other/file",
	}
	remove := []string{
		"blobs/sha256/.tmp-0123456789abcdef",
		"blobs/.tmp-x",
		"refs/.tmp-1234",
		"views/" + hexd + "/plugin.wasm/.tmp-plugin.wasm",
		"views/.tmp-dir/a/b/c",
		"views/" + hexd + "/.tmp-half/.tmp-half",
		"volumes/.tmp-9",
		".tmp-at-root",
		"other/.tmp-z",
	}
	for _, p := range append(append([]string{}, keep...), remove...) {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(p), 0o444); err != nil {
			t.Fatal(err)
		}
	}
	// A read-only temp dir with a read-only file in it.
	if err := os.Chmod(filepath.Join(root, "views/.tmp-dir/a/b"), 0o555); err != nil {
		t.Fatal(err)
	}
	openStore(t, root)

	var got []string
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		if !d.IsDir() {
			rel, _ := filepath.Rel(root, p)
			got = append(got, rel)
		}
		return nil
	})
	// ...and the format record of the store it migrated (format.go).
	want := append(slices.Clone(keep), formatFileName)
	slices.Sort(want)
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("files after OpenStore:\n %v\nwant\n %v", got, want)
	}
	for _, p := range keep {
		if b, err := os.ReadFile(filepath.Join(root, p)); err != nil || string(b) != p {
			t.Errorf("%s changed: %q, %v", p, b, err)
		}
	}
	for _, d := range []string{"views/.tmp-dir", "views/" + hexd + "/.tmp-half"} {
		if _, err := os.Lstat(filepath.Join(root, d)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("temp dir %s still there: %v", d, err)
		}
	}
}

var blobSizes = []int{0, 1, 4095, 4096, 4097, 1<<20 - 1, 1 << 20, 1<<20 + 1, 2 << 20, 3<<20 + 17}

func TestBlobWriterSizes(t *testing.T) {
	for _, fsys := range filesystems {
		t.Run(fsys.name, func(t *testing.T) {
			s := openStore(t, fsys.root(t))
			for i, size := range blobSizes {
				t.Run(strconv.Itoa(size), func(t *testing.T) {
					data := content(size, uint64(i))
					w, err := s.NewBlobWriter(nil)
					if err != nil {
						t.Fatalf("NewBlobWriter: %v", err)
					}
					checkMode(t, w, fsys.direct)
					writePieces(t, w, data, uint64(i))
					if w.Size() != int64(size) {
						t.Errorf("Size() = %d, want %d", w.Size(), size)
					}
					if w.Digest() != sha(data) {
						t.Errorf("Digest() = %s, want %s", w.Digest(), sha(data))
					}
					d, err := w.Commit(nil)
					if err != nil {
						t.Fatalf("Commit: %v", err)
					}
					if d != sha(data) {
						t.Errorf("Commit = %s, want %s", d, sha(data))
					}
					checkBlob(t, s, d, data)
					noTemps(t, s.Root())
					// Finished: a second Commit fails, Abort is a no-op.
					if _, err := w.Commit(nil); err == nil {
						t.Error("second Commit succeeded")
					}
					w.Abort()
					checkBlob(t, s, d, data)
				})
			}
		})
	}
}

func TestBlobWriterReset(t *testing.T) {
	tests := []struct {
		name   string
		first  []int // sizes written then discarded by a Reset each
		second int
	}{
		{"reset before writing", []int{0}, 1000},
		{"small then small", []int{100}, 10},
		{"tail only then larger", []int{5}, 1<<20 + 3},
		{"after a tail", []int{1<<20 + 5}, 10},
		{"after a full stage", []int{1 << 20}, 4096},
		{"long then short", []int{2<<20 + 512<<10}, 10},
		{"long then long", []int{3 << 20}, 3<<20 - 1},
		{"long then empty", []int{2 << 20}, 0},
		{"reset twice", []int{1<<20 + 1, 7}, 4097},
		{"reset thrice", []int{0, 3<<20 + 1, 0}, 1<<20 + 1},
	}
	for _, fsys := range filesystems {
		t.Run(fsys.name, func(t *testing.T) {
			s := openStore(t, fsys.root(t))
			for i, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					w, err := s.NewBlobWriter(nil)
					if err != nil {
						t.Fatal(err)
					}
					defer w.Abort()
					for j, n := range tt.first {
						writePieces(t, w, content(n, uint64(1000+10*i+j)), uint64(j))
						if err := w.Reset(); err != nil {
							t.Fatalf("Reset: %v", err)
						}
						if w.Size() != 0 || w.Digest() != sha(nil) {
							t.Fatalf("after Reset: Size %d Digest %s", w.Size(), w.Digest())
						}
						checkMode(t, w, fsys.direct)
					}
					data := content(tt.second, uint64(i))
					writePieces(t, w, data, 5)
					d, err := w.Commit(nil)
					if err != nil {
						t.Fatalf("Commit: %v", err)
					}
					if d != sha(data) {
						t.Errorf("Commit = %s, want %s", d, sha(data))
					}
					checkBlob(t, s, d, data)
					noTemps(t, s.Root())
				})
			}
		})
	}
}

func TestBlobWriterVerifyFails(t *testing.T) {
	for _, fsys := range filesystems {
		t.Run(fsys.name, func(t *testing.T) {
			s := openStore(t, fsys.root(t))
			for _, size := range []int{10, 2<<20 + 3} {
				data := content(size, 3)
				w, err := s.NewBlobWriter(nil)
				if err != nil {
					t.Fatal(err)
				}
				writePieces(t, w, data, 3)
				errBad := errors.New("not a valid module")
				var seen []byte
				var seenMode fs.FileMode
				_, err = w.Commit(func(p string) error {
					if filepath.Dir(p) != filepath.Join(s.Root(), "blobs", "sha256") || !strings.HasPrefix(filepath.Base(p), tmpPrefix) {
						t.Errorf("verify sees %s, want a temp file in the blob dir", p)
					}
					seen, _ = os.ReadFile(p)
					if fi, err := os.Stat(p); err == nil {
						seenMode = fi.Mode()
					}
					return errBad
				})
				if !errors.Is(err, errBad) {
					t.Fatalf("Commit = %v, want the verify error", err)
				}
				if !bytes.Equal(seen, data) {
					t.Errorf("verify saw %d bytes, want the %d written", len(seen), len(data))
				}
				if !seenMode.IsRegular() {
					t.Errorf("verify saw mode %v", seenMode)
				}
				if s.HasBlob(sha(data)) {
					t.Error("a module that failed verification is stored")
				}
				if _, err := os.Stat(s.BlobPath(sha(data))); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("blob path: %v", err)
				}
				noTemps(t, s.Root())
				w.Abort()
			}
			// A verify that passes sees the same and lets the commit through.
			data := content(5000, 4)
			w, _ := s.NewBlobWriter(nil)
			writePieces(t, w, data, 4)
			d, err := w.Commit(func(p string) error {
				if b, _ := os.ReadFile(p); !bytes.Equal(b, data) {
					return errors.New("verify saw other bytes")
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			checkBlob(t, s, d, data)
		})
	}
}

func TestBlobWriterSameContentTwice(t *testing.T) {
	for _, fsys := range filesystems {
		t.Run(fsys.name, func(t *testing.T) {
			s := openStore(t, fsys.root(t))
			data := content(1<<20+100, 8)
			var ds []digest.Digest
			for i := range 2 {
				w, err := s.NewBlobWriter(nil)
				if err != nil {
					t.Fatal(err)
				}
				writePieces(t, w, data, uint64(i))
				d, err := w.Commit(nil)
				if err != nil {
					t.Fatalf("Commit %d: %v", i, err)
				}
				ds = append(ds, d)
			}
			if ds[0] != sha(data) || ds[1] != ds[0] {
				t.Errorf("digests %v, want %s twice", ds, sha(data))
			}
			entries, err := os.ReadDir(filepath.Join(s.Root(), "blobs", "sha256"))
			if err != nil {
				t.Fatal(err)
			}
			if len(entries) != 1 || entries[0].Name() != sha(data).Encoded() {
				t.Errorf("blob dir holds %v, want the one blob", entries)
			}
			checkBlob(t, s, ds[0], data)
		})
	}
}

func TestBlobWriterAbort(t *testing.T) {
	for _, fsys := range filesystems {
		t.Run(fsys.name, func(t *testing.T) {
			s := openStore(t, fsys.root(t))
			for _, size := range []int{0, 100, 1 << 20, 2<<20 + 1} {
				w, err := s.NewBlobWriter(nil)
				if err != nil {
					t.Fatal(err)
				}
				if tt := temps(t, s.Root()); len(tt) != 1 {
					t.Errorf("a writer has %d temp files, want 1: %v", len(tt), tt)
				}
				data := content(size, 9)
				writePieces(t, w, data, 9)
				w.Abort()
				noTemps(t, s.Root())
				w.Abort() // twice is fine
				if _, err := w.Commit(nil); err == nil {
					t.Error("Commit after Abort succeeded")
				}
				if s.HasBlob(sha(data)) {
					t.Errorf("an aborted %d-byte module is stored", size)
				}
			}
		})
	}
}

// forceBuffered turns a new O_DIRECT writer into a buffered one, as on a
// filesystem that refuses O_DIRECT.
func forceBuffered(t *testing.T, w *BlobWriter) {
	t.Helper()
	if !w.direct {
		return
	}
	if err := w.waitDirectWriter(); err != nil {
		t.Fatal(err)
	}
	if err := setDirect(w.f, false); err != nil {
		t.Fatal(err)
	}
	w.stage, w.direct = nil, false
}

func TestBlobWriterNoSpace(t *testing.T) {
	for _, mode := range []string{"as opened", "buffered"} {
		t.Run(mode, func(t *testing.T) {
			root := mountFS(t, "tmpfs", "size=1m")
			s := openStore(t, root)
			w, err := s.NewBlobWriter(nil)
			if err != nil {
				t.Fatal(err)
			}
			if mode == "buffered" {
				forceBuffered(t, w)
			}
			data := content(2<<20, 11)
			var werr error
			for off := 0; off < len(data) && werr == nil; off += 64 << 10 {
				_, werr = w.Write(data[off : off+64<<10])
			}
			if mode == "buffered" && werr == nil {
				t.Error("a buffered writer took 2 MiB on a 1 MiB filesystem without an error")
			}
			if werr == nil {
				// O_DIRECT writes run in the background: the error comes at Commit.
				_, werr = w.Commit(nil)
			}
			if werr == nil {
				t.Fatal("2 MiB were stored on a 1 MiB filesystem")
			}
			if !errors.Is(werr, errdefs.ErrNoSpace) || !errors.Is(werr, syscall.ENOSPC) {
				t.Errorf("error %v is not errdefs.ErrNoSpace wrapping ENOSPC", werr)
			}
			var ne *errdefs.Error
			if !errors.As(werr, &ne) || !strings.Contains(ne.Msg, "disk is full") {
				t.Errorf("error %#v does not say the disk is full", werr)
			}
			w.Abort()
			noTemps(t, root)
			if s.HasBlob(sha(data)) {
				t.Error("a partial module is stored")
			}
			// The space is back: a small module fits.
			small := content(64<<10, 12)
			w, err = s.NewBlobWriter(nil)
			if err != nil {
				t.Fatal(err)
			}
			writePieces(t, w, small, 12)
			d, err := w.Commit(nil)
			if err != nil {
				t.Fatalf("a small module after ENOSPC: %v", err)
			}
			checkBlob(t, s, d, small)
		})
	}
}

func TestHasBlob(t *testing.T) {
	s := openStore(t, t.TempDir())
	data := []byte("module")
	w, _ := s.NewBlobWriter(nil)
	w.Write(data)
	d, err := w.Commit(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		d    digest.Digest
		want bool
	}{
		{d, true},
		{sha([]byte("other")), false},
		{"", false},
		{"sha256:zz", false},
		{"sha512:" + digest.Digest(strings.Repeat("ab", 64)), false},
		{"sha256:" + digest.Digest(strings.ToUpper(d.Encoded())), false},
	} {
		if got := s.HasBlob(tt.d); got != tt.want {
			t.Errorf("HasBlob(%q) = %v, want %v", tt.d, got, tt.want)
		}
	}
	// A directory at a blob's path is not a blob.
	dd := sha([]byte("dir"))
	os.Mkdir(s.BlobPath(dd), 0o755)
	if s.HasBlob(dd) {
		t.Error("HasBlob of a directory")
	}
}

func putBlob(t *testing.T, s *Store, data []byte) digest.Digest {
	t.Helper()
	w, err := s.NewBlobWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	d, err := w.Commit(nil)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestRefRecord(t *testing.T) {
	s := openStore(t, t.TempDir())
	mod := putBlob(t, s, []byte("\x00asm\x01\x00\x00\x00"))
	rec := RefRecord{
		Ref:      "ghcr.io/acme/x:1",
		Manifest: sha([]byte("manifest")),
		Module:   mod,
		Size:     8,
		Layout:   "cncf-wasm",
		PulledAt: time.Date(2026, 3, 4, 5, 6, 7, 890123456, time.UTC),
	}
	if _, ok := s.GetRef(rec.Ref); ok {
		t.Fatal("GetRef before PutRef")
	}
	if err := s.PutRef(rec); err != nil {
		t.Fatal(err)
	}
	got, ok := s.GetRef(rec.Ref)
	if !ok {
		t.Fatal("GetRef after PutRef: not found")
	}
	if got != rec || !got.PulledAt.Equal(rec.PulledAt) {
		t.Errorf("GetRef = %+v, want %+v", got, rec)
	}
	noTemps(t, s.Root())
	// Overwriting is fine and wins.
	rec2 := rec
	rec2.Manifest = sha([]byte("manifest 2"))
	if err := s.PutRef(rec2); err != nil {
		t.Fatal(err)
	}
	if got, ok := s.GetRef(rec.Ref); !ok || got.Manifest != rec2.Manifest {
		t.Errorf("after a second PutRef: %+v, %v", got, ok)
	}
	// Another ref is another record.
	if _, ok := s.GetRef("ghcr.io/acme/x:2"); ok {
		t.Error("GetRef of another tag found a record")
	}
	// A record whose module is gone is not found.
	gone := rec
	gone.Ref = "ghcr.io/acme/gone:1"
	gone.Module = sha([]byte("not stored"))
	if err := s.PutRef(gone); err != nil {
		t.Fatal(err)
	}
	if got, ok := s.GetRef(gone.Ref); ok {
		t.Errorf("GetRef with the module missing = %+v", got)
	}
	// A record file under another ref's name (a collision, a copied
	// file) is not that ref's.
	if err := os.WriteFile(s.refPath("ghcr.io/acme/other:1"), mustRead(t, s.refPath(rec.Ref)), 0o444); err != nil {
		t.Fatal(err)
	}
	if got, ok := s.GetRef("ghcr.io/acme/other:1"); ok {
		t.Errorf("GetRef of a record naming another ref = %+v", got)
	}
	// A corrupt record is not found.
	os.Remove(s.refPath(rec.Ref))
	os.WriteFile(s.refPath(rec.Ref), []byte("{"), 0o444)
	if _, ok := s.GetRef(rec.Ref); ok {
		t.Error("GetRef of a corrupt record")
	}
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func inode(t *testing.T, p string) (uint64, uint64) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino, uint64(st.Nlink)
}

func TestViewDir(t *testing.T) {
	s := openStore(t, t.TempDir())
	data := []byte("\x00asm\x01\x00\x00\x00view")
	d := putBlob(t, s, data)
	blobIno, _ := inode(t, s.BlobPath(d))

	dir, err := s.ViewDir(d, "plugin.wasm")
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(s.Root(), "views", d.Encoded(), viewKey("plugin.wasm")); dir != want {
		t.Errorf("ViewDir = %s, want %s", dir, want)
	}
	file := filepath.Join(dir, "plugin.wasm")
	if !sameFile(file, s.BlobPath(d)) {
		t.Fatal("the view's file is not the blob")
	}
	if b := mustRead(t, file); !bytes.Equal(b, data) {
		t.Errorf("view file holds %q", b)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("view dir holds %v, want the one file", entries)
	}

	// Idempotent: same dir, same inode, no new link.
	dir2, err := s.ViewDir(d, "plugin.wasm")
	if err != nil || dir2 != dir {
		t.Fatalf("second ViewDir = %s, %v", dir2, err)
	}
	if _, nlink := inode(t, s.BlobPath(d)); nlink != 2 {
		t.Errorf("blob has %d links after two ViewDir of one name, want 2", nlink)
	}

	// Another name: another dir, the same inode.
	dir3, err := s.ViewDir(d, "header.wasm")
	if err != nil {
		t.Fatal(err)
	}
	if dir3 == dir || dir3 != filepath.Join(s.Root(), "views", d.Encoded(), viewKey("header.wasm")) {
		t.Errorf("ViewDir for header.wasm = %s", dir3)
	}
	for _, f := range []string{filepath.Join(dir, "plugin.wasm"), filepath.Join(dir3, "header.wasm")} {
		if ino, _ := inode(t, f); ino != blobIno {
			t.Errorf("%s is inode %d, the blob %d", f, ino, blobIno)
		}
	}
	if _, nlink := inode(t, s.BlobPath(d)); nlink != 3 {
		t.Errorf("blob has %d links, want 3", nlink)
	}

	// A foreign file at the view's name is replaced by the blob.
	os.Remove(file)
	os.WriteFile(file, []byte("foreign"), 0o444)
	if _, err := s.ViewDir(d, "plugin.wasm"); err != nil {
		t.Fatal(err)
	}
	if !sameFile(file, s.BlobPath(d)) {
		t.Error("a foreign file at the view's name was kept")
	}
	noTemps(t, s.Root())

	// A module that is not stored has no view.
	if dir, err := s.ViewDir(sha([]byte("absent")), "plugin.wasm"); err == nil {
		t.Errorf("ViewDir of an absent module = %s", dir)
	}
	noTemps(t, s.Root())
}

func TestVolumeRecords(t *testing.T) {
	s := openStore(t, t.TempDir())
	at := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	recs := []VolumeRecord{
		{VolumeID: "csi-1", TargetPath: "/var/lib/kubelet/pods/a/volumes/kubernetes.io~csi/filter/mount", Image: "ghcr.io/acme/x:1",
			PullPolicy: "IfNotPresent", SHA256: "sha256:" + strings.Repeat("1", 64), FileName: "plugin.wasm",
			Module: sha([]byte("m1")), Manifest: sha([]byte("man1")), PodName: "gw-1", PodNS: "istio-system", PodUID: "uid-1", PublishedAt: at},
		{VolumeID: "csi-1", TargetPath: "/var/lib/kubelet/pods/b/volumes/kubernetes.io~csi/filter/mount", Image: "ghcr.io/acme/x:1",
			PullPolicy: "Always", FileName: "header.wasm", Module: sha([]byte("m1")), Manifest: sha([]byte("man1")), PublishedAt: at},
		{VolumeID: "csi-2", TargetPath: "/t", Image: "busybox", PullPolicy: "Never", FileName: "b.wasm",
			Module: sha([]byte("m2")), Manifest: sha([]byte("man2")), PublishedAt: at.Add(time.Hour)},
	}
	if _, ok, err := s.GetVolume("csi-1", recs[0].TargetPath); ok || err != nil {
		t.Fatalf("GetVolume before PutVolume = %v, %v", ok, err)
	}
	for _, r := range recs {
		if err := s.PutVolume(r); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range recs {
		got, ok, err := s.GetVolume(r.VolumeID, r.TargetPath)
		if err != nil || !ok || got != r {
			t.Errorf("GetVolume(%s, %s) = %+v, %v, %v; want %+v", r.VolumeID, r.TargetPath, got, ok, err, r)
		}
	}
	// Same id at another target, or another id at the same target: none.
	if _, ok, _ := s.GetVolume("csi-2", recs[0].TargetPath); ok {
		t.Error("GetVolume of another id at a known target found a record")
	}
	if _, ok, _ := s.GetVolume("csi-1", "/t"); ok {
		t.Error("GetVolume of a known id at another target found a record")
	}

	// ListVolumes ignores temp files, other files and corrupt records.
	vd := filepath.Join(s.Root(), "volumes")
	os.WriteFile(filepath.Join(vd, ".tmp-123"), mustJSON(recs[0]), 0o600)
	os.WriteFile(filepath.Join(vd, "notes.txt"), mustJSON(recs[0]), 0o600)
	os.WriteFile(filepath.Join(vd, "bad.json"), []byte("{not json"), 0o600)
	list, err := s.ListVolumes()
	if err != nil {
		t.Fatal(err)
	}
	sortRecs(list)
	want := slices.Clone(recs)
	sortRecs(want)
	if !slices.Equal(list, want) {
		t.Errorf("ListVolumes = %+v\nwant %+v", list, want)
	}

	if err := s.DeleteVolume("csi-1", recs[0].TargetPath); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := s.GetVolume("csi-1", recs[0].TargetPath); ok || err != nil {
		t.Errorf("GetVolume after DeleteVolume = %v, %v", ok, err)
	}
	if got, ok, _ := s.GetVolume("csi-1", recs[1].TargetPath); !ok || got != recs[1] {
		t.Error("deleting one target of a volume id removed another")
	}
	// Deleting a missing record is success.
	if err := s.DeleteVolume("csi-1", recs[0].TargetPath); err != nil {
		t.Errorf("DeleteVolume of a missing record: %v", err)
	}
	if err := s.DeleteVolume("never", "/x"); err != nil {
		t.Errorf("DeleteVolume of a never-seen record: %v", err)
	}
	list, _ = s.ListVolumes()
	if len(list) != 2 {
		t.Errorf("ListVolumes after a delete: %d records, want 2", len(list))
	}
	// A record that cannot be read is an error, not "absent".
	p := s.volumePath("csi-2", "/t")
	os.Remove(p)
	os.Mkdir(p, 0o755)
	if _, _, err := s.GetVolume("csi-2", "/t"); err == nil {
		t.Error("GetVolume of an unreadable record: no error")
	}
}

func mustJSON(r VolumeRecord) []byte {
	return []byte(`{"volumeID":"` + r.VolumeID + `","targetPath":"` + r.TargetPath + `"}`)
}

func sortRecs(rs []VolumeRecord) {
	slices.SortFunc(rs, func(a, b VolumeRecord) int {
		return strings.Compare(a.VolumeID+"\x00"+a.TargetPath, b.VolumeID+"\x00"+b.TargetPath)
	})
}

func TestStorageError(t *testing.T) {
	for _, tt := range []struct {
		err  error
		kind error
	}{
		{&os.PathError{Op: "write", Path: "/x", Err: syscall.ENOSPC}, errdefs.ErrNoSpace},
		{&os.PathError{Op: "write", Path: "/x", Err: syscall.EDQUOT}, errdefs.ErrNoSpace},
		{&os.PathError{Op: "write", Path: "/x", Err: syscall.EIO}, errdefs.ErrInternal},
		{errors.New("other"), errdefs.ErrInternal},
	} {
		err := storageError(tt.err, "writing")
		if !errors.Is(err, tt.kind) || !errors.Is(err, tt.err) {
			t.Errorf("storageError(%v) = %v, want kind %v wrapping the cause", tt.err, err, tt.kind)
		}
		if !strings.HasPrefix(err.Error(), "writing") {
			t.Errorf("message %q does not say what was done", err.Error())
		}
	}
}
