package puller

import (
	"bytes"
	"io"
	"runtime"
	"testing"
	"unsafe"
)

func TestBuffersBudget(t *testing.T) {
	b := NewBuffers(4096, 3*4096)
	var got [][]byte
	for range 3 {
		buf := b.TryGet()
		if buf == nil {
			t.Fatal("TryGet refused within the budget")
		}
		if len(buf) != 4096 || cap(buf) != 4096 || uintptr(unsafe.Pointer(&buf[0]))%bufferAlignment != 0 {
			t.Fatalf("buffer of len %d cap %d at %p: want 4096 bytes, page-aligned", len(buf), cap(buf), &buf[0])
		}
		got = append(got, buf)
	}
	if b.TryGet() != nil {
		t.Fatal("TryGet handed out a buffer past the budget")
	}
	// Get never refuses: a pull must make progress.
	over := b.Get()
	if over == nil {
		t.Fatal("Get refused")
	}
	if out, pooled := b.Counts(); out != 4 || pooled != 0 {
		t.Fatalf("counts %d out, %d pooled; want 4, 0", out, pooled)
	}
	b.Put(over)
	for _, buf := range got {
		b.Put(buf)
	}
	// The pool keeps no more than the budget.
	if out, pooled := b.Counts(); out != 0 || pooled != 3 {
		t.Fatalf("after Put: %d out, %d pooled; want 0, 3", out, pooled)
	}
	// A pooled buffer is handed out again rather than a new one made.
	again := b.TryGet()
	found := false
	for _, buf := range got {
		if &buf[0] == &again[0] || &over[0] == &again[0] {
			found = true
		}
	}
	if !found {
		t.Error("TryGet made a new buffer while pooled ones were free")
	}
	b.Put(again)
	b.Trim()
	if out, pooled := b.Counts(); out != 0 || pooled != 0 {
		t.Fatalf("after Trim: %d out, %d pooled; want 0, 0", out, pooled)
	}
	b.Put(make([]byte, 10)) // not from the pool: ignored
	if out, pooled := b.Counts(); out != 0 || pooled != 0 {
		t.Fatalf("a foreign buffer changed the counts: %d out, %d pooled", out, pooled)
	}
}

func TestReadAheadWithinBudget(t *testing.T) {
	// A budget of one chunk: the read-ahead still delivers everything (its
	// first chunk is always granted), holds no more, and gives it back.
	pool := NewBuffers(raChunkSize, raChunkSize)
	other := pool.Get() // another pull holds the whole budget
	data := pattern(9*raChunkSize + 7)
	ra := newReadAhead(bytes.NewReader(data), raChunks, pool)
	var got bytes.Buffer
	if _, err := ra.WriteTo(&got); err != nil {
		t.Fatal(err)
	}
	if out, _ := pool.Counts(); out != 2 {
		t.Errorf("%d buffers out during the read, want 2 (the other pull's and the read-ahead's one)", out)
	}
	ra.Close()
	if !bytes.Equal(got.Bytes(), data) {
		t.Fatal("the bytes differ")
	}
	pool.Put(other)
	if out, pooled := pool.Counts(); out != 0 || pooled != 1 {
		t.Errorf("after Close: %d out, %d pooled; want 0 out and the budget's 1 pooled", out, pooled)
	}
}

func TestReadAheadReusesPool(t *testing.T) {
	// Pulls one after another reuse the pool's chunks instead of making new ones.
	pool := NewBuffers(256<<10, 1<<20)
	run := func() {
		ra := newReadAhead(io.LimitReader(zeros{}, 8<<20), 4, pool)
		if _, err := ra.WriteTo(io.Discard); err != nil {
			t.Fatal(err)
		}
		ra.Close()
	}
	run()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for range 10 {
		run()
	}
	runtime.ReadMemStats(&after)
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 256<<10 {
		t.Errorf("%d bytes allocated by 10 read-aheads over a warm pool of 1 MiB", alloc)
	}
}
