package store

import (
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

func treeOf(t *testing.T, root string) []string {
	t.Helper()
	var out []string
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		fi, _ := d.Info()
		rel, _ := filepath.Rel(root, p)
		out = append(out, rel+" "+fi.Mode().String()+" "+fi.ModTime().String())
		return nil
	})
	return out
}

func TestInventoryReadsOnly(t *testing.T) {
	root := t.TempDir()
	s, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	old := storeModule(t, s, "old unused", now.Add(-time.Hour))
	used := storeModule(t, s, "old but in use", now.Add(-2*time.Hour))
	fresh := storeModule(t, s, "used a minute ago", now.Add(-time.Minute))
	if err := s.PutVolume(VolumeRecord{VolumeID: "v1", TargetPath: "/pods/p/vol", Image: "reg/in-use:1", Module: used, PodName: "gw", PodNS: "edge"}); err != nil {
		t.Fatal(err)
	}
	// A leftover temp file Open would remove, and no format record (an
	// earlier driver's store): OpenReadOnly touches neither.
	if err := os.WriteFile(filepath.Join(root, "refs", ".tmp-left"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(root, formatFileName)); err != nil {
		t.Fatal(err)
	}
	before := treeOf(t, root)

	ro, err := OpenReadOnly(root)
	if err != nil {
		t.Fatal(err)
	}
	inv, err := ro.Inventory(GCPolicy{MaxStoreBytes: 1}, now)
	if err != nil {
		t.Fatal(err)
	}
	if after := treeOf(t, root); !slices.Equal(before, after) {
		t.Errorf("OpenReadOnly + Inventory changed the store:\n%v\n%v", before, after)
	}
	if inv.Format != 0 || len(inv.Modules) != 3 || len(inv.Volumes) != 1 {
		t.Fatalf("inventory: format %d, %d modules, %d volumes", inv.Format, len(inv.Modules), len(inv.Volumes))
	}
	// Least recently used first, with its refs and volumes.
	if got := []digest.Digest{inv.Modules[0].Digest, inv.Modules[1].Digest, inv.Modules[2].Digest}; !slices.Equal(got, []digest.Digest{used, old, fresh}) {
		t.Errorf("modules in order %v", got)
	}
	if m := inv.Modules[0]; !slices.Equal(m.Volumes, []string{"v1"}) || len(m.Refs) != 1 || m.Refs[0].Ref != "reg/old but in use:1" {
		t.Errorf("module in use: %+v", m)
	}
	// Over a 1-byte cap, GC would remove only the unused module past the
	// minimum age: not the one in use, not the one used a minute ago.
	if !slices.Equal(inv.GCNext, []digest.Digest{old}) {
		t.Errorf("GCNext %v, want [%s]", inv.GCNext, old)
	}
	// And a collection under the same policy removes exactly that.
	uses, err := NewUses(s)
	if err != nil {
		t.Fatal(err)
	}
	res, err := s.Collect(uses, GCPolicy{MaxStoreBytes: 1}, now, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil || res.Removed != 1 || s.HasBlob(old) || !s.HasBlob(used) || !s.HasBlob(fresh) {
		t.Errorf("Collect after Inventory: %+v %v", res, err)
	}
}

func TestOpenReadOnlyRefusesNewerAndMissing(t *testing.T) {
	root := t.TempDir()
	if _, err := OpenReadOnly(filepath.Join(root, "nothing-here")); err == nil {
		t.Error("OpenReadOnly of a missing store succeeded")
	}
	if err := os.WriteFile(filepath.Join(root, formatFileName), []byte(`{"version":99}`), 0o444); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenReadOnly(root); err == nil {
		t.Error("OpenReadOnly of a newer store succeeded")
	}
}
