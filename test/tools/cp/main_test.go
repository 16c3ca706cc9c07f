package main

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

func TestCopyFile(t *testing.T) {
	dir := t.TempDir()
	src, dst := filepath.Join(dir, "a"), filepath.Join(dir, "b")
	want := bytes.Repeat([]byte("wasm"), 1<<14)
	if err := os.WriteFile(src, want, 0o600); err != nil {
		t.Fatal(err)
	}
	n, err := copyFile(src, dst)
	if err != nil || n != int64(len(want)) {
		t.Fatalf("copyFile: %d, %v", n, err)
	}
	got, err := os.ReadFile(dst)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("copy differs (%v)", err)
	}
	if _, err := copyFile(filepath.Join(dir, "absent"), dst); err == nil {
		t.Error("copying a missing file succeeded")
	}
}
