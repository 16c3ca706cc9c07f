package store

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// FormatVersion is the version of the layout under the root that this
// driver reads and writes, recorded in <root>/format.json. Version 0 is
// the layout of drivers from before the record (up to commit 388ba58): the
// same directories, no record.
//
// A change to the layout raises FormatVersion and adds the step from the
// version before to migrations. At Open a store of an older version is
// migrated step by step, and the record rewritten; a store of a newer
// version is refused before anything under the root is touched: an older
// driver must not guess at a layout it does not know (a rollback past a
// format change needs the newer driver's store moved aside).
const FormatVersion = 1

// migrations[v] turns a store of version v into version v+1.
var migrations = map[int]func(*Store) error{
	// 0 -> 1: the layout is unchanged; only the record is new.
	0: func(*Store) error { return nil },
}

const formatFileName = "format.json"

type formatRecord struct {
	Version int `json:"version"`
}

func (s *Store) formatPath() string { return filepath.Join(s.root, formatFileName) }

// readFormat returns the store's recorded version: 0 for a store written
// before the record existed, FormatVersion for an empty root.
func (s *Store) readFormat() (int, error) {
	var rec formatRecord
	err := readJSON(s.formatPath(), &rec)
	switch {
	case err == nil:
		if rec.Version < 0 {
			return 0, fmt.Errorf("%w: %s records format version %d", errdefs.ErrStoreFormat, s.formatPath(), rec.Version)
		}
		return rec.Version, nil
	case errors.Is(err, os.ErrNotExist):
		entries, rerr := os.ReadDir(s.root)
		if errors.Is(rerr, os.ErrNotExist) || (rerr == nil && len(entries) == 0) {
			return FormatVersion, nil // a new store
		}
		if rerr != nil {
			return 0, storageError(rerr, "reading the store's root")
		}
		return 0, nil
	default:
		return 0, fmt.Errorf("%w: reading %s: %v (a store record this driver cannot read: move the store aside or restore the file)",
			errdefs.ErrStoreFormat, s.formatPath(), err)
	}
}

// checkFormat refuses a store newer than this driver knows.
func (s *Store) checkFormat(v int) error {
	if v > FormatVersion {
		return fmt.Errorf("%w: the store at %s has format version %d, and this driver reads up to version %d: "+
			"it was written by a newer wasm-csi driver. Run that version (or a newer one) on this node, "+
			"or drain the node's pods that use wasm volumes and move %s aside to start with an empty store",
			errdefs.ErrStoreFormat, s.root, v, FormatVersion, s.root)
	}
	return nil
}

// migrate brings a store of version v to FormatVersion and records it.
func (s *Store) migrate(v int) error {
	for ; v < FormatVersion; v++ {
		step, ok := migrations[v]
		if !ok {
			return fmt.Errorf("%w: no migration from store format version %d", errdefs.ErrStoreFormat, v)
		}
		if err := step(s); err != nil {
			return fmt.Errorf("migrating the store at %s from format version %d to %d: %w", s.root, v, v+1, err)
		}
	}
	return writeJSON(s.formatPath(), formatRecord{Version: FormatVersion})
}

// Format reports the store's format version and, when Open migrated it,
// the version it was found at (else the same version).
func (s *Store) Format() (version, foundAt int) { return FormatVersion, s.foundAt }
