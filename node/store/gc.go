package store

import (
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"
)

// Uses counts, per module, the published volumes that use it. It is a
// cache of the volume records on disk: rebuilt from them at start, kept in
// step by publish and unpublish, and consulted by the collector under the
// same lock, so a module in use (or being published) is never removed.
type Uses struct {
	mu     sync.Mutex
	counts map[useKey]int
}

// useKey is a module's digest held inside the map. A digest.Digest key
// would keep alive the string a publish decoded or computed, one small
// object per module, each allocated among a burst's garbage: after a burst
// of 1,000 distinct modules those strings alone kept ~1,000 of the heap's
// 8 KiB spans in use (what the burst benchmark's profile showed), memory
// the runtime cannot give back while one object in a span lives.
type useKey struct {
	// size and sum are a sha256, sha384 or sha512 digest: the size of its
	// sum tells the three apart, and nothing of d's string is kept.
	size int
	sum  [sha512.Size]byte
	// other is a digest of another form, kept as it is (the store
	// holds none, but Uses does not rely on that).
	other string
}

func keyOf(d digest.Digest) useKey {
	switch alg := d.Algorithm(); alg {
	case digest.SHA256, digest.SHA384, digest.SHA512:
		k := useKey{size: alg.Size()}
		if enc := d.Encoded(); len(enc) == 2*k.size {
			if _, err := hex.Decode(k.sum[:], []byte(enc)); err == nil {
				return k
			}
		}
	}
	return useKey{other: strings.Clone(string(d))}
}

// NewUses counts the uses recorded in the store's volume records.
func NewUses(s *Store) (*Uses, error) {
	recs, err := s.ListVolumes()
	if err != nil {
		return nil, err
	}
	u := &Uses{counts: map[useKey]int{}}
	for _, r := range recs {
		u.counts[keyOf(r.Module)]++
	}
	return u, nil
}

// Acquire counts one more use of d, unless the store no longer has it
// (the collector removed it): then it reports false.
func (u *Uses) Acquire(s *Store, d digest.Digest) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	if !s.HasBlob(d) {
		return false
	}
	u.counts[keyOf(d)]++
	return true
}

// Release counts one use of d less.
func (u *Uses) Release(d digest.Digest) {
	u.mu.Lock()
	defer u.mu.Unlock()
	k := keyOf(d)
	if u.counts[k] <= 1 {
		delete(u.counts, k)
		return
	}
	u.counts[k]--
}

// unlessUsed runs remove if d has no use, holding the lock Acquire takes,
// so no publish starts using d meanwhile. used reports that d had a use
// and remove did not run.
func (u *Uses) unlessUsed(d digest.Digest, remove func() error) (used bool, err error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.counts[keyOf(d)] > 0 {
		return true, nil
	}
	return false, remove()
}

// Count is the number of uses of d.
func (u *Uses) Count(d digest.Digest) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.counts[keyOf(d)]
}

// GCPolicy says which unused modules the collector removes.
type GCPolicy struct {
	// MaxAge removes unused modules last used longer ago than this (0: never).
	MaxAge time.Duration
	// MaxStoreBytes removes unused modules, least recently used first,
	// while the store holds more than this (0: no cap).
	MaxStoreBytes int64
	// MinimumAge protects modules used or pulled this recently, whatever
	// MaxAge and MaxStoreBytes say (limits.minimumModuleAge, as kubelet's
	// imageMinimumGCAge): a module just pulled is not yet counted by the
	// publish that pulled it, and a module a pod just let go is likely to be
	// asked for again. 0: DefaultMinimumModuleAge.
	MinimumAge time.Duration
}

// DefaultMinimumModuleAge is the default GCPolicy.MinimumAge, kubelet's
// default imageMinimumGCAge.
const DefaultMinimumModuleAge = 2 * time.Minute

// storedModule is one blob with its size and last use.
type storedModule struct {
	digest   digest.Digest
	size     int64
	lastUsed time.Time
}

// Touch records that module d was used now: the mtime of its views
// directory, on disk so it survives a restart.
func (s *Store) Touch(d digest.Digest) {
	now := time.Now()
	dir := filepath.Join(s.viewRoot(), d.Encoded())
	if err := os.Chtimes(dir, now, now); err != nil && !errors.Is(err, os.ErrNotExist) {
		return
	}
}

func (s *Store) modules() ([]storedModule, error) {
	entries, err := os.ReadDir(s.blobDir())
	if err != nil {
		return nil, storageError(err, "listing the store")
	}
	var out []storedModule
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), tmpPrefix) {
			continue
		}
		d := digest.NewDigestFromEncoded(digest.SHA256, e.Name())
		if d.Validate() != nil {
			continue
		}
		fi, err := e.Info()
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		last := fi.ModTime()
		if vi, err := os.Stat(filepath.Join(s.viewRoot(), e.Name())); err == nil && vi.ModTime().After(last) {
			last = vi.ModTime()
		}
		out = append(out, storedModule{digest: d, size: fi.Size(), lastUsed: last})
	}
	return out, nil
}

