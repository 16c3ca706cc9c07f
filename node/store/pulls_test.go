package store

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
)

func announce(t *testing.T, w *BlobWriter, image string, total int64) PullRecord {
	t.Helper()
	rec := PullRecord{Image: image, Manifest: digest.FromString("manifest " + image), Layer: digest.FromString("layer " + image),
		Total: total, Started: time.Now().UTC().Truncate(time.Second)}
	if err := w.Announce(rec); err != nil {
		t.Fatal(err)
	}
	return rec
}

func pullsOf(t *testing.T, s *Store) []PullInFlight {
	t.Helper()
	ps, err := s.Pulls()
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

// TestPullsInFlight: a writer's announced download is listed with the
// bytes its temp file holds, and the record goes when the writer commits
// or aborts.
func TestPullsInFlight(t *testing.T) {
	s := openStore(t, t.TempDir())
	if ps := pullsOf(t, s); len(ps) != 0 {
		t.Fatalf("a new store lists pulls %+v", ps)
	}
	body := content(3<<20+5, 1)
	committed, err := s.NewBlobWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	forceBuffered(t, committed) // so the temp file's size is exactly what was written
	rec := announce(t, committed, "reg.example/a:1", int64(len(body)))
	aborted, err := s.NewBlobWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	announce(t, aborted, "reg.example/b:1", 10<<20)
	if _, err := committed.Write(body[:1<<20]); err != nil {
		t.Fatal(err)
	}

	ps := pullsOf(t, s)
	if len(ps) != 2 {
		t.Fatalf("listed %d pulls, want 2: %+v", len(ps), ps)
	}
	var got PullInFlight
	for _, p := range ps {
		if p.Image == rec.Image {
			got = p
		}
	}
	if got.Manifest != rec.Manifest || got.Layer != rec.Layer || got.Total != rec.Total || !got.Started.Equal(rec.Started) {
		t.Errorf("listed %+v, announced %+v", got.PullRecord, rec)
	}
	if got.Written != 1<<20 {
		t.Errorf("written %d bytes, the temp file holds %d", got.Written, 1<<20)
	}
	if got.Temp != "blobs/sha256/"+filepath.Base(committed.f.Name()) {
		t.Errorf("temp %q, the writer's file is %s", got.Temp, committed.f.Name())
	}
	if got.LastWrite.IsZero() {
		t.Error("no last write time")
	}

	if _, err := committed.Write(body[1<<20:]); err != nil {
		t.Fatal(err)
	}
	if _, err := committed.Commit(nil); err != nil {
		t.Fatal(err)
	}
	aborted.Abort()
	if ps := pullsOf(t, s); len(ps) != 0 {
		t.Errorf("pulls listed after commit and abort: %+v", ps)
	}
	left, err := os.ReadDir(s.pullDir())
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != 0 {
		t.Errorf("records left in pulls/: %v", left)
	}
	noTemps(t, s.root)
}

// TestPullsAfterCrash: a download cut by a crash leaves its record and temp
// file; the store lists nothing whose temp file is gone, and Open (the
// restarted daemon) removes both.
func TestPullsAfterCrash(t *testing.T) {
	root := t.TempDir()
	s := openStore(t, root)
	w, err := s.NewBlobWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	announce(t, w, "reg.example/cut:1", 1<<20)
	if _, err := w.Write(content(4096, 2)); err != nil {
		t.Fatal(err)
	}
	// The daemon dies here: no Commit, no Abort.
	if ps := pullsOf(t, s); len(ps) != 1 {
		t.Fatalf("listed %d pulls, want the cut one", len(ps))
	}
	// A record pointing outside the blob directory is not followed.
	if err := os.WriteFile(filepath.Join(s.pullDir(), "forged.json"), []byte(`{"image":"x","temp":"../../etc/passwd"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	if ps := pullsOf(t, s); len(ps) != 1 {
		t.Fatalf("listed %d pulls, want the cut one only: %+v", len(ps), ps)
	}
	// Read-only opening (inspect) leaves them.
	ro, err := OpenReadOnly(root)
	if err != nil {
		t.Fatal(err)
	}
	if ps := pullsOf(t, ro); len(ps) != 1 {
		t.Fatalf("read-only store lists %d pulls, want 1", len(ps))
	}
	s2 := openStore(t, root)
	if ps := pullsOf(t, s2); len(ps) != 0 {
		t.Errorf("pulls listed after a restart: %+v", ps)
	}
	if left, err := os.ReadDir(s2.pullDir()); err != nil || len(left) != 0 {
		t.Errorf("pulls/ after a restart: %v, %v", left, err)
	}
	noTemps(t, root)
}
