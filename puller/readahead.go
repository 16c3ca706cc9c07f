package puller

import (
	"io"
	"sync"
)

// readAhead reads r in a goroutine into a few chunks, so that the network
// download overlaps the hashing and writing the caller does with what it
// reads. The chunks come from the node's shared Buffers: the first one
// always (the read makes progress whatever the budget), up to chunks of
// them while the budget allows. Close stops the goroutine and gives the
// chunks back.
type readAhead struct {
	full chan *chunk
	free chan *chunk
	cur  *chunk
	err  error
	done chan struct{}
	once sync.Once
	wg   sync.WaitGroup
	pool *Buffers
	// held lists every chunk taken from pool; only the goroutine appends,
	// and Close reads it after the goroutine is gone.
	held []*chunk
}

type chunk struct {
	buf []byte
	n   int
	off int
	err error
}

func newReadAhead(r io.Reader, chunks int, pool *Buffers) *readAhead {
	ra := &readAhead{
		full: make(chan *chunk, chunks),
		free: make(chan *chunk, chunks),
		done: make(chan struct{}),
		pool: pool,
	}
	ra.wg.Add(1)
	go func() {
		defer ra.wg.Done()
		defer close(ra.full)
		for {
			c := ra.next(chunks)
			if c == nil {
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

// next returns a chunk to fill: one the consumer is done with, else a new
// one from the pool while fewer than max are held and the budget allows
// (the first one always), else the next one the consumer gives back. It
// returns nil once Close was called.
func (ra *readAhead) next(max int) *chunk {
	select {
	case c := <-ra.free:
		return c
	default:
	}
	if len(ra.held) < max {
		var buf []byte
		if len(ra.held) == 0 {
			buf = ra.pool.Get()
		} else {
			buf = ra.pool.TryGet()
		}
		if buf != nil {
			c := &chunk{buf: buf}
			ra.held = append(ra.held, c)
			return c
		}
	}
	select {
	case c := <-ra.free:
		return c
	case <-ra.done:
		return nil
	}
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

// Close stops the reading goroutine, waits for it and gives the chunks
// back to the pool. Nothing may be read after Close.
func (ra *readAhead) Close() {
	ra.once.Do(func() {
		close(ra.done)
		ra.wg.Wait()
		for _, c := range ra.held {
			ra.pool.Put(c.buf)
			c.buf = nil
		}
		ra.held, ra.cur = nil, nil
	})
}
