// Package pullslots bounds the module downloads a node runs at once, as
// kubelet's maxParallelImagePulls bounds image pulls: the memory and
// connections of a download are paid per slot, so a burst of pods asking for
// distinct modules queues instead of growing the daemon past its limit.
//
// It owns two sets of slots, each with its queue, first come first served:
// the download slots, with the count of downloads running and waiting per
// key and in total, and the resolve slots that bound the manifest requests
// made on the way to a download (ResolvesPerSlot per download slot, apart:
// a manifest check never waits behind a download). Whatever waits for a
// slot is a record in a queue, not a goroutine (Wait, WaitResolve), so a
// burst of any size queues in a few hundred bytes per pull. It does not
// decide what is downloaded, join two publishes of one image (the node
// does), or hold any buffer.
package pullslots

import (
	"container/list"
	"context"
	"sync"
	"time"
)

// DefaultLimit is the number of downloads in flight when the config file
// does not set limits.maxConcurrentPulls.
const DefaultLimit = 4

// ResolvesPerSlot is how many manifest requests (a tag's resolution, an
// access check) may run at once per download slot. Unbounded, a burst of
// 1,000 publishes made 1,000 registry requests at once, each with its
// connection, goroutines and response, before any waited for a download
// slot; a few per slot keep the downloads fed.
const ResolvesPerSlot = 4

// Slots is a resizable FIFO limit on downloads in flight and on manifest
// requests. The zero value is not usable: use New.
//
// The queues are written here rather than taken from
// golang.org/x/sync/semaphore: a semaphore's waiter is a goroutine blocked
// in Acquire, and a burst of 1,000 publishes kept ~700 of them waiting for
// a download slot and ~330 for a resolve slot, each with its stack and a
// runtime record the Go runtime never frees, scattered through the heap the
// burst left behind.
type Slots struct {
	mu sync.Mutex
	// dl are the download slots, res the resolve slots.
	dl, res fifo

	// gen counts requests for a slot, so an idle timer knows whether the
	// slots were used since it was set.
	gen       uint64
	idleDelay time.Duration
	idleFn    func()
	idleTimer *time.Timer
}

// fifo is a limit with its queue. Slots.mu guards it.
type fifo struct {
	limit int
	// queue holds the *waiter of each request waiting for a slot,
	// oldest first.
	queue   list.List
	running map[string]int
	waiting map[string]int
	nRun    int
}

// waiter is a request waiting in a queue.
type waiter struct {
	key   string
	start func(release func())
	elem  *list.Element
}

// New returns Slots allowing limit downloads at once (DefaultLimit when
// limit < 1).
func New(limit int) *Slots {
	if limit < 1 {
		limit = DefaultLimit
	}
	s := &Slots{}
	s.dl.limit, s.res.limit = limit, limit*ResolvesPerSlot
	return s
}

// SetLimit changes the number of download slots, and with it the resolve
// slots. Requests running keep their slots: after the limit is lowered, the
// next starts once fewer than the new limit run. A raised limit starts
// waiting requests at once.
func (s *Slots) SetLimit(limit int) {
	if limit < 1 {
		limit = DefaultLimit
	}
	s.mu.Lock()
	s.dl.limit, s.res.limit = limit, limit*ResolvesPerSlot
	starts := append(s.dispatch(&s.dl), s.dispatch(&s.res)...)
	s.mu.Unlock()
	run(starts)
}

// Limit is the number of download slots.
func (s *Slots) Limit() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dl.limit
}

// Wait queues a download of key (the image, so that WillWait can tell a
// download that waits from one that runs) and returns at once. Once a slot
// is free for it, first come first served, start runs on a goroutine of its
// own with the slot's release, which gives the slot back and may be called
// more than once. cancel takes the download out of the queue and reports
// whether it did: false once start has been called (or is about to be).
func (s *Slots) Wait(key string, start func(release func())) (cancel func() bool) {
	return s.wait(&s.dl, key, start)
}

// WaitResolve queues a request for one of the ResolvesPerSlot x limit
// resolve slots, as Wait does for a download slot. A resolve slot is held
// for a manifest request, never while waiting for a download slot.
func (s *Slots) WaitResolve(start func(release func())) (cancel func() bool) {
	return s.wait(&s.res, "", start)
}

// Acquire waits for a download slot, first come first served, until ctx
// ends: Wait for a caller that has a goroutine to block. The returned
// release gives the slot back; it may be called more than once.
func (s *Slots) Acquire(ctx context.Context, key string) (release func(), err error) {
	return s.acquire(ctx, &s.dl, key)
}

// Resolve waits for a resolve slot until ctx ends, as Acquire does for a
// download slot.
func (s *Slots) Resolve(ctx context.Context) (release func(), err error) {
	return s.acquire(ctx, &s.res, "")
}

