package progress

import (
	"sync"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"
)

func TestWait(t *testing.T) {
	p := Policy{Interval: 10 * time.Second}
	want := []time.Duration{10 * time.Second, 10 * time.Second, 10 * time.Second, 20 * time.Second, 40 * time.Second,
		80 * time.Second, 160 * time.Second, 5 * time.Minute, 5 * time.Minute}
	for n, w := range want {
		if got := p.Wait(n); got != w {
			t.Errorf("Wait(%d) = %s, want %s", n, got, w)
		}
	}
	// Within 10 minutes, fewer reports than client-go's burst of 25 events
	// per pod leaves room for the rest of the pod's events.
	var elapsed time.Duration
	n := 0
	for ; elapsed+p.Wait(n) <= 10*time.Minute; n++ {
		elapsed += p.Wait(n)
	}
	if n > 10 {
		t.Errorf("%d reports in 10 minutes", n)
	}
	if got := (Policy{Interval: time.Second, MaxInterval: 3 * time.Second}).Wait(10); got != 3*time.Second {
		t.Errorf("MaxInterval 3s: Wait(10) = %s", got)
	}
}

type report struct{ done, total int64 }

type recorder struct {
	mu  sync.Mutex
	got []report
	ch  chan struct{}
}

func newRecorder() *recorder { return &recorder{ch: make(chan struct{}, 100)} }

func (r *recorder) report(done, total int64) {
	r.mu.Lock()
	r.got = append(r.got, report{done, total})
	r.mu.Unlock()
	r.ch <- struct{}{}
}

func (r *recorder) reports() []report {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]report(nil), r.got...)
}

// waitTimer waits until the download's goroutine waits on the fake clock.
func waitTimer(t *testing.T, clk *clocktesting.FakeClock) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !clk.HasWaiters() {
		if time.Now().After(deadline) {
			t.Fatal("no report scheduled")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestReportsOnSchedule: no report before the first wait ends, one per
// wait after it with the bytes counted so far, none after Stop.
func TestReportsOnSchedule(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	rec := newRecorder()
	d := Start(clk, 100, Policy{MinSize: 100, Interval: 10 * time.Second}, rec.report)
	d.Add(30)
	waitTimer(t, clk)
	clk.Step(9 * time.Second)
	if got := rec.reports(); len(got) != 0 {
		t.Fatalf("reported %v before the first interval", got)
	}
	clk.Step(time.Second)
	<-rec.ch
	d.Add(20)
	for range SteadyReports - 1 {
		waitTimer(t, clk)
		clk.Step(10 * time.Second)
		<-rec.ch
	}
	// The fourth report waits twice as long.
	waitTimer(t, clk)
	clk.Step(10 * time.Second)
	if got := rec.reports(); len(got) != SteadyReports {
		t.Fatalf("%d reports, want %d before the doubled wait ends", len(got), SteadyReports)
	}
	clk.Step(10 * time.Second)
	<-rec.ch
	d.Stop()
	d.Stop()
	clk.Step(time.Hour)
	got := rec.reports()
	want := []report{{30, 100}, {50, 100}, {50, 100}, {50, 100}}
	if len(got) != len(want) {
		t.Fatalf("reports %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("report %d = %v, want %v", i, got[i], want[i])
		}
	}
	if d.Done() != 50 {
		t.Errorf("Done() = %d", d.Done())
	}
}

// TestSmallDownloadsAreNotReported: under MinSize, or with no interval,
// nothing is scheduled; bytes are still counted.
func TestSmallDownloadsAreNotReported(t *testing.T) {
	for _, p := range []Policy{{MinSize: 101, Interval: time.Second}, {MinSize: 0, Interval: 0}} {
		clk := clocktesting.NewFakeClock(time.Now())
		rec := newRecorder()
		d := Start(clk, 100, p, rec.report)
		d.Add(100)
		if clk.HasWaiters() {
			t.Errorf("policy %+v: a report is scheduled for a 100-byte download", p)
		}
		clk.Step(time.Hour)
		d.Stop()
		if got := rec.reports(); len(got) != 0 {
			t.Errorf("policy %+v: reported %v", p, got)
		}
		if d.Done() != 100 {
			t.Errorf("Done() = %d", d.Done())
		}
	}
}
