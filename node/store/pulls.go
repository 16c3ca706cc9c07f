package store

import (
	"errors"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"
)

// Downloads in flight are visible on disk, for `wasm-csi-driver inspect`,
// which reads the store without the daemon: the blob writer's temp file
// (its size is the bytes written so far) and, beside it in pulls/, a small
// record of what is being downloaded, written when the layer's size is
// known and removed when the writer commits or aborts. A crash leaves
// both: Open removes them, and nothing else reads them.

// PullRecord says what a blob writer is downloading.
type PullRecord struct {
	Image    string        `json:"image"`
	Manifest digest.Digest `json:"manifest"`
	// Layer is the layer being read and Total its size in bytes. For a
	// compressed or tar layer, the module written is not the layer's bytes.
	Layer   digest.Digest `json:"layer"`
	Total   int64         `json:"total"`
	Started time.Time     `json:"started"`
	// Temp is the writer's temp file, relative to the store's root.
	Temp string `json:"temp"`
}

// PullInFlight is a download in flight as Pulls finds it.
type PullInFlight struct {
	PullRecord
	// Written is the size of the temp file: the module's bytes on disk so
	// far (the writer stages up to a few MiB in memory before writing).
	Written int64 `json:"written"`
	// LastWrite is when the temp file last changed.
	LastWrite time.Time `json:"lastWrite"`
}

func (s *Store) pullDir() string { return filepath.Join(s.root, "pulls") }

// Announce records what w is downloading, for Pulls. The record is removed
// when w commits or aborts; announcing again replaces it. It is not synced:
// after a crash it is removed anyway.
func (w *BlobWriter) Announce(rec PullRecord) error {
	if w.done {
		return errors.New("blob writer already finished")
	}
	rec.Temp = filepath.ToSlash(strings.TrimPrefix(w.f.Name(), w.s.root+string(filepath.Separator)))
	dir := w.s.pullDir()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return storageError(err, "creating the directory of pulls in flight")
	}
	path := filepath.Join(dir, strings.TrimPrefix(filepath.Base(w.f.Name()), tmpPrefix)+".json")
	if err := writeRecord(path, rec, false); err != nil {
		return err
	}
	w.announced = path
	return nil
}

func (w *BlobWriter) unannounce() {
	if w.announced != "" {
		os.Remove(w.announced)
		w.announced = ""
	}
}

// Pulls lists the downloads in flight, oldest first. A record whose temp
// file is gone (the download ended while it was read, or a crash and its
// temp file was removed) is left out. It only reads.
func (s *Store) Pulls() ([]PullInFlight, error) {
	var out []PullInFlight
	err := readRecords(s.pullDir(), func(rec PullRecord) {
		// The temp file must be a writer's, in the blob directory.
		if filepath.Dir(rec.Temp) != "blobs/sha256" || !strings.HasPrefix(filepath.Base(rec.Temp), tmpPrefix) {
			return
		}
		fi, err := os.Stat(filepath.Join(s.root, filepath.FromSlash(rec.Temp)))
		if err != nil {
			return
		}
		out = append(out, PullInFlight{PullRecord: rec, Written: fi.Size(), LastWrite: fi.ModTime().UTC()})
	})
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, storageError(err, "listing pulls in flight")
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Started.Before(out[j].Started) })
	return out, nil
}

// clearPulls removes every record of a pull in flight (at start, none is)
// and leaves the directory empty.
func (s *Store) clearPulls() error {
	if err := os.RemoveAll(s.pullDir()); err != nil {
		return storageError(err, "removing the records of pulls cut by a restart")
	}
	if err := os.MkdirAll(s.pullDir(), 0o755); err != nil {
		return storageError(err, "creating the directory of pulls in flight")
	}
	return nil
}
