// Package testlog is a support library for tests: a log sink that
// goroutines (a logger, a daemon's output copier) write while a test reads.
// It needs nothing: no root, no registry, no apiserver.
package testlog

import (
	"bytes"
	"strings"
	"sync"
)

// Buffer is a bytes.Buffer safe for concurrent Write and String.
type Buffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *Buffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// String is everything written so far.
func (l *Buffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Count is how many times s occurs in what was written so far.
func (l *Buffer) Count(s string) int {
	return strings.Count(l.String(), s)
}
