package bench

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"oras.land/oras-go/v2/content"
	"oras.land/oras-go/v2/registry/remote"

	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/test/lib/registrytest"
	"github.com/wasm-csi/wasm-csi/test/lib/wasmgen"
)

// The two performance mechanisms of the pull path, each against the plain
// path on the same 64 MiB module, alternating in every iteration so both
// see the same machine load. Each must win to stay.

// bigModuleBytes is a 64 MiB proxy-wasm module.
func bigModuleBytes(b *testing.B) []byte {
	b.Helper()
	f, err := os.CreateTemp(b.TempDir(), "big-*.wasm")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if _, err := wasmgen.WriteProxyWasm(f, wasmgen.Options{PadTo: bigModule}); err != nil {
		b.Fatal(err)
	}
	mod, err := os.ReadFile(f.Name())
	if err != nil {
		b.Fatal(err)
	}
	return mod
}

// BenchmarkBlobWrite64MiB: the store's blob writer (O_DIRECT from aligned
// staging buffers where the filesystem allows it) against the plain path
// (a buffered write of each piece, sha256, fsync, rename), both writing a
// 64 MiB module in 1 MiB pieces (what the read-ahead hands over) into the
// same directory and making it durable.
func BenchmarkBlobWrite64MiB(b *testing.B) {
	mod := bigModuleBytes(b)
	want := digest.FromBytes(mod)
	root := filepath.Join(b.TempDir(), "store")
	st, err := store.Open(root)
	if err != nil {
		b.Fatal(err)
	}
	plainDir := filepath.Join(root, "plain")
	if err := os.Mkdir(plainDir, 0o700); err != nil {
		b.Fatal(err)
	}
	var direct, plain []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		w, err := st.NewBlobWriter(nil)
		if err != nil {
			b.Fatal(err)
		}
		writePieces(b, w, mod)
		d, err := w.Commit(nil)
		if err != nil || d != want {
			b.Fatalf("blob writer: %s, %v", d, err)
		}
		direct = append(direct, time.Since(start))
		b.StopTimer()
		removeBlob(b, st.BlobPath(d))
		b.StartTimer()

		start = time.Now()
		path := plainWrite(b, plainDir, mod, want)
		plain = append(plain, time.Since(start))
		b.StopTimer()
		removeBlob(b, path)
		b.StartTimer()
	}
	b.ReportMetric(ms(median(direct)), "blobwriter-p50-ms")
	b.ReportMetric(ms(median(plain)), "plain-p50-ms")
}

func writePieces(b *testing.B, w io.Writer, mod []byte) {
	b.Helper()
	for off := 0; off < len(mod); off += 1 << 20 {
		end := min(off+1<<20, len(mod))
		if _, err := w.Write(mod[off:end]); err != nil {
			b.Fatal(err)
		}
	}
}

// plainWrite is the store's write without its mechanisms: a temp file in
// dir, buffered writes, sha256, fsync, rename, fsync of the directory.
func plainWrite(b *testing.B, dir string, mod []byte, want digest.Digest) string {
	b.Helper()
	f, err := os.CreateTemp(dir, ".tmp-*")
	if err != nil {
		b.Fatal(err)
	}
	h := sha256.New()
	writePieces(b, io.MultiWriter(h, f), mod)
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
	if err := f.Close(); err != nil {
		b.Fatal(err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != want.Encoded() {
		b.Fatalf("plain write hashed %s", got)
	}
	path := filepath.Join(dir, want.Encoded())
	if err := os.Rename(f.Name(), path); err != nil {
		b.Fatal(err)
	}
	d, err := os.Open(dir)
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		b.Fatal(err)
	}
	return path
}

func removeBlob(b *testing.B, path string) {
	b.Helper()
	if err := os.Remove(path); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkReadAhead64MiB: the puller's Pull (manifest, then the layer read
// ahead in a goroutine so the download overlaps hashing and writing) against
// the plain path (manifest, then the layer copied straight from the
// response body), both from the same registry on 127.0.0.1 into the store's
// blob writer, each checking the layer's digest.
func BenchmarkReadAhead64MiB(b *testing.B) {
	ctx := context.Background()
	reg := registrytest.StartT(b, registrytest.Options{})
	image := reg.Host() + "/bench/readahead:1.0"
	pushBig(ctx, b, reg, image)
	ref, err := puller.ParseReference(image)
	if err != nil {
		b.Fatal(err)
	}
	p := puller.New(puller.Config{InsecureRegistries: []string{reg.Host()}})
	repo, err := registrytest.Repository(image)
	if err != nil {
		b.Fatal(err)
	}
	st, err := store.Open(filepath.Join(b.TempDir(), "store"))
	if err != nil {
		b.Fatal(err)
	}
	var ahead, plain []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		start := time.Now()
		desc, err := p.Resolve(ctx, ref, puller.Credential{})
		if err != nil {
			b.Fatal(err)
		}
		w, err := st.NewBlobWriter(nil)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := p.Pull(ctx, ref, desc, w, puller.Credential{}); err != nil {
			b.Fatal(err)
		}
		ahead = append(ahead, time.Since(start))
		b.StopTimer()
		w.Abort()
		b.StartTimer()

		start = time.Now()
		w, err = st.NewBlobWriter(nil)
		if err != nil {
			b.Fatal(err)
		}
		plainPull(ctx, b, repo, "1.0", w)
		plain = append(plain, time.Since(start))
		b.StopTimer()
		w.Abort()
		b.StartTimer()
	}
	b.ReportMetric(ms(median(ahead)), "readahead-p50-ms")
	b.ReportMetric(ms(median(plain)), "plain-p50-ms")
}

// plainPull resolves tag, reads its manifest and copies its one layer
// into w with a 256 KiB buffer, checking the digest w computed.
func plainPull(ctx context.Context, b *testing.B, repo *remote.Repository, tag string, w *store.BlobWriter) {
	b.Helper()
	desc, err := repo.Resolve(ctx, tag)
	if err != nil {
		b.Fatal(err)
	}
	var m ocispec.Manifest
	mb, err := content.FetchAll(ctx, repo, desc)
	if err != nil {
		b.Fatal(err)
	}
	if err := json.Unmarshal(mb, &m); err != nil {
		b.Fatal(err)
	}
	layer := m.Layers[0]
	rc, err := repo.Fetch(ctx, layer)
	if err != nil {
		b.Fatal(err)
	}
	defer rc.Close()
	n, err := io.CopyBuffer(w, rc, make([]byte, 256<<10))
	if err != nil || n != layer.Size || w.Digest() != layer.Digest {
		b.Fatalf("plain pull: %d bytes, %s, %v", n, w.Digest(), err)
	}
}
