// Package store is the node's content-addressed module store and the
// driver's records on disk: module blobs and the blob writer that streams
// them in, tag records (what a reference resolved to), the views pods
// mount, volume records, the count of each module's uses, and which unused
// modules garbage collection may delete.
//
// It owns: every path under the store's root and every file written there
// (temp file in the same directory, verify, sync, chmod read-only, rename);
// disk is the truth after a restart, Uses a cache of the volume records.
//
// It must not: reach a registry, decide how a module is validated (Commit
// takes a verify function), or make pods' mounts (it only unmounts the
// read-only views of a module it removes). No other package reads or
// writes under the root except through its methods.
package store

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// Store is the content-addressed module store under the root directory:
//
//	blobs/sha256/<hex>        module bytes, read-only, named by their sha256
//	refs/<sha256(ref)>.json   which module an image reference resolved to
//	views/<hex>/<key>/<file>  a hard link to the blob (key: a hash of <file>)
//	ro/<hex>/<key>            that directory as a read-only overlayfs, which pods mount
//	volumes/<sha256(id)>.json one record per published volume
//	verify/<hex>.json         what is known of a manifest's signatures
//	pulls/<temp>.json         a download in flight (pulls.go), removed at its end
//	format.json               the layout's version (see FormatVersion)
//
// Every file is written as a temp file (".tmp-" prefix) in its final
// directory, synced, made read-only and renamed into place. Temp files are
// never looked up and are removed at start.
type Store struct {
	root    string
	foundAt int // the format version Open found
}

const tmpPrefix = ".tmp-"

// Open creates the layout under root if needed and removes leftovers of
// interrupted writes.
//
// The store's format version is checked first: a store written by a newer
// driver is refused (errdefs.ErrStoreFormat) before anything is changed,
// and an older one is migrated to FormatVersion (see format.go).
func Open(root string) (*Store, error) {
	s, err := openChecked(root)
	if err != nil {
		return nil, err
	}
	for _, d := range []string{s.blobDir(), s.refDir(), s.viewRoot(), s.volumeDir(), s.roRoot(), s.EmptyDir()} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("creating store directory %s: %w", d, err)
		}
	}
	if err := s.removeTemps(); err != nil {
		return nil, err
	}
	// No download is in flight at start: the records of those a crash or a
	// kill cut are dropped (their temp files went with removeTemps).
	if err := s.clearPulls(); err != nil {
		return nil, err
	}
	if _, err := os.Stat(s.formatPath()); s.foundAt < FormatVersion || errors.Is(err, os.ErrNotExist) {
		if err := s.migrate(s.foundAt); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// Check reports whether the store's directories are there and writable,
// for the health endpoint.
func (s *Store) Check(context.Context) error {
	f, err := os.CreateTemp(s.volumeDir(), tmpPrefix+"health-*")
	if err != nil {
		return storageError(err, "the store is not writable")
	}
	f.Close()
	return os.Remove(f.Name())
}

// Root is the store's root directory.
func (s *Store) Root() string { return s.root }

func (s *Store) blobDir() string  { return filepath.Join(s.root, "blobs", "sha256") }
func (s *Store) refDir() string   { return filepath.Join(s.root, "refs") }
func (s *Store) viewRoot() string { return filepath.Join(s.root, "views") }
func (s *Store) roRoot() string   { return filepath.Join(s.root, "ro") }

// EmptyDir is an empty directory, the second layer of the read-only
// overlays (overlayfs wants two layers when it has no upper one).
func (s *Store) EmptyDir() string { return filepath.Join(s.root, "ro", "empty") }

// CheckFileName says why name cannot be a module's file name in a volume
// (a phrase to follow the name), or nil: it must be a plain file name, and
// not use the store's temp-file prefix, which start-up cleanup removes.
func CheckFileName(name string) error {
	switch {
	case name == "":
		return errors.New("is empty")
	case name == "." || name == "..":
		return errors.New("is a directory name")
	case strings.ContainsAny(name, "/\x00"):
		return errors.New("contains / or NUL")
	case len(name) > 255:
		return errors.New("is longer than 255 bytes")
	case strings.HasPrefix(name, tmpPrefix):
		return errors.New("uses the reserved prefix " + tmpPrefix)
	}
	return nil
}

// viewKey names the view of a module under fileName: a hash, so that the
// paths handed to overlayfs hold no ':' ',' or '\' from a pod's fileName.
func viewKey(fileName string) string {
	sum := sha256.Sum256([]byte(fileName))
	return hex.EncodeToString(sum[:8])
}

// ReadOnlyViewPath is where the read-only overlay of module d under
// fileName is mounted; pods' targets are bind mounts of it.
func (s *Store) ReadOnlyViewPath(d digest.Digest, fileName string) string {
	return filepath.Join(s.roRoot(), d.Encoded(), viewKey(fileName))
}
func (s *Store) volumeDir() string { return filepath.Join(s.root, "volumes") }

// removeTemps deletes temp files left by a crash in every store directory.
func (s *Store) removeTemps() error {
	return filepath.WalkDir(s.root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == s.roRoot() {
			// Read-only overlays of views/: their files are views' files.
			return filepath.SkipDir
		}
		if p != s.root && strings.HasPrefix(d.Name(), tmpPrefix) { // not the root itself, whatever its name
			if d.IsDir() {
				// Make its directories writable first: root ignores their
				// modes, an unprivileged owner (a test) does not.
				_ = filepath.WalkDir(p, func(q string, e os.DirEntry, err error) error {
					if err == nil && e.IsDir() {
						_ = os.Chmod(q, 0o700)
					}
					return nil
				})
				if err := os.RemoveAll(p); err != nil {
					return err
				}
				return filepath.SkipDir
			}
			_ = os.Chmod(p, 0o600)
			return os.Remove(p)
		}
		return nil
	})
}

