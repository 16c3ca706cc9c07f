package store

import (
	"strconv"
	"testing"

	"github.com/wasm-csi/wasm-csi/puller"
)

// TestBlobWriterPooledBuffers: a writer given the node's pool takes its
// staging buffers from it, within the budget for the second, writes the
// same bytes as with its own, and gives every buffer back on Commit, Abort
// and after a Reset, so a burst of pulls reuses a few buffers.
func TestBlobWriterPooledBuffers(t *testing.T) {
	for _, fsys := range filesystems {
		t.Run(fsys.name, func(t *testing.T) {
			s := openStore(t, fsys.root(t))
			for _, budget := range []int{1, 2, 8} {
				pool := puller.NewBuffers(stageSize, budget*stageSize)
				for i, size := range blobSizes {
					t.Run(strconv.Itoa(budget)+"/"+strconv.Itoa(size), func(t *testing.T) {
						data := content(size, uint64(i))
						w, err := s.NewBlobWriter(pool)
						if err != nil {
							t.Fatal(err)
						}
						checkMode(t, w, fsys.direct)
						if out, _ := pool.Counts(); w.direct && out != 1 {
							t.Errorf("a new direct writer holds %d pooled buffers, want 1", out)
						}
						writePieces(t, w, data, uint64(i))
						if out, _ := pool.Counts(); out > 2 {
							t.Errorf("a writer holds %d pooled buffers, want at most 2", out)
						}
						if i%2 == 1 {
							// Reset keeps the buffers it has.
							if err := w.Reset(); err != nil {
								t.Fatal(err)
							}
							writePieces(t, w, data, uint64(i))
						}
						d, err := w.Commit(nil)
						if err != nil {
							t.Fatal(err)
						}
						checkBlob(t, s, d, data)
						if out, pooled := pool.Counts(); out != 0 || pooled > budget {
							t.Errorf("after Commit: %d buffers out, %d pooled; want 0, at most %d", out, pooled, budget)
						}
						// An aborted writer gives its buffers back too.
						w, err = s.NewBlobWriter(pool)
						if err != nil {
							t.Fatal(err)
						}
						writePieces(t, w, data, uint64(i))
						w.Abort()
						if out, _ := pool.Counts(); out != 0 {
							t.Errorf("after Abort: %d buffers out, want 0", out)
						}
						noTemps(t, s.Root())
					})
				}
				if _, pooled := pool.Counts(); fsys.direct == 1 && pooled == 0 {
					t.Error("the pool kept no buffer for the next writer")
				}
			}
		})
	}
}

// oddBuffers hands out buffers O_DIRECT cannot use.
type oddBuffers struct{ out int }

func (o *oddBuffers) Get() []byte    { o.out++; return make([]byte, stageSize+1)[1:] }
func (o *oddBuffers) TryGet() []byte { return nil }
func (o *oddBuffers) Put([]byte)     { o.out-- }

// TestBlobWriterOddBuffers: buffers that are not page-aligned are given back
// and the writer uses its own, rather than failing each O_DIRECT write.
func TestBlobWriterOddBuffers(t *testing.T) {
	s := openStore(t, t.TempDir())
	pool := &oddBuffers{}
	w, err := s.NewBlobWriter(pool)
	if err != nil {
		t.Fatal(err)
	}
	if !w.direct {
		t.Skip("no O_DIRECT here")
	}
	data := content(3<<20+17, 1)
	writePieces(t, w, data, 1)
	d, err := w.Commit(nil)
	if err != nil {
		t.Fatal(err)
	}
	checkBlob(t, s, d, data)
	if pool.out != 0 {
		t.Errorf("%d odd buffers kept", pool.out)
	}
}
