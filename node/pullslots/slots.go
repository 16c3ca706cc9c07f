// Package pullslots bounds the module downloads a node runs at once, as
// kubelet's maxParallelImagePulls bounds image pulls: the memory and
// connections of a download are paid per slot, so a burst of pods asking for
// distinct modules queues instead of growing the daemon past its limit.
//
// It owns the slots and their queue, first come first served, the count of
// downloads running and waiting, per key and in total, and the resolve slots
// that bound the manifest requests made on the way to a download
// (ResolvesPerSlot per download slot, a semaphore of their own,
// golang.org/x/sync/semaphore: a manifest check never waits behind a
// download). A download waiting for a slot is a record in the queue, not a
// goroutine (Wait), so a burst of any size queues in a few hundred bytes
// per pull. It does not decide what is downloaded, join two publishes of one
// image (the node does), or hold any buffer.
package pullslots

import (
	"container/list"
	"context"
	"sync"
	"time"

	"golang.org/x/sync/semaphore"
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

// Slots is a resizable FIFO limit on downloads in flight. The zero value is
// not usable: use New.
//
// The queue is written here rather than taken from
// golang.org/x/sync/semaphore (which the resolve slots use): a semaphore's
// waiter is a goroutine blocked in Acquire, and a burst of 1,000 publishes
// kept ~700 of them, each with its stack and a runtime record the Go
// runtime never frees, scattered through the heap the burst left behind.
type Slots struct {
	mu    sync.Mutex
	limit int
	// queue holds the *waiter of each download waiting for a slot,
	// oldest first.
	queue   list.List
	running map[string]int
	waiting map[string]int
	nRun    int
	// rsem bounds manifest requests; nRes counts those asking or holding
	// one, so that the slots are not idle while they run.
	rsem *semaphore.Weighted
	nRes int

	// gen counts requests for a slot, so an idle timer knows whether the
	// slots were used since it was set.
	gen       uint64
	idleDelay time.Duration
	idleFn    func()
	idleTimer *time.Timer
}

// waiter is a download waiting in the queue.
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
	return &Slots{limit: limit, rsem: semaphore.NewWeighted(int64(limit * ResolvesPerSlot))}
}

// SetLimit changes the number of slots. Downloads running keep their slots:
// after the limit is lowered, the next download starts once fewer than the
// new limit run. A raised limit starts waiting downloads at once.
func (s *Slots) SetLimit(limit int) {
	if limit < 1 {
		limit = DefaultLimit
	}
	s.mu.Lock()
	if limit != s.limit {
		s.rsem = semaphore.NewWeighted(int64(limit * ResolvesPerSlot))
		s.limit = limit
	}
	starts := s.dispatch()
	s.mu.Unlock()
	run(starts)
}

// Limit is the number of slots.
func (s *Slots) Limit() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.limit
}

// Wait queues a download of key (the image, so that WillWait can tell a
// download that waits from one that runs) and returns at once. Once a slot
// is free for it, first come first served, start runs on a goroutine of its
// own with the slot's release, which gives the slot back and may be called
// more than once. cancel takes the download out of the queue and reports
// whether it did: false once start has been called (or is about to be).
func (s *Slots) Wait(key string, start func(release func())) (cancel func() bool) {
	s.mu.Lock()
	s.used()
	w := &waiter{key: key, start: start}
	w.elem = s.queue.PushBack(w)
	s.waiting = inc(s.waiting, key)
	starts := s.dispatch()
	s.mu.Unlock()
	run(starts)
	return func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		if w.elem == nil {
			return false
		}
		s.queue.Remove(w.elem)
		w.elem = nil
		s.waiting = dec(s.waiting, key)
		s.armIdle()
		return true
	}
}

// Acquire waits for a slot, first come first served, until ctx ends: Wait
// for a caller that has a goroutine to block. The returned release gives
// the slot back; it may be called more than once.
func (s *Slots) Acquire(ctx context.Context, key string) (release func(), err error) {
	got := make(chan func(), 1)
	cancel := s.Wait(key, func(release func()) { got <- release })
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

// dispatch takes waiting downloads off the queue while slots are free and
// returns their starts, for run once s.mu is released. s.mu is held.
func (s *Slots) dispatch() []func() {
	var starts []func()
	for s.nRun < s.limit && s.queue.Len() > 0 {
		w := s.queue.Remove(s.queue.Front()).(*waiter)
		w.elem = nil
		s.waiting = dec(s.waiting, w.key)
		s.running = inc(s.running, w.key)
		s.nRun++
		release := s.releaser(w.key)
		start := w.start
		starts = append(starts, func() { start(release) })
	}
	return starts
}

// releaser returns the release of a slot held by a download of key.
func (s *Slots) releaser(key string) func() {
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			s.running = dec(s.running, key)
			s.nRun--
			starts := s.dispatch()
			s.armIdle()
			s.mu.Unlock()
			run(starts)
		})
	}
}

// run starts each download handed a slot on a goroutine of its own.
func run(starts []func()) {
	for _, f := range starts {
		go f()
	}
}

// Resolve waits for one of the ResolvesPerSlot x limit resolve slots, first
// come first served, until ctx ends; the returned release (which may be
// called more than once) gives it back. A resolve slot is held for one
// manifest request, never while waiting for a download slot.
func (s *Slots) Resolve(ctx context.Context) (release func(), err error) {
	s.mu.Lock()
	sem := s.rsem
	s.used()
	s.nRes++
	s.mu.Unlock()
	done := func() {
		s.mu.Lock()
		s.nRes--
		s.armIdle()
		s.mu.Unlock()
	}
	if err := sem.Acquire(ctx, 1); err != nil {
		done()
		return nil, err
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			sem.Release(1)
			done()
		})
	}, nil
}

// OnIdle makes fn run, in a goroutine of its own, each time the slots have
// stayed idle (no download running or waiting) for d after being used: the
// moment to give a burst's memory back.
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

// busy reports whether a download runs or waits or a manifest request
// asks or runs. s.mu is held.
func (s *Slots) busy() bool { return s.nRun > 0 || s.queue.Len() > 0 || s.nRes > 0 }

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
func inc(m map[string]int, key string) map[string]int {
	if m == nil {
		m = map[string]int{}
	}
	m[key]++
	return m
}

func dec(m map[string]int, key string) map[string]int {
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
	if s.waiting[key] > 0 {
		return true
	}
	if s.running[key] > 0 {
		return false
	}
	return s.queue.Len() > 0 || s.nRun >= s.limit
}

// Downloading reports whether a download of key holds a slot.
func (s *Slots) Downloading(key string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.running[key] > 0
}

// Counts returns the downloads holding a slot and those waiting for one.
func (s *Slots) Counts() (running, waiting int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.nRun, s.queue.Len()
}