func (s *Slots) wait(q *fifo, key string, start func(release func())) (cancel func() bool) {
	s.mu.Lock()
	s.used()
	w := &waiter{key: key, start: start}
	w.elem = q.queue.PushBack(w)
	q.waiting = inc(q.waiting, key)
	starts := s.dispatch(q)
	s.mu.Unlock()
	run(starts)
	return func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		if w.elem == nil {
			return false
		}
		q.queue.Remove(w.elem)
		w.elem = nil
		q.waiting = dec(q.waiting, key)
		s.armIdle()
		return true
	}
}

func (s *Slots) acquire(ctx context.Context, q *fifo, key string) (release func(), err error) {
	got := make(chan func(), 1)
	cancel := s.wait(q, key, func(release func()) { got <- release })
	select {
	case release := <-got:
		return release, nil
	case <-ctx.Done():
		if !cancel() {
			// The slot came as ctx ended: give it back.
			(<-got)()
		}
		return nil, ctx.Err()
	}
}

// dispatch takes waiting requests off q while slots are free and returns
// their starts, for run once s.mu is released. s.mu is held.
func (s *Slots) dispatch(q *fifo) []func() {
	var starts []func()
	for q.nRun < q.limit && q.queue.Len() > 0 {
		w := q.queue.Remove(q.queue.Front()).(*waiter)
		w.elem = nil
		q.waiting = dec(q.waiting, w.key)
		q.running = inc(q.running, w.key)
		q.nRun++
		release := s.releaser(q, w.key)
		start := w.start
		starts = append(starts, func() { start(release) })
	}
	return starts
}

// releaser returns the release of a slot of q held for key.
func (s *Slots) releaser(q *fifo, key string) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			q.running = dec(q.running, key)
			q.nRun--
			starts := s.dispatch(q)
			s.armIdle()
			s.mu.Unlock()
			run(starts)
		})
	}
}

// run starts each request handed a slot on a goroutine of its own.
func run(starts []func()) {
	for _, f := range starts {
		go f()
	}
}

// OnIdle makes fn run, in a goroutine of its own, each time the slots have
// stayed idle (no download or manifest request running or waiting) for d
// after being used: the moment to give a burst's memory back.
func (s *Slots) OnIdle(d time.Duration, fn func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.idleDelay, s.idleFn = d, fn
}

// Poke restarts the idle delay as a download would, for work done without
// one: a burst's last publishes, kubelet's retries served from the store
// after their pulls, come after the last download and leave garbage of
// their own.
func (s *Slots) Poke() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.used()
	s.armIdle()
}

// used records that the slots are in use: an idle timer set before is
// stopped, and one about to fire does nothing. s.mu is held.
func (s *Slots) used() {
	s.gen++
	if s.idleTimer != nil {
		s.idleTimer.Stop()
		s.idleTimer = nil
	}
}

// busy reports whether a download or a manifest request runs or waits.
// s.mu is held.
func (s *Slots) busy() bool {
	return s.dl.nRun > 0 || s.dl.queue.Len() > 0 || s.res.nRun > 0 || s.res.queue.Len() > 0
}

// armIdle starts the idle timer when the last download is done. s.mu is held.
func (s *Slots) armIdle() {
	if s.idleFn == nil || s.busy() {
		return
	}
	if s.idleTimer != nil {
		s.idleTimer.Stop()
	}
	gen, fn := s.gen, s.idleFn
	s.idleTimer = time.AfterFunc(s.idleDelay, func() {
		s.mu.Lock()
		still := s.gen == gen && !s.busy()
		if still {
			s.idleTimer = nil
		}
		s.mu.Unlock()
		if still {
			fn()
		}
	})
}

// inc and dec count key in m. A map that empties is dropped: Go maps do not
// shrink, and a burst's would keep its 1,000 entries' worth of table.
// Resolve requests have no key (""): they are not counted per key, and
// make no map.
func inc(m map[string]int, key string) map[string]int {
	if key == "" {
		return m
	}
	if m == nil {
		m = map[string]int{}
	}
	m[key]++
	return m
}

func dec(m map[string]int, key string) map[string]int {
	if key == "" {
		return m
	}
	if m[key] > 1 {
		m[key]--
		return m
	}
	delete(m, key)
	if len(m) == 0 {
		return nil
	}
	return m
}

// WillWait reports whether a download of key asked for now would wait for
// a slot: one for key already waits, or none runs and every slot is taken
// or others wait before it.
func (s *Slots) WillWait(key string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dl.waiting[key] > 0 {
		return true
	}
	if s.dl.running[key] > 0 {
		return false
	}
	return s.dl.queue.Len() > 0 || s.dl.nRun >= s.dl.limit
}

// Downloading reports whether a download of key holds a slot.
func (s *Slots) Downloading(key string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dl.running[key] > 0
}

// Counts returns the downloads holding a slot and those waiting for one.
func (s *Slots) Counts() (running, waiting int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.dl.nRun, s.dl.queue.Len()
}