// BlobPath is where the module with digest d is stored.
func (s *Store) BlobPath(d digest.Digest) string {
	return filepath.Join(s.blobDir(), d.Encoded())
}

// HasBlob reports whether the module d is stored.
func (s *Store) HasBlob(d digest.Digest) bool {
	if d.Validate() != nil || d.Algorithm() != digest.SHA256 {
		return false
	}
	fi, err := os.Stat(s.BlobPath(d))
	return err == nil && fi.Mode().IsRegular()
}

// BlobWriter streams a module into a temp file beside its final place,
// hashing as it goes.
//
// Where the filesystem allows it, the file is written with O_DIRECT from an
// aligned staging buffer: a module is written once and read back by pods
// later, so filling the page cache while it downloads only costs time (on
// virtual machines, first-touch of fresh page-cache memory made a buffered
// 64 MiB write 5x slower than the download itself). The unaligned tail is
// written after O_DIRECT is switched off. Commit still fsyncs.
type BlobWriter struct {
	s      *Store
	f      *os.File
	h      hash.Hash
	n      int64
	direct bool
	stage  []byte // aligned; holds up to len(stage) bytes not yet written
	staged int
	// In direct mode full stage buffers go to a writer goroutine, so disk
	// writes overlap hashing; spare holds the buffers not in use.
	spare   chan []byte
	pending chan []byte
	wdone   chan error
	werr    error
	// failed is set by the writer goroutine on its first error, so the
	// next Write stops the download instead of finding out at Commit.
	failed atomic.Bool
	// flushed is the offset up to which buffered writeback was started.
	flushed int64
	done    bool
	// bufs is where the staging buffers come from and go back to; held
	// counts the ones taken (at most 2).
	bufs        StageBuffers
	held        int
	askedSecond bool
	// announced is the record of the download in flight (Announce), removed
	// when the writer finishes.
	announced string
}

// StageBuffers is where a BlobWriter in direct mode takes its staging
// buffers: puller.Buffers, the pool every pull of the node shares, so the
// writers of a burst reuse a few buffers under one budget instead of each
// allocating its own. Buffers must be page-aligned, all of one size, a
// multiple of the page size.
type StageBuffers interface {
	// Get returns a buffer, past the budget too: the writer's first.
	Get() []byte
	// TryGet returns a buffer within the budget, or nil: the second one,
	// which only lets disk writes overlap hashing.
	TryGet() []byte
	// Put gives a buffer back.
	Put([]byte)
}

// ownBuffers allocates a buffer per Get and lets the garbage collector
// have it back: for a writer given no pool.
type ownBuffers struct{}

func (ownBuffers) Get() []byte    { return alignedBuffer(stageSize) }
func (ownBuffers) TryGet() []byte { return alignedBuffer(stageSize) }
func (ownBuffers) Put([]byte)     {}

const (
	stageSize = 1 << 20
	alignment = 4096
)

