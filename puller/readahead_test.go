package puller

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"runtime"
	"strconv"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"
)

const (
	raChunks    = 3
	raChunkSize = 4096
)

func pattern(n int) []byte {
	var seed [32]byte
	binary.LittleEndian.PutUint64(seed[:], uint64(n))
	b := make([]byte, n)
	rand.NewChaCha8(seed).Read(b)
	return b
}

// waitGoroutines waits for the goroutine count to come back to base.
func waitGoroutines(t *testing.T, base int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines, want %d: the read-ahead goroutine leaked", runtime.NumGoroutine(), base)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestReadAheadDelivers(t *testing.T) {
	sizes := []int{0, 1, raChunkSize - 1, raChunkSize, raChunkSize + 1, raChunks * raChunkSize, 17*raChunkSize + 123}
	sources := []struct {
		name string
		wrap func(io.Reader) io.Reader
	}{
		{"plain", func(r io.Reader) io.Reader { return r }},
		{"half reads", iotest.HalfReader},
		{"one byte reads", iotest.OneByteReader},
		{"data with EOF", iotest.DataErrReader},
	}
	base := runtime.NumGoroutine()
	for _, size := range sizes {
		data := pattern(size)
		for _, src := range sources {
			name := strconv.Itoa(size) + "/" + src.name
			t.Run(name+"/Read", func(t *testing.T) {
				ra := newReadAhead(src.wrap(bytes.NewReader(data)), raChunks, NewBuffers(raChunkSize, raChunks*raChunkSize))
				defer ra.Close()
				var got []byte
				buf := make([]byte, 1000) // small, and not a divisor of the chunk size
				for {
					n, err := ra.Read(buf)
					got = append(got, buf[:n]...)
					if err == io.EOF {
						break
					}
					if err != nil {
						t.Fatalf("Read: %v", err)
					}
				}
				if !bytes.Equal(got, data) {
					t.Fatalf("read %d bytes, want %d, or the bytes differ", len(got), len(data))
				}
				// EOF is sticky.
				if n, err := ra.Read(buf); n != 0 || err != io.EOF {
					t.Errorf("Read after EOF = %d, %v", n, err)
				}
			})
			t.Run(name+"/WriteTo", func(t *testing.T) {
				ra := newReadAhead(src.wrap(bytes.NewReader(data)), raChunks, NewBuffers(raChunkSize, raChunks*raChunkSize))
				defer ra.Close()
				var out bytes.Buffer
				n, err := ra.WriteTo(&out)
				if err != nil || n != int64(size) {
					t.Fatalf("WriteTo = %d, %v; want %d, nil", n, err, size)
				}
				if !bytes.Equal(out.Bytes(), data) {
					t.Fatal("WriteTo wrote other bytes")
				}
			})
			t.Run(name+"/ReadAll", func(t *testing.T) {
				// io.ReadAll uses Read; io.Copy uses WriteTo. Mix a
				// few Reads with a WriteTo for the rest.
				ra := newReadAhead(src.wrap(bytes.NewReader(data)), raChunks, NewBuffers(raChunkSize, raChunks*raChunkSize))
				defer ra.Close()
				head := make([]byte, min(size, 10))
				if _, err := io.ReadFull(ra, head); err != nil {
					t.Fatal(err)
				}
				var out bytes.Buffer
				if _, err := io.Copy(&out, ra); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(append(head, out.Bytes()...), data) {
					t.Fatal("Read then WriteTo lost or reordered bytes")
				}
			})
		}
	}
	waitGoroutines(t, base)
}

// errAfter returns data, then err, once; it counts reads after the error.
type errAfter struct {
	r         io.Reader
	err       error
	failed    bool
	lateReads atomic.Int32
}

func (e *errAfter) Read(p []byte) (int, error) {
	if e.failed {
		e.lateReads.Add(1)
		return 0, errors.New("read again after the error")
	}
	n, err := e.r.Read(p)
	if err == io.EOF {
		e.failed = true
		return n, e.err
	}
	return n, err
}

