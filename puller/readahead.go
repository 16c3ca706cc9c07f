package puller

import (
	"io"
	"sync"
)

// readAhead reads r in a goroutine into a few fixed chunks, so that the
// network download overlaps the hashing and writing the caller does with
// what it reads. Memory is bounded: chunks*chunkSize bytes, whatever the
// stream's size. Close stops the goroutine.
type readAhead struct {
	full chan *chunk
	free chan *chunk
	cur  *chunk
	err  error
	done chan struct{}
	once sync.Once
	wg   sync.WaitGroup
}

type chunk struct {
	buf []byte
	n   int
	off int
	err error
}

func newReadAhead(r io.Reader, chunks, chunkSize int) *readAhead {
	ra := &readAhead{
		full: make(chan *chunk, chunks),
		free: make(chan *chunk, chunks),
		done: make(chan struct{}),
	}
	for i := 0; i < chunks; i++ {
		ra.free <- &chunk{buf: make([]byte, chunkSize)}
	}
	ra.wg.Add(1)
	go func() {
		defer ra.wg.Done()
		defer close(ra.full)
		for {
			var c *chunk
			select {
			case c = <-ra.free:
			case <-ra.done:
				return
			}
			c.n, c.off = 0, 0
			// Fill the chunk, so the consumer works on large pieces.
			for c.n < len(c.buf) && c.err == nil {
				var n int
				n, c.err = r.Read(c.buf[c.n:])
				c.n += n
			}
			err := c.err
			select {
			case ra.full <- c:
			case <-ra.done:
				return
			}
			if err != nil {
				return
			}
		}
	}()
	return ra
}

// current returns the chunk with unread bytes, fetching the next one when
// the current is used up, or the stream's final error (io.EOF at the end).
func (ra *readAhead) current() (*chunk, error) {
	for {
		if ra.cur != nil && ra.cur.off < ra.cur.n {
			return ra.cur, nil
		}
		if ra.cur != nil {
			if ra.cur.err != nil {
				ra.err = ra.cur.err
			}
			ra.cur.err = nil
			ra.free <- ra.cur
			ra.cur = nil
		}
		if ra.err != nil {
			return nil, ra.err
		}
		c, ok := <-ra.full
		if !ok {
			return nil, io.ErrUnexpectedEOF
		}
		ra.cur = c
	}
}

func (ra *readAhead) Read(p []byte) (int, error) {
	c, err := ra.current()
	if err != nil {
		return 0, err
	}
	n := copy(p, c.buf[c.off:c.n])
	c.off += n
	return n, nil
}

// WriteTo hands whole chunks to w, saving a copy.
func (ra *readAhead) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for {
		c, err := ra.current()
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
		n, err := w.Write(c.buf[c.off:c.n])
		c.off += n
		total += int64(n)
		if err != nil {
			return total, err
		}
	}
}

// Close stops the reading goroutine and waits for it.
func (ra *readAhead) Close() {
	ra.once.Do(func() { close(ra.done) })
	ra.wg.Wait()
}
