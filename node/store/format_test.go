package store

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

func readVersion(t *testing.T, root string) int {
	t.Helper()
	var rec formatRecord
	if err := readJSON(filepath.Join(root, formatFileName), &rec); err != nil {
		t.Fatalf("format record: %v", err)
	}
	return rec.Version
}

func TestFormatNewStore(t *testing.T) {
	root := filepath.Join(t.TempDir(), "store")
	s, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	if v, found := s.Format(); v != FormatVersion || found != FormatVersion {
		t.Errorf("Format() = %d, %d; want %d, %d", v, found, FormatVersion, FormatVersion)
	}
	if v := readVersion(t, root); v != FormatVersion {
		t.Errorf("format.json version %d, want %d", v, FormatVersion)
	}
	fi, err := os.Stat(filepath.Join(root, formatFileName))
	if err != nil || fi.Mode().Perm() != 0o444 {
		t.Errorf("format.json: %v %v, want read-only like every record", fi.Mode(), err)
	}
	// Opening again changes nothing.
	if s, err := Open(root); err != nil {
		t.Fatal(err)
	} else if _, found := s.Format(); found != FormatVersion {
		t.Errorf("second Open found version %d", found)
	}
}

// A store written before the record existed (version 0: the same
// directories, modules and records) is migrated: its modules stay.
func TestFormatMigratesVersion0(t *testing.T) {
	root := t.TempDir()
	s, err := Open(root)
	if err != nil {
		t.Fatal(err)
	}
	d := storeModule(t, s, "module stored by an earlier driver", time.Now())
	if err := os.Remove(filepath.Join(root, formatFileName)); err != nil {
		t.Fatal(err)
	}
	s, err = Open(root)
	if err != nil {
		t.Fatal(err)
	}
	if v, found := s.Format(); v != FormatVersion || found != 0 {
		t.Errorf("Format() = %d, %d; want %d, 0 (migrated)", v, found, FormatVersion)
	}
	if readVersion(t, root) != FormatVersion {
		t.Error("format.json not written by the migration")
	}
	if !s.HasBlob(d) {
		t.Error("the migration lost a stored module")
	}
}

// A store of a newer format is refused before anything under the root is
// touched, with a message that says what to do.
func TestFormatRefusesNewer(t *testing.T) {
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, formatFileName), []byte(`{"version": 99}`), 0o444); err != nil {
		t.Fatal(err)
	}
	leftover := filepath.Join(root, ".tmp-written-by-the-newer-driver")
	if err := os.WriteFile(leftover, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Open(root)
	if !errors.Is(err, errdefs.ErrStoreFormat) {
		t.Fatalf("Open of a version 99 store: %v, want ErrStoreFormat", err)
	}
	for _, want := range []string{"format version 99", "newer wasm-csi driver", root} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("refusal %q does not say %q", err, want)
		}
	}
	entries, _ := os.ReadDir(root)
	if len(entries) != 2 {
		t.Errorf("the refused store was changed: %v", entries)
	}
	if readVersion(t, root) != 99 {
		t.Error("the refused store's record was rewritten")
	}
}

func TestFormatUnreadableRecord(t *testing.T) {
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, formatFileName), []byte(`{"version": "one"`), 0o444); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(root); !errors.Is(err, errdefs.ErrStoreFormat) {
		t.Fatalf("Open with a broken format.json: %v, want ErrStoreFormat", err)
	}
}