func TestReadAheadError(t *testing.T) {
	boom := errors.New("connection reset")
	for _, size := range []int{0, 100, raChunkSize, 5*raChunkSize + 7} {
		data := pattern(size)
		t.Run(strconv.Itoa(size)+"/Read", func(t *testing.T) {
			src := &errAfter{r: bytes.NewReader(data), err: boom}
			ra := newReadAhead(src, raChunks, NewBuffers(raChunkSize, raChunks*raChunkSize))
			got, err := io.ReadAll(ra)
			if !errors.Is(err, boom) {
				t.Fatalf("ReadAll error = %v, want the reader's", err)
			}
			if !bytes.Equal(got, data) {
				t.Errorf("got %d bytes before the error, want %d", len(got), len(data))
			}
			// The error stays; it never turns into a clean EOF.
			if _, err := ra.Read(make([]byte, 10)); !errors.Is(err, boom) {
				t.Errorf("second Read = %v, want the reader's error again", err)
			}
			ra.Close()
			if n := src.lateReads.Load(); n != 0 {
				t.Errorf("the source was read %d times after its error", n)
			}
		})
		t.Run(strconv.Itoa(size)+"/WriteTo", func(t *testing.T) {
			src := &errAfter{r: bytes.NewReader(data), err: boom}
			ra := newReadAhead(src, raChunks, NewBuffers(raChunkSize, raChunks*raChunkSize))
			var out bytes.Buffer
			n, err := ra.WriteTo(&out)
			if !errors.Is(err, boom) || n != int64(size) || !bytes.Equal(out.Bytes(), data) {
				t.Fatalf("WriteTo = %d, %v; want %d and the reader's error", n, err, size)
			}
			ra.Close()
			if n := src.lateReads.Load(); n != 0 {
				t.Errorf("the source was read %d times after its error", n)
			}
		})
	}
}

type failWriter struct{ n int }

func (w *failWriter) Write(p []byte) (int, error) {
	if w.n > 0 {
		w.n--
		return len(p), nil
	}
	return 1, errors.New("disk full")
}

func TestReadAheadWriterError(t *testing.T) {
	data := pattern(10 * raChunkSize)
	ra := newReadAhead(bytes.NewReader(data), raChunks, NewBuffers(raChunkSize, raChunks*raChunkSize))
	defer ra.Close()
	n, err := ra.WriteTo(&failWriter{n: 2})
	if err == nil || err.Error() != "disk full" || n != 2*raChunkSize+1 {
		t.Fatalf("WriteTo = %d, %v; want %d and the writer's error", n, err, 2*raChunkSize+1)
	}
	// What the writer did not take is still there to read.
	rest, err := io.ReadAll(ra)
	if err != nil || !bytes.Equal(rest, data[n:]) {
		t.Errorf("after the writer's error: %d bytes, %v; want the remaining %d", len(rest), err, len(data)-int(n))
	}
}

func TestReadAheadCloseUnblocks(t *testing.T) {
	base := runtime.NumGoroutine()
	pr, pw := io.Pipe()
	ra := newReadAhead(pr, raChunks, NewBuffers(raChunkSize, raChunks*raChunkSize))
	// Some bytes arrive, then the network stalls: the producer blocks in Read.
	if _, err := pw.Write([]byte("first bytes")); err != nil {
		t.Fatal(err)
	}
	closed := make(chan struct{})
	go func() {
		ra.Close()
		close(closed)
	}()
	select {
	case <-closed:
		t.Fatal("Close returned while the producer was still inside Read")
	case <-time.After(50 * time.Millisecond):
	}
	// The caller closes the body (copyLayer closes rc): Read returns and
	// Close can finish.
	pr.CloseWithError(errors.New("body closed"))
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return after the reader unblocked")
	}
	waitGoroutines(t, base)
}

func TestReadAheadCloseEarly(t *testing.T) {
	// The consumer stops reading half-way: Close must not wait for the
	// whole stream, nor leave the producer blocked on a full queue.
	base := runtime.NumGoroutine()
	var reads atomic.Int64
	src := readerFunc(func(p []byte) (int, error) {
		reads.Add(1)
		clear(p)
		return len(p), nil // endless
	})
	ra := newReadAhead(src, raChunks, NewBuffers(raChunkSize, raChunks*raChunkSize))
	buf := make([]byte, 100)
	if _, err := io.ReadFull(ra, buf); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { ra.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close on an endless stream did not return")
	}
	ra.Close() // twice is fine
	waitGoroutines(t, base)
	// The producer stops: at most the chunks in flight were filled.
	if n := reads.Load(); n > raChunks+2 {
		t.Errorf("the producer filled %d chunks for a consumer that took 100 bytes", n)
	}
}

type readerFunc func([]byte) (int, error)

func (f readerFunc) Read(p []byte) (int, error) { return f(p) }

func TestReadAheadBoundedMemory(t *testing.T) {
	// Reading a large stream allocates the chunks once, not per chunk.
	const size = 64 << 20
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	ra := newReadAhead(io.LimitReader(zeros{}, size), 4, NewBuffers(256<<10, 1<<20))
	n, err := ra.WriteTo(io.Discard)
	ra.Close()
	runtime.ReadMemStats(&after)
	if err != nil || n != size {
		t.Fatalf("WriteTo = %d, %v", n, err)
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 2<<20 {
		t.Errorf("%d bytes allocated to stream %d bytes through 1 MiB of chunks", alloc, size)
	}
}
