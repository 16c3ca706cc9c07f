package puller

import (
	"sync"
	"unsafe"
)

// Defaults of the buffers pulls share.
const (
	// BufferSize is the size of one pooled buffer: a read-ahead chunk or a
	// blob writer's staging buffer.
	BufferSize = 1 << 20
	// DefaultBufferBudget is how many bytes of buffers all pulls together
	// may hold beyond the one each needs to make progress.
	DefaultBufferBudget = 16 << 20
	// bufferAlignment lets a buffer be written with O_DIRECT.
	bufferAlignment = 4096
)

// Buffers is the pool of equal, page-aligned buffers every pull of the node
// takes its read-ahead chunks and staging buffers from, under one byte
// budget rather than a fixed amount per pull: a burst of pulls shares the
// budget instead of multiplying it, and a buffer freed by one pull is
// reused by the next instead of allocated again.
//
// Get always returns a buffer, past the budget too, so every pull makes
// progress (the pull slots bound how many pulls ask); TryGet, for buffers
// that only make a pull faster, returns one only within the budget. Nothing
// ever waits for a buffer, so pulls cannot deadlock on each other.
type Buffers struct {
	size   int
	budget int // buffers

	mu   sync.Mutex
	free [][]byte
	out  int
}

// NewBuffers returns a pool of size-byte buffers (BufferSize when size <= 0,
// rounded up to the alignment) under a budget of budget bytes
// (DefaultBufferBudget when budget <= 0).
func NewBuffers(size, budget int) *Buffers {
	if size <= 0 {
		size = BufferSize
	}
	size = (size + bufferAlignment - 1) &^ (bufferAlignment - 1)
	if budget <= 0 {
		budget = DefaultBufferBudget
	}
	return &Buffers{size: size, budget: max(1, budget/size)}
}

// Size is the length of every buffer.
func (b *Buffers) Size() int { return b.size }

// Get returns a buffer: a pooled one, or a new one when none is free.
func (b *Buffers) Get() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.take()
}

// TryGet returns a buffer while the buffers handed out stay within the
// budget, and nil past it.
func (b *Buffers) TryGet() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.out >= b.budget {
		return nil
	}
	return b.take()
}

func (b *Buffers) take() []byte {
	b.out++
	if n := len(b.free); n > 0 {
		buf := b.free[n-1]
		b.free[n-1] = nil
		b.free = b.free[:n-1]
		return buf
	}
	return alignedBuffer(b.size)
}

// Put gives a buffer from Get or TryGet back. The pool keeps it for the
// next pull while it holds no more than the budget; past that the buffer is
// left to the garbage collector.
func (b *Buffers) Put(buf []byte) {
	if buf == nil || cap(buf) != b.size {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.out--
	if b.out+len(b.free) < b.budget {
		b.free = append(b.free, buf[:b.size])
	}
}

// Trim drops the pooled buffers, so that the memory can go back to the
// system when no pull runs.
func (b *Buffers) Trim() {
	b.mu.Lock()
	defer b.mu.Unlock()
	clear(b.free)
	b.free = nil
}

// Counts returns the buffers handed out and those pooled.
func (b *Buffers) Counts() (out, pooled int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.out, len(b.free)
}

// alignedBuffer returns n bytes starting at an address aligned for
// O_DIRECT, with a capacity of exactly n.
func alignedBuffer(n int) []byte {
	raw := make([]byte, n+bufferAlignment)
	off := int(uintptr(unsafe.Pointer(&raw[0])) & (bufferAlignment - 1))
	if off != 0 {
		off = bufferAlignment - off
	}
	return raw[off : off+n : off+n]
}