// removeModule deletes module d: first the tag records that point to it
// (so no publish finds it), then its views, then the blob, then the
// verification records of the manifests those tag records named (a
// manifest names one module). A pull of the same image racing the
// collector may lose its fresh record: its next publish then reads the
// signatures from the registry again, nothing is served unverified.
func (s *Store) removeModule(d digest.Digest) error {
	refs, err := os.ReadDir(s.refDir())
	if err != nil {
		return storageError(err, "listing tag records")
	}
	var manifests []digest.Digest
	for _, r := range refs {
		if strings.HasPrefix(r.Name(), tmpPrefix) {
			continue
		}
		p := filepath.Join(s.refDir(), r.Name())
		var rec RefRecord
		if err := readJSON(p, &rec); err != nil || rec.Module == d {
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				return storageError(err, "removing a tag record")
			}
			if err == nil && rec.Manifest.Validate() == nil {
				manifests = append(manifests, rec.Manifest)
			}
		}
	}
	// The read-only overlays of the module's views: no volume uses them
	// (the module is unused), so they are unmounted, then removed.
	roDir := filepath.Join(s.roRoot(), d.Encoded())
	if entries, err := os.ReadDir(roDir); err == nil {
		for _, e := range entries {
			p := filepath.Join(roDir, e.Name())
			if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				return storageError(err, "unmounting the module's read-only view")
			}
		}
	}
	if err := os.RemoveAll(roDir); err != nil {
		return storageError(err, "removing the module's read-only views")
	}
	if err := os.RemoveAll(filepath.Join(s.viewRoot(), d.Encoded())); err != nil {
		return storageError(err, "removing the module's views")
	}
	if err := os.Remove(s.BlobPath(d)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return storageError(err, "removing the module")
	}
	if err := syncDir(s.blobDir()); err != nil {
		return err
	}
	for _, m := range manifests {
		if err := os.Remove(s.verifyPath(m)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return storageError(err, "removing a verification record")
		}
	}
	return nil
}

// GCResult says what a collection did.
type GCResult struct {
	Removed      int
	FreedBytes   int64
	StoreBytes   int64
	InUseModules int
	// TooYoung counts the modules the collector would have removed but kept
	// because they were used within GCPolicy.MinimumAge.
	TooYoung int
}

// Collect removes unused modules under policy. A module with a use
// counted in uses is never removed; the check and the removal happen under
// the uses lock, so a publish cannot start using a module being removed.
func (s *Store) Collect(uses *Uses, policy GCPolicy, now time.Time, log *slog.Logger) (GCResult, error) {
	return s.sweep(policy, now, func(m storedModule, idle time.Duration, reason string) (bool, error) {
		inUse, err := uses.unlessUsed(m.digest, func() error { return s.removeModule(m.digest) })
		if !inUse && err == nil {
			log.Info("module removed", "digest", m.digest, "bytes", m.size, "idle", idle.Round(time.Second), "reason", reason)
		}
		return inUse, err
	})
}

// sweep walks the stored modules least recently used first and calls
// remove for each one policy lets go (unused past MaxAge, or the store over
// MaxStoreBytes, and not used within MinimumAge); remove says whether the
// module was in use after all. Collect removes; Inventory only lists.
func (s *Store) sweep(policy GCPolicy, now time.Time, remove func(m storedModule, idle time.Duration, reason string) (inUse bool, err error)) (GCResult, error) {
	if policy.MinimumAge <= 0 {
		policy.MinimumAge = DefaultMinimumModuleAge
	}
	mods, err := s.modules()
	if err != nil {
		return GCResult{}, err
	}
	var res GCResult
	for _, m := range mods {
		res.StoreBytes += m.size
	}
	// Least recently used first.
	sort.Slice(mods, func(i, j int) bool { return mods[i].lastUsed.Before(mods[j].lastUsed) })
	for _, m := range mods {
		idle := now.Sub(m.lastUsed)
		tooOld := policy.MaxAge > 0 && idle > policy.MaxAge
		overCap := policy.MaxStoreBytes > 0 && res.StoreBytes > policy.MaxStoreBytes
		if !tooOld && !overCap {
			continue
		}
		if idle < policy.MinimumAge {
			res.TooYoung++
			continue
		}
		reason := "unused past limits.unusedModuleAge"
		if !tooOld {
			reason = "store over limits.maxStoreSize"
		}
		inUse, err := remove(m, idle, reason)
		if inUse {
			res.InUseModules++
			continue
		}
		if err != nil {
			return res, err
		}
		res.Removed++
		res.FreedBytes += m.size
		res.StoreBytes -= m.size
	}
	return res, nil
}
