package store

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
	"unsafe"
	"weak"

	"github.com/opencontainers/go-digest"
)

// storeModule commits body to s and dates its last use at t.
func storeModule(t *testing.T, s *Store, body string, used time.Time) digest.Digest {
	t.Helper()
	w, err := s.NewBlobWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte(body)); err != nil {
		t.Fatal(err)
	}
	d, err := w.Commit(nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.PutRef(RefRecord{Ref: "reg/" + body + ":1", Module: d}); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(s.BlobPath(d), used, used); err != nil {
		t.Fatal(err)
	}
	return d
}

func TestCollectGarbage(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	now := time.Now()
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	old := storeModule(t, s, "old-unused", now.Add(-30*24*time.Hour))
	oldInUse := storeModule(t, s, "old-in-use", now.Add(-40*24*time.Hour))
	mid := storeModule(t, s, "middle-aged-module", now.Add(-2*24*time.Hour))
	fresh := storeModule(t, s, "fresh-module-just-pulled", now.Add(-time.Minute))

	// oldInUse is used by a volume record on disk: counted after a "restart".
	if _, err := s.ViewDir(oldInUse, "plugin.wasm"); err != nil {
		t.Fatal(err)
	}
	os.Chtimes(filepath.Join(s.viewRoot(), oldInUse.Encoded()), now.Add(-40*24*time.Hour), now.Add(-40*24*time.Hour))
	if err := s.PutVolume(VolumeRecord{VolumeID: "v1", TargetPath: "/t", Module: oldInUse}); err != nil {
		t.Fatal(err)
	}
	uses, err := NewUses(s)
	if err != nil {
		t.Fatal(err)
	}
	if uses.Count(oldInUse) != 1 {
		t.Fatalf("use of the recorded volume not counted")
	}

	// By age: only the old unused module goes; the in-use one stays.
	res, err := s.Collect(uses, GCPolicy{MaxAge: 7 * 24 * time.Hour}, now, log)
	if err != nil {
		t.Fatal(err)
	}
	if res.Removed != 1 || s.HasBlob(old) || !s.HasBlob(oldInUse) || !s.HasBlob(mid) || !s.HasBlob(fresh) {
		t.Fatalf("by age: %+v old=%v inuse=%v mid=%v fresh=%v", res, s.HasBlob(old), s.HasBlob(oldInUse), s.HasBlob(mid), s.HasBlob(fresh))
	}
	if _, ok := s.GetRef("reg/old-unused:1"); ok {
		t.Errorf("tag record of a removed module kept")
	}

	// By size: a cap of 1 byte removes every unused module outside the grace
	// period, least recently used first, never the one in use nor the fresh one.
	res, err = s.Collect(uses, GCPolicy{MaxStoreBytes: 1}, now, log)
	if err != nil {
		t.Fatal(err)
	}
	if res.Removed != 1 || s.HasBlob(mid) || !s.HasBlob(oldInUse) || !s.HasBlob(fresh) || res.InUseModules != 1 {
		t.Fatalf("by size: %+v", res)
	}

	// A publish that acquired a module protects it; release lets it go.
	if !uses.Acquire(s, fresh) {
		t.Fatal("acquire of a stored module failed")
	}
	if res, _ := s.Collect(uses, GCPolicy{MaxStoreBytes: 1, MinimumAge: time.Nanosecond}, now, log); s.HasBlob(fresh) == false || res.Removed != 0 {
		t.Fatalf("acquired module removed: %+v", res)
	}
	uses.Release(fresh)
	uses.Release(oldInUse)
	if res, _ := s.Collect(uses, GCPolicy{MaxStoreBytes: 1, MinimumAge: time.Nanosecond}, now, log); res.Removed != 2 || s.HasBlob(fresh) || s.HasBlob(oldInUse) {
		t.Fatalf("released modules kept: %+v", res)
	}
	if uses.Acquire(s, fresh) {
		t.Fatal("acquired a removed module")
	}
	if entries, _ := os.ReadDir(s.viewRoot()); len(entries) != 0 {
		t.Errorf("views left: %v", entries)
	}
}