// NewBlobWriter starts a new module write. Its staging buffers come from
// bufs, or are its own when bufs is nil; Commit and Abort give them back.
func (s *Store) NewBlobWriter(bufs StageBuffers) (*BlobWriter, error) {
	if bufs == nil {
		bufs = ownBuffers{}
	}
	f, direct, err := createTemp(s.blobDir())
	if err != nil {
		return nil, storageError(err, "creating a temp file in the store")
	}
	w := &BlobWriter{s: s, f: f, h: sha256.New(), direct: direct, bufs: bufs}
	if direct {
		w.startDirectWriter()
	}
	return w, nil
}

// stageBuffer returns a staging buffer from w.bufs: the first always, the
// second only within the pool's budget (nil otherwise). A buffer that is
// not page-aligned or not a whole number of pages cannot be written with
// O_DIRECT: it is given back and one of the writer's own is used.
func (w *BlobWriter) stageBuffer(first bool) []byte {
	var b []byte
	if first {
		b = w.bufs.Get()
	} else {
		b = w.bufs.TryGet()
	}
	if b == nil {
		return nil
	}
	if len(b) == 0 || len(b)%alignment != 0 || uintptr(unsafe.Pointer(&b[0]))%alignment != 0 {
		w.bufs.Put(b)
		b = alignedBuffer(stageSize)
	} else {
		w.held++
	}
	return b
}

// releaseBuffers gives the staging buffers back once the writer goroutine
// is gone (every buffer is then in w.stage or w.spare).
func (w *BlobWriter) releaseBuffers() {
	if w.pending != nil {
		return
	}
	put := func(b []byte) {
		if b != nil && w.held > 0 {
			w.held--
			w.bufs.Put(b)
		}
	}
	put(w.stage)
	w.stage = nil
	for w.spare != nil {
		select {
		case b := <-w.spare:
			put(b)
		default:
			w.spare = nil
		}
	}
}

// createTemp makes a new temp file in dir, with O_DIRECT when dir's
// filesystem supports it.
func createTemp(dir string) (*os.File, bool, error) {
	var rnd [8]byte
	for i := 0; ; i++ {
		if _, err := rand.Read(rnd[:]); err != nil {
			return nil, false, err
		}
		name := filepath.Join(dir, tmpPrefix+hex.EncodeToString(rnd[:]))
		f, err := os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL|syscall.O_DIRECT, 0o600)
		if err == nil {
			return f, true, nil
		}
		if errors.Is(err, syscall.EINVAL) {
			// Linux creates the file before it refuses O_DIRECT (ramfs,
			// some FUSE and network filesystems): drop it, or O_EXCL
			// below fails with EEXIST.
			_ = os.Remove(name)
			f, err = os.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
			return f, false, err
		}
		if !errors.Is(err, os.ErrExist) || i > 10 {
			return nil, false, err
		}
	}
}

// alignedBuffer returns n bytes starting at an address aligned for O_DIRECT.
func alignedBuffer(n int) []byte {
	b := make([]byte, n+alignment)
	off := int(uintptr(unsafe.Pointer(&b[0])) & (alignment - 1))
	if off != 0 {
		off = alignment - off
	}
	return b[off : off+n : off+n]
}

func (w *BlobWriter) Write(p []byte) (int, error) {
	w.h.Write(p)
	if !w.direct {
		n, err := w.f.Write(p)
		w.n += int64(n)
		if err != nil {
			return n, storageError(err, "writing the module to the store")
		}
		w.startWriteback()
		return n, nil
	}
	written := 0
	for written < len(p) {
		c := copy(w.stage[w.staged:], p[written:])
		w.staged += c
		written += c
		if w.staged == len(w.stage) {
			if err := w.flushStage(); err != nil {
				return written - c, err
			}
		}
	}
	w.n += int64(len(p))
	return len(p), nil
}

// startWriteback asks the kernel to begin writing back what a buffered
// writer wrote so far, without waiting, so Commit's fsync has little left.
func (w *BlobWriter) startWriteback() {
	if w.n-w.flushed >= writebackChunk {
		_ = unix.SyncFileRange(int(w.f.Fd()), w.flushed, w.n-w.flushed, unix.SYNC_FILE_RANGE_WRITE)
		w.flushed = w.n
	}
}

// writebackChunk is how much a buffered BlobWriter writes between writeback
// requests.
const writebackChunk = 8 << 20

