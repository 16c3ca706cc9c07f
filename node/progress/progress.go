// Package progress paces the reports of a long download: how many of its
// bytes arrived, of how many, at a bounded rate, so that a person watching
// a pod's events (or the driver's log) sees a large module's pull move
// instead of a silent wait.
//
// It owns: counting a download's bytes and the schedule of its reports.
// It must not: know where reports go (the caller's function sends them)
// or touch the store or the network.
package progress

import (
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/utils/clock"
)

// Policy says which downloads are reported and how often.
type Policy struct {
	// MinSize: a download of fewer bytes is never reported (0: every one).
	MinSize int64
	// Interval is the wait before the first report and between the first
	// few; 0 turns reports off.
	Interval time.Duration
	// MaxInterval caps the wait between reports, which doubles after the
	// first SteadyReports (default DefaultMaxInterval). Reports go to pod
	// events, and client-go's event recorder lets a source send 25 events
	// of one type about a pod, then one every 5 minutes: a pull that
	// reported every 10 s for as long as it lasts would use them up, and
	// its Pulled event would be dropped.
	MaxInterval time.Duration
}

const (
	// DefaultMinSize and DefaultInterval are the daemon's defaults.
	DefaultMinSize  = 16 << 20
	DefaultInterval = 10 * time.Second
	// DefaultMaxInterval is client-go's event refill period.
	DefaultMaxInterval = 5 * time.Minute
	// SteadyReports are sent Interval apart before the waits double.
	SteadyReports = 3
)

// Wait is the wait before report n (0 is the first).
func (p Policy) Wait(n int) time.Duration {
	maxWait := p.MaxInterval
	if maxWait <= 0 {
		maxWait = DefaultMaxInterval
	}
	d := p.Interval
	for i := SteadyReports; i <= n && d < maxWait; i++ {
		d *= 2
	}
	return min(d, maxWait)
}

// Download counts one download's bytes and reports them on schedule until
// Stop. Add is safe to call from any goroutine.
type Download struct {
	done  atomic.Int64
	total int64
	stop  chan struct{}
	once  sync.Once
	wg    sync.WaitGroup
}

// Start begins counting a download of total bytes. If it is reported
// (total at least p.MinSize and p.Interval set), report is called from a
// goroutine of its own with the bytes so far, after each wait of the
// policy's schedule, until Stop.
func Start(clk clock.Clock, total int64, p Policy, report func(done, total int64)) *Download {
	d := &Download{total: total, stop: make(chan struct{})}
	if p.Interval <= 0 || total < p.MinSize || report == nil {
		return d
	}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		for n := 0; ; n++ {
			t := clk.NewTimer(p.Wait(n))
			select {
			case <-d.stop:
				t.Stop()
				return
			case <-t.C():
			}
			report(d.done.Load(), d.total)
		}
	}()
	return d
}

// Add counts n more bytes.
func (d *Download) Add(n int64) { d.done.Add(n) }

// Done is the bytes counted so far.
func (d *Download) Done() int64 { return d.done.Load() }

// Stop ends the reports; none is sent once it returns. It is safe to call
// more than once.
func (d *Download) Stop() {
	d.once.Do(func() { close(d.stop) })
	d.wg.Wait()
}
