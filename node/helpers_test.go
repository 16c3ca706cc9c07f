package node

import (
	"os"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/wasm-csi/wasm-csi/node/store"
)

func openStore(t *testing.T, root string) *store.Store {
	t.Helper()
	s, err := store.Open(root)
	if err != nil {
		t.Fatalf("store.Open(%s): %v", root, err)
	}
	return s
}

// putBlob stores data as a module, without validating it.
func putBlob(t *testing.T, s *store.Store, data []byte) digest.Digest {
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

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// waitUntil polls cond until it holds or 10 s have passed; the caller then
// asserts what it waited for.
func waitUntil(cond func() bool) {
	deadline := time.Now().Add(10 * time.Second)
	for !cond() && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
}
