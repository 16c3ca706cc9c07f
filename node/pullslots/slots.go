// Package pullslots bounds the module downloads a node runs at once, as
// kubelet's maxParallelImagePulls bounds image pulls: the memory and
// connections of a download are paid per slot, so a burst of pods asking for
// distinct modules queues instead of growing the daemon past its limit.
//
// It owns the slots (a FIFO semaphore, golang.org/x/sync/semaphore) and the
// count of downloads running and waiting, per key and in total, and the
// resolve slots that bound the manifest requests made on the way to a
// download (ResolvesPerSlot per download slot, a semaphore of their own: a
// manifest check never waits behind a download). It does not decide what is
// downloaded, join two publishes of one image (the node's singleflight
// does), or hold any buffer.
package pullslots

import (
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
type Slots struct {
	mu      sync.Mutex
	sem     *semaphore.Weighted
	limit   int
	running map[string]int
	waiting map[string]int
	nRun    int
	nWait   int
	// rsem bounds manifest requests; nRes counts those asking or holding
	// one, so that the slots are not idle while they run.
	rsem *semaphore.Weighted
	nRes int

	// gen counts Acquire calls, so an idle timer knows whether the slots
	// were used since it was set.
	gen       uint64
	idleDelay time.Duration
	idleFn    func()
	idleTimer *time.Timer
}

// New returns Slots allowing limit downloads at once (DefaultLimit when
// limit < 1).
func New(limit int) *Slots {
	if limit < 1 {
		limit = DefaultLimit
	}
	return &Slots{sem: semaphore.NewWeighted(int64(limit)), limit: limit,
		rsem:    semaphore.NewWeighted(int64(limit * ResolvesPerSlot)),
		running: map[string]int{}, waiting: map[string]int{}}
}

// SetLimit changes the number of slots for downloads that ask from now on.
// Downloads running or waiting keep the slots they asked under, as a config
// change leaves pulls in flight with the settings they started with; so
// for a while after a change the total may exceed the new limit.
func (s *Slots) SetLimit(limit int) {
	if limit < 1 {
		limit = DefaultLimit
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if limit != s.limit {
		s.sem = semaphore.NewWeighted(int64(limit))
		s.rsem = semaphore.NewWeighted(int64(limit * ResolvesPerSlot))
		s.limit = limit
	}
}

// Limit is the number of slots.
func (s *Slots) Limit() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.limit
}

// Acquire waits for a slot, first come first served, until ctx ends. key
// names the download (the image) so that WillWait can tell a download that
// waits from one that runs. The returned release gives the slot back; it
// may be called more than once.
func (s *Slots) Acquire(ctx context.Context, key string) (release func(), err error) {
	s.mu.Lock()
	sem := s.sem
	s.used()
	s.waiting[key]++
	s.nWait++
	s.mu.Unlock()
	err = sem.Acquire(ctx, 1)
	s.mu.Lock()
	dec(s.waiting, key)
	s.nWait--
	if err == nil {
		s.running[key]++
		s.nRun++
	} else {
		s.armIdle()
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			sem.Release(1)
			s.mu.Lock()
			dec(s.running, key)
			s.nRun--
			s.armIdle()
			s.mu.Unlock()
		})
	}, nil
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
func (s *Slots) busy() bool { return s.nRun > 0 || s.nWait > 0 || s.nRes > 0 }

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

func dec(m map[string]int, key string) {
	if m[key] <= 1 {
		delete(m, key)
		return
	}
	m[key]--
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
	return s.nWait > 0 || s.nRun >= s.limit
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
	return s.nRun, s.nWait
}