// startDirectWriter starts the goroutine that writes full, aligned stage
// buffers with O_DIRECT while the caller hashes and fills the next one.
//
// It starts with one staging buffer (a small module never needs more);
// flushStage asks for the second.
func (w *BlobWriter) startDirectWriter() {
	if w.spare == nil {
		w.spare = make(chan []byte, 2)
	}
	if w.stage == nil {
		w.stage = w.stageBuffer(true)
	}
	w.pending = make(chan []byte, 2)
	w.wdone = make(chan error, 1)
	go func(f *os.File, pending <-chan []byte, spare chan<- []byte, done chan<- error, failed *atomic.Bool) {
		var err error
		for b := range pending {
			if err == nil {
				if _, err = f.Write(b); err != nil {
					failed.Store(true)
				}
			}
			spare <- b
		}
		done <- err
	}(w.f, w.pending, w.spare, w.wdone, &w.failed)
}

// waitDirectWriter stops the writer goroutine and returns its first error.
func (w *BlobWriter) waitDirectWriter() error {
	if w.pending == nil {
		return w.werr
	}
	close(w.pending)
	w.werr = <-w.wdone
	w.pending = nil
	if w.werr != nil {
		return storageError(w.werr, "writing the module to the store")
	}
	return nil
}

// flushStage hands a full stage buffer to the writer goroutine.
func (w *BlobWriter) flushStage() error {
	if w.failed.Load() {
		if err := w.waitDirectWriter(); err != nil {
			return err
		}
	}
	if w.pending == nil {
		// The writer goroutine is gone (after Commit, Abort or a failed
		// Reset): refuse, rather than spin on a full stage buffer.
		if err := w.waitDirectWriter(); err != nil {
			return err
		}
		return errdefs.New(errdefs.ErrInternal, "", nil, "write to a finished blob writer")
	}
	if !w.askedSecond {
		// The second buffer lets the next one fill while this one is
		// written; without it (the pool's budget is spent) the write
		// waits for the writer goroutine.
		w.askedSecond = true
		if b := w.stageBuffer(false); b != nil {
			w.spare <- b
		}
	}
	w.pending <- w.stage
	w.stage = <-w.spare
	w.staged = 0
	return nil
}

// flushTail waits for the writer goroutine, then writes the partial stage
// buffer with O_DIRECT switched off (it need not be aligned).
func (w *BlobWriter) flushTail() error {
	if w.stage == nil {
		return nil
	}
	if err := w.waitDirectWriter(); err != nil {
		return err
	}
	if w.staged == 0 {
		return nil
	}
	if w.direct {
		if err := setDirect(w.f, false); err != nil {
			return storageError(err, "switching off O_DIRECT for the tail")
		}
		w.direct = false
	}
	if _, err := w.f.Write(w.stage[:w.staged]); err != nil {
		return storageError(err, "writing the module to the store")
	}
	w.staged = 0
	return nil
}

func setDirect(f *os.File, on bool) error {
	fl, err := unix.FcntlInt(f.Fd(), unix.F_GETFL, 0)
	if err != nil {
		return err
	}
	if on {
		fl |= syscall.O_DIRECT
	} else {
		fl &^= syscall.O_DIRECT
	}
	_, err = unix.FcntlInt(f.Fd(), unix.F_SETFL, fl)
	return err
}

// Reset discards what was written.
func (w *BlobWriter) Reset() error {
	if w.stage != nil {
		if err := w.waitDirectWriter(); err != nil {
			return err
		}
	}
	if _, err := w.f.Seek(0, io.SeekStart); err != nil {
		return storageError(err, "rewinding a temp file")
	}
	if err := w.f.Truncate(0); err != nil {
		return storageError(err, "truncating a temp file")
	}
	if w.stage != nil {
		if !w.direct {
			if err := setDirect(w.f, true); err != nil {
				return storageError(err, "switching on O_DIRECT")
			}
			w.direct = true
		}
		w.failed.Store(false)
		w.startDirectWriter()
	}
	w.h.Reset()
	w.n, w.flushed, w.staged = 0, 0, 0
	return nil
}

// Size is the number of bytes written so far.
func (w *BlobWriter) Size() int64 { return w.n }

// Digest is the sha256 of what was written so far.
func (w *BlobWriter) Digest() digest.Digest {
	return digest.NewDigestFromEncoded(digest.SHA256, hex.EncodeToString(w.h.Sum(nil)))
}

