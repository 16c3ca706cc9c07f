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
// Who waits on a pull and when one last asked are counted on the pull
// itself (pullCall, inflight.go), in the step that joins it.

// DefaultAbandonAfter is how long a queued pull stays without being asked for.
const DefaultAbandonAfter = 3 * time.Minute

// errAbandoned is the cause of a wait for a pull slot ended by abandonment.
var errAbandoned = errors.New("no publish asked for the pull")

// watchAbandon calls cancel(errAbandoned) once idle (how long nobody has
// waited on or asked for the pull; ended once the pull has ended) reaches
// after, checked with timers, no goroutine. The watch ends when stop is
// called, when cancel is, or once the pull has ended; cancel may call stop.
func watchAbandon(idle func(now time.Time) (d time.Duration, ended bool), after time.Duration, cancel func(error)) (stop func()) {
	var mu sync.Mutex
	stopped := false
	var t *time.Timer
	var check func()
	check = func() {
		d, ended := idle(time.Now())
		mu.Lock()
		if stopped || ended {
			stopped = true
			mu.Unlock()
			return
		}
		if d >= after {
			stopped = true
			mu.Unlock()
			cancel(errAbandoned)
			return
		}
		t = time.AfterFunc(after-d, check)
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