// limits.minimumModuleAge as an operator tries it: a 1Mi cap and three
// unused 600 KiB modules. Used 1 minute ago, all three stay under the default
// 2-minute minimum age (the store exceeds its cap meanwhile); used 3 minutes
// ago, the two least recently used go and the store is under its cap.
func TestCollectMinimumModuleAge(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	now := time.Now()
	for _, c := range []struct {
		name       string
		usedAgo    time.Duration
		minimum    time.Duration
		removed    int
		tooYoung   int
		storeAfter int64
	}{
		{"used 1m ago, default minimum 2m", time.Minute, 0, 0, 3, 3 * 600 << 10},
		{"used 3m ago, default minimum 2m", 3 * time.Minute, 0, 2, 0, 600 << 10},
		{"used 3m ago, minimum 5m", 3 * time.Minute, 5 * time.Minute, 0, 3, 3 * 600 << 10},
		{"used 1m ago, minimum 30s", time.Minute, 30 * time.Second, 2, 0, 600 << 10},
	} {
		t.Run(c.name, func(t *testing.T) {
			s, err := Open(t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			var mods []digest.Digest
			for i := range 3 {
				body := strings.Repeat(string(rune('a'+i)), 600<<10)
				// Oldest first: a, then b a second later, then c.
				mods = append(mods, storeModule(t, s, body, now.Add(-c.usedAgo-time.Duration(2-i)*time.Second)))
			}
			uses, err := NewUses(s)
			if err != nil {
				t.Fatal(err)
			}
			res, err := s.Collect(uses, GCPolicy{MaxStoreBytes: 1 << 20, MinimumAge: c.minimum}, now, log)
			if err != nil {
				t.Fatal(err)
			}
			if res.Removed != c.removed || res.TooYoung != c.tooYoung || res.StoreBytes != c.storeAfter {
				t.Errorf("Collect: %+v, want %d removed, %d too young, %d bytes left", res, c.removed, c.tooYoung, c.storeAfter)
			}
			if c.removed == 2 && (s.HasBlob(mods[0]) || s.HasBlob(mods[1]) || !s.HasBlob(mods[2])) {
				t.Errorf("removed the wrong modules: a=%v b=%v c=%v kept", s.HasBlob(mods[0]), s.HasBlob(mods[1]), s.HasBlob(mods[2]))
			}
		})
	}
}

// TestCollectRemovesVerificationRecords: a collected module takes the
// verification records of its manifests with it; a kept module keeps its.
func TestCollectRemovesVerificationRecords(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	now := time.Now()
	s := openStore(t, t.TempDir())
	withManifest := func(body string, used time.Time) digest.Digest {
		d := storeModule(t, s, body, used)
		m := digest.FromString("manifest of " + body)
		for _, ref := range []string{"reg/" + body + ":1", "reg/" + body + "@" + m.String()} {
			if err := s.PutRef(RefRecord{Ref: ref, Manifest: m, Module: d}); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.PutVerification(m, map[string]any{"manifest": m, "passed": map[string]PassedPolicy{"fp": {Policy: "p"}}}); err != nil {
			t.Fatal(err)
		}
		return m
	}
	gone := withManifest("old-and-signed", now.Add(-30*24*time.Hour))
	kept := withManifest("fresh-and-signed", now.Add(-time.Hour))
	uses, err := NewUses(s)
	if err != nil {
		t.Fatal(err)
	}
	res, err := s.Collect(uses, GCPolicy{MaxAge: 24 * time.Hour}, now, log)
	if err != nil {
		t.Fatal(err)
	}
	if res.Removed != 1 {
		t.Fatalf("removed %d modules, want 1", res.Removed)
	}
	if _, ok := s.Verification(gone); ok {
		t.Error("the collected module's verification record is still there")
	}
	if _, err := os.Stat(s.verifyPath(gone)); !os.IsNotExist(err) {
		t.Errorf("verify record of the collected module: %v", err)
	}
	if _, ok := s.Verification(kept); !ok {
		t.Error("the kept module lost its verification record")
	}
}

// TestUsesHoldNoDigestString: a module's use is counted under the digest's
// value, not the string a publish passed: the string is collected once the
// publish is done with it (else each module in use pins a heap span a
// burst of publishes allocated; see useKey), and another string of the same
// digest finds the count.
func TestUsesHoldNoDigestString(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	d := putBlob(t, s, []byte("a module in use"))
	uses, err := NewUses(s)
	if err != nil {
		t.Fatal(err)
	}
	passed := digest.Digest(strings.Clone(string(d)))
	wp := weak.Make(unsafe.StringData(string(passed)))
	if !uses.Acquire(s, passed) {
		t.Fatal("Acquire of a stored module reported it gone")
	}
	passed = ""
	runtime.GC()
	runtime.GC()
	if wp.Value() != nil {
		t.Error("Uses keeps the digest string Acquire was given")
	}
	if n := uses.Count(digest.Digest(strings.Clone(string(d)))); n != 1 {
		t.Errorf("Count under another string of the digest = %d, want 1", n)
	}
	uses.Release(digest.Digest(strings.Clone(string(d))))
	if n := uses.Count(d); n != 0 {
		t.Errorf("Count after Release = %d, want 0", n)
	}
	// A digest of another form is counted as it is.
	odd := digest.Digest("sha256:not-hex")
	uses.counts[keyOf(odd)]++
	if n := uses.Count(odd); n != 1 {
		t.Errorf("Count of %q = %d, want 1", odd, n)
	}
}
