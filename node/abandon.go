package node

import (
	"errors"
	"sync"
	"time"
)

// Queued pulls nobody wants any more. A pull outlives its callers on
// purpose (kubelet's retry joins it), so a pull whose pods were all deleted
// would otherwise keep its place in the queue, and then download, until the
// pull timeout. It leaves the queue once no publish has waited on it or
// asked for it for abandonAfter, longer than kubelet's longest backoff
// between two attempts (2m2s): a pod still there has asked again by then.
//
// Written here rather than taken from a library: what joins the callers of
// one pull (inflight.go) does not count them.

// DefaultAbandonAfter is how long a queued pull stays without being asked for.
const DefaultAbandonAfter = 3 * time.Minute

// errAbandoned is the cause of a wait for a pull slot ended by abandonment.
var errAbandoned = errors.New("no publish asked for the pull")

// askers records, per pull, the publishes waiting on it and when one last
// asked or left.
type askers struct {
	mu sync.Mutex
	m  map[string]*asked
}

type asked struct {
	waiting int
	last    time.Time
}

// ask records a caller of the pull of key until done is called.
func (a *askers) ask(key string) (done func()) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.m == nil {
		a.m = map[string]*asked{}
	}
	e := a.m[key]
	if e == nil {
		e = &asked{}
		a.m[key] = e
	}
	e.waiting++
	e.last = time.Now()
	return func() {
		a.mu.Lock()
		defer a.mu.Unlock()
		if e.waiting > 0 {
			e.waiting--
		}
		e.last = time.Now()
	}
}

// idleFor is how long nobody has waited on or asked for the pull of key: 0
// while someone waits. recorded is false once the pull has ended (forget).
func (a *askers) idleFor(key string, now time.Time) (idle time.Duration, recorded bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	e := a.m[key]
	if e == nil {
		return 0, false
	}
	if e.waiting > 0 {
		return 0, true
	}
	return now.Sub(e.last), true
}

// forget drops the record of the pull of key, when the pull ends.
func (a *askers) forget(key string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.m, key)
	if len(a.m) == 0 {
		a.m = nil // maps do not shrink: drop a burst's table
	}
}

// watchAbandon calls cancel(errAbandoned) once the pull of key has gone
// unasked for after (checked with timers, no goroutine). The watch ends
// when stop is called, when cancel is, or once the pull has ended; cancel
// may call stop.
func (a *askers) watchAbandon(key string, after time.Duration, cancel func(error)) (stop func()) {
	var mu sync.Mutex
	stopped := false
	var t *time.Timer
	var check func()
	check = func() {
		idle, recorded := a.idleFor(key, time.Now())
		mu.Lock()
		if stopped || !recorded {
			stopped = true
			mu.Unlock()
			return
		}
		if idle >= after {
			stopped = true
			mu.Unlock()
			cancel(errAbandoned)
			return
		}
		t = time.AfterFunc(after-idle, check)
		mu.Unlock()
	}
	mu.Lock()
	t = time.AfterFunc(after, check)
	mu.Unlock()
	return func() {
		mu.Lock()
		defer mu.Unlock()
		stopped = true
		t.Stop()
	}
}