// Commit syncs the temp file, makes it read-only and renames it to its
// digest. verify, if not nil, sees the temp file's path before it is renamed;
// an error from it aborts the commit. If the blob is already stored the temp
// file is dropped. It returns the module's digest.
func (w *BlobWriter) Commit(verify func(path string) error) (digest.Digest, error) {
	if w.done {
		return "", errors.New("blob writer already finished")
	}
	w.done = true
	// flushTail below stops the writer goroutine whatever it returns.
	defer w.releaseBuffers()
	w.unannounce()
	d := w.Digest()
	tmp := w.f.Name()
	if err := w.flushTail(); err != nil {
		w.f.Close()
		os.Remove(tmp)
		return "", err
	}
	if err := w.f.Sync(); err != nil {
		w.f.Close()
		os.Remove(tmp)
		return "", storageError(err, "syncing the module to disk")
	}
	if err := w.f.Close(); err != nil {
		os.Remove(tmp)
		return "", storageError(err, "closing the module file")
	}
	if verify != nil {
		if err := verify(tmp); err != nil {
			os.Remove(tmp)
			return "", err
		}
	}
	if w.s.HasBlob(d) {
		os.Remove(tmp)
		return d, nil
	}
	if err := os.Chmod(tmp, 0o444); err != nil {
		os.Remove(tmp)
		return "", storageError(err, "making the module read-only")
	}
	if err := os.Rename(tmp, w.s.BlobPath(d)); err != nil {
		os.Remove(tmp)
		return "", storageError(err, "renaming the module into place")
	}
	if err := syncDir(w.s.blobDir()); err != nil {
		return "", err
	}
	return d, nil
}

// Abort drops the temp file. It is a no-op after Commit.
func (w *BlobWriter) Abort() {
	if w.done {
		return
	}
	w.done = true
	w.unannounce()
	_ = w.waitDirectWriter()
	w.releaseBuffers()
	w.f.Close()
	os.Remove(w.f.Name())
}

// RefRecord is what an image reference resolved to, for IfNotPresent and
// Never: the manifest digest and the module it held.
type RefRecord struct {
	Ref      string        `json:"ref"`
	Manifest digest.Digest `json:"manifest"`
	Module   digest.Digest `json:"module"`
	Size     int64         `json:"size"`
	Layout   string        `json:"layout,omitempty"`
	// Private is set when the module was pulled with a pod's pull secret:
	// another pod must then show the registry its own access.
	Private  bool      `json:"private,omitempty"`
	PulledAt time.Time `json:"pulledAt"`
}

func (s *Store) refPath(ref string) string {
	sum := sha256.Sum256([]byte(ref))
	return filepath.Join(s.refDir(), hex.EncodeToString(sum[:])+".json")
}

// GetRef returns the record of ref, if there is one whose module is stored.
func (s *Store) GetRef(ref string) (RefRecord, bool) {
	var rec RefRecord
	if err := readJSON(s.refPath(ref), &rec); err != nil || rec.Ref != ref || !s.HasBlob(rec.Module) {
		return RefRecord{}, false
	}
	return rec, true
}

// PutRef records what ref resolved to.
func (s *Store) PutRef(rec RefRecord) error {
	return writeJSON(s.refPath(rec.Ref), rec)
}

// ViewDir returns the directory pods mount for module d under fileName,
// creating it (a hard link to the blob: one inode for every pod) if needed.
func (s *Store) ViewDir(d digest.Digest, fileName string) (string, error) {
	dir := filepath.Join(s.viewRoot(), d.Encoded(), viewKey(fileName))
	link := filepath.Join(dir, fileName)
	blob := s.BlobPath(d)
	if sameFile(link, blob) {
		return dir, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", storageError(err, "creating the module's view directory")
	}
	// Link under a temp name and rename, so a reader never sees a missing or
	// foreign file at the final name. The temp name is unique: publishes of
	// one module for different volumes run at once.
	tmp := filepath.Join(dir, tmpPrefix+rand.Text())
	if err := os.Link(blob, tmp); err != nil {
		return "", storageError(err, "linking the module into its view directory")
	}
	if err := os.Rename(tmp, link); err != nil {
		os.Remove(tmp)
		return "", storageError(err, "renaming the module link into place")
	}
	if err := syncDir(dir); err != nil {
		return "", err
	}
	return dir, nil
}

func sameFile(a, b string) bool {
	fa, err := os.Stat(a)
	if err != nil {
		return false
	}
	fb, err := os.Stat(b)
	return err == nil && os.SameFile(fa, fb)
}

// writeJSON writes v to path atomically: temp file, sync, chmod, rename.
func writeJSON(path string, v any) error { return writeRecord(path, v, true) }

