package node

import (
	"sync"
	"time"

	"github.com/wasm-csi/wasm-csi/node/store"
)

// Pulls in flight, one per reference, joined by every publish of it.
//
// Written here rather than taken from golang.org/x/sync/singleflight: a
// singleflight call is a goroutine from start to end, and a pull waits,
// maybe minutes, for a download slot. A burst of 1,000 publishes kept ~700
// such goroutines, whose runtime records the Go runtime never frees and
// which stayed scattered through the heap after the burst. Here a pull is
// a record: its goroutine ends once it is queued for a slot (pullslots.Wait)
// and the download starts on a new one.

// pullCall is a pull in flight; done is closed once res and err are set.
type pullCall struct {
	done chan struct{}
	res  pullResult
	err  error
	// waiting counts the publishes waiting on the pull, and last is when
	// one last joined or left it (abandon.go). inflight.mu guards them.
	waiting int
	last    time.Time
}

type pullResult struct {
	rec    store.RefRecord
	cached bool
	// leader names the credentials the pull ran with (access.key).
	leader string
}

// inflight maps a reference to its pull in flight.
type inflight struct {
	mu sync.Mutex
	m  map[string]*pullCall
}

// join returns the pull of key in flight, or records a new one and reports
// that the caller must run it (and end it with end). The caller counts as
// waiting on the pull until it calls leave.
func (f *inflight) join(key string) (c *pullCall, leader bool, leave func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	c = f.m[key]
	if c == nil {
		if f.m == nil {
			f.m = map[string]*pullCall{}
		}
		c = &pullCall{done: make(chan struct{})}
		f.m[key] = c
		leader = true
	}
	c.waiting++
	c.last = time.Now()
	return c, leader, func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		c.waiting--
		c.last = time.Now()
	}
}

// idle is how long nobody has waited on or asked for pull c (0 while one
// waits); ended is true once the pull has ended.
func (f *inflight) idle(c *pullCall, now time.Time) (d time.Duration, ended bool) {
	select {
	case <-c.done:
		return 0, true
	default:
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if c.waiting > 0 {
		return 0, false
	}
	return now.Sub(c.last), false
}

// end records the outcome of the pull of key and wakes everyone waiting on
// it. A publish arriving from now on starts a new pull.
func (f *inflight) end(key string, c *pullCall, res pullResult, err error) {
	f.mu.Lock()
	if f.m[key] == c {
		delete(f.m, key)
		if len(f.m) == 0 {
			f.m = nil // maps do not shrink: drop a burst's table
		}
	}
	f.mu.Unlock()
	c.res, c.err = res, err
	close(c.done)
}

// result is the pull's outcome, once done is closed.
func (c *pullCall) result() (store.RefRecord, bool, string, error) {
	if c.err != nil {
		return store.RefRecord{}, false, "", c.err
	}
	return c.res.rec, c.res.cached, c.res.leader, nil
}