// writeRecord writes v to path through a temp file renamed into place, so
// a reader finds the old record or the new one. durable: the file is also
// synced and made read-only before the rename, and the directory synced
// after; a record a crash may lose (a pull in flight's) is not.
func writeRecord(path string, v any, durable bool) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, tmpPrefix+"*")
	if err != nil {
		return storageError(err, "creating a temp record")
	}
	tmp := f.Name()
	_, err = f.Write(b)
	if err == nil && durable {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && durable {
		err = os.Chmod(tmp, 0o444)
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return storageError(err, "writing record "+filepath.Base(path))
	}
	if !durable {
		return nil
	}
	return syncDir(dir)
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// readRecords reads every record in dir and passes each to add: temp files,
// names without ".json" and records that do not parse are skipped. An error
// is the listing's, unwrapped.
func readRecords[T any](dir string, add func(T)) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), tmpPrefix) || !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		var rec T
		if readJSON(filepath.Join(dir, e.Name()), &rec) == nil {
			add(rec)
		}
	}
	return nil
}

func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return storageError(err, "opening directory to sync")
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return storageError(err, "syncing directory")
	}
	return nil
}

// storageError classifies a filesystem error: a full disk is errdefs.ErrNoSpace.
func storageError(err error, doing string) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return errdefs.New(errdefs.ErrNoSpace, "", err, "%s: the store's disk is full; free space or lower limits.maxStoreSize", doing)
	}
	return errdefs.New(errdefs.ErrInternal, "", err, "%s", doing)
}

// verifyDir holds what the node knows of each manifest's signatures
// (node/verify.go): the signatures read and the policies they passed.
func (s *Store) verifyDir() string { return filepath.Join(s.root, "verify") }

func (s *Store) verifyPath(manifest digest.Digest) string {
	return filepath.Join(s.verifyDir(), manifest.Encoded()+".json")
}

// PassedPolicy is a signature policy a manifest passed, as node/verify.go
// records it in the manifest's verification record (under the "passed"
// key, a map by policy fingerprint).
type PassedPolicy struct {
	Policy string    `json:"policy"`
	Signer string    `json:"signer"`
	At     time.Time `json:"at"`
	// Fingerprint is the map's key, filled in by Verification.
	Fingerprint string `json:"fingerprint,omitempty"`
}

// VerificationState is what is recorded of a manifest's signatures.
type VerificationState struct {
	Manifest digest.Digest `json:"manifest"`
	// Passed are the policies it passed, most recent first. A policy
	// changed since (keys, identities, images) has a new fingerprint and
	// is checked again, offline, before the next pod gets the module.
	Passed []PassedPolicy `json:"passed"`
	// SignaturesKept: the signatures read from the registry are on disk,
	// for those re-checks.
	SignaturesKept bool `json:"signaturesKept"`
}

// Verification reads what is recorded of manifest's signatures; ok is
// false when nothing is (no policy covered it when it was pulled or used).
func (s *Store) Verification(manifest digest.Digest) (VerificationState, bool) {
	var rec struct {
		Manifest digest.Digest           `json:"manifest"`
		Evidence json.RawMessage         `json:"evidence"`
		Passed   map[string]PassedPolicy `json:"passed"`
	}
	if !s.GetVerification(manifest, &rec) || rec.Manifest != manifest {
		return VerificationState{}, false
	}
	v := VerificationState{Manifest: manifest, Passed: []PassedPolicy{},
		SignaturesKept: len(rec.Evidence) > 0 && string(rec.Evidence) != "null"}
	for fp, p := range rec.Passed {
		p.Fingerprint = fp
		v.Passed = append(v.Passed, p)
	}
	sort.Slice(v.Passed, func(i, j int) bool { return v.Passed[i].At.After(v.Passed[j].At) })
	return v, true
}

// GetVerification reads the verification record of manifest into v.
func (s *Store) GetVerification(manifest digest.Digest, v any) bool {
	return manifest.Validate() == nil && readJSON(s.verifyPath(manifest), v) == nil
}

// PutVerification writes the verification record of manifest, as every
// record is written (temp file, sync, read-only, rename).
func (s *Store) PutVerification(manifest digest.Digest, v any) error {
	if err := manifest.Validate(); err != nil {
		return storageError(err, "a verification record for a bad digest")
	}
	if err := os.MkdirAll(s.verifyDir(), 0o755); err != nil {
		return storageError(err, "creating the verification directory")
	}
	return writeJSON(s.verifyPath(manifest), v)
}
