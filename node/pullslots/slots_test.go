package pullslots

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func mustAcquire(t *testing.T, s *Slots, key string) func() {
	t.Helper()
	rel, err := s.Acquire(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	return rel
}

// acquireAsync asks for a slot in a goroutine and sends its release (or
// nil on error) once it has one.
func acquireAsync(ctx context.Context, s *Slots, key string) <-chan func() {
	ch := make(chan func(), 1)
	go func() {
		rel, err := s.Acquire(ctx, key)
		if err != nil {
			rel = nil
		}
		ch <- rel
	}()
	return ch
}

func waitCounts(t *testing.T, s *Slots, running, waiting int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		r, w := s.Counts()
		if r == running && w == waiting {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("counts are %d running, %d waiting; want %d, %d", r, w, running, waiting)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestLimitAndOrder(t *testing.T) {
	s := New(2)
	r1 := mustAcquire(t, s, "a")
	r2 := mustAcquire(t, s, "b")
	if !s.WillWait("c") {
		t.Error("with both slots taken, a new key must wait")
	}
	if s.WillWait("a") {
		t.Error("a key whose download runs does not wait: its publishes join it")
	}
	third := acquireAsync(context.Background(), s, "c")
	waitCounts(t, s, 2, 1)
	fourth := acquireAsync(context.Background(), s, "d")
	waitCounts(t, s, 2, 2)
	if !s.WillWait("c") || !s.WillWait("d") {
		t.Error("keys that wait must say so")
	}
	r1()
	r1() // a second release is a no-op
	var r3 func()
	select {
	case r3 = <-third:
	case <-fourth:
		t.Fatal("the fourth download got the slot before the third: not first come, first served")
	case <-time.After(10 * time.Second):
		t.Fatal("a released slot was not handed on")
	}
	waitCounts(t, s, 2, 1)
	r2()
	r4 := <-fourth
	waitCounts(t, s, 2, 0)
	r3()
	r4()
	waitCounts(t, s, 0, 0)
	if s.WillWait("e") {
		t.Error("with free slots and nobody waiting, a download does not wait")
	}
}

func TestWaitEndsWithContext(t *testing.T) {
	s := New(1)
	rel := mustAcquire(t, s, "a")
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan error, 1)
	go func() {
		_, err := s.Acquire(ctx, "b")
		ch <- err
	}()
	waitCounts(t, s, 1, 1)
	cancel()
	if err := <-ch; !errors.Is(err, context.Canceled) {
		t.Fatalf("Acquire after cancel: %v, want context.Canceled", err)
	}
	waitCounts(t, s, 1, 0)
	rel()
	mustAcquire(t, s, "c")()
	waitCounts(t, s, 0, 0)
}

func TestSetLimit(t *testing.T) {
	s := New(0)
	if s.Limit() != DefaultLimit {
		t.Fatalf("New(0) has %d slots, want the default %d", s.Limit(), DefaultLimit)
	}
	s.SetLimit(1)
	old := mustAcquire(t, s, "a")
	if !s.WillWait("b") {
		t.Fatal("limit 1 with one running: a new key must wait")
	}
	waiter := acquireAsync(context.Background(), s, "b")
	waitCounts(t, s, 1, 1)
	// A raised limit starts the download waiting at once, and has room
	// for one more.
	s.SetLimit(3)
	var rb func()
	select {
	case rb = <-waiter:
	case <-time.After(10 * time.Second):
		t.Fatal("raising the limit did not start the waiting download")
	}
	rc := mustAcquire(t, s, "c")
	waitCounts(t, s, 3, 0)
	if !s.WillWait("x") {
		t.Error("three running under a limit of three: a new key must wait")
	}
	// Lowered below what runs: the running keep their slots, and the next
	// starts only once fewer than the new limit run.
	s.SetLimit(1)
	x := acquireAsync(context.Background(), s, "x")
	waitCounts(t, s, 3, 1)
	old()
	rb()
	waitCounts(t, s, 1, 1)
	rc()
	select {
	case rx := <-x:
		rx()
	case <-time.After(10 * time.Second):
		t.Fatal("the download waiting under the lowered limit never started")
	}
	waitCounts(t, s, 0, 0)
}

// TestWaitHoldsNoGoroutine: downloads waiting in the queue are records, not
// goroutines; each starts on a goroutine of its own when a slot frees, in
// order, and one taken out of the queue never starts.
func TestWaitHoldsNoGoroutine(t *testing.T) {
	s := New(1)
	rel := mustAcquire(t, s, "first")
	const n = 1000
	before := runtime.NumGoroutine()
	started := make(chan int, n)
	cancels := make([]func() bool, n)
	for i := range n {
		cancels[i] = s.Wait(fmt.Sprint("k", i), func(release func()) {
			started <- i
			release()
		})
	}
	waitCounts(t, s, 1, n)
	if g := runtime.NumGoroutine() - before; g > 10 {
		t.Errorf("%d downloads waiting made %d goroutines", n, g)
	}
	// Every odd one leaves the queue.
	for i := 1; i < n; i += 2 {
		if !cancels[i]() {
			t.Fatalf("waiter %d was not in the queue", i)
		}
		if cancels[i]() {
			t.Fatalf("waiter %d left the queue twice", i)
		}
	}
	waitCounts(t, s, 1, n/2)
	rel()
	for want := 0; want < n; want += 2 {
		select {
		case got := <-started:
			if got != want {
				t.Fatalf("download %d started, want %d: first come, first served", got, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("download %d never started", want)
		}
	}
	waitCounts(t, s, 0, 0)
	if cancels[0]() {
		t.Error("cancel of a download that started reported it left the queue")
	}
	select {
	case i := <-started:
		t.Errorf("download %d started after it left the queue", i)
	case <-time.After(50 * time.Millisecond):
	}
}

func TestCollector(t *testing.T) {
	s := New(1)
	rel := mustAcquire(t, s, "a")
	ch := acquireAsync(context.Background(), s, "b")
	waitCounts(t, s, 1, 1)
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(s.Collector()); err != nil {
		t.Fatal(err)
	}
	want := `
# HELP wasmcsi_pull_slots Pull slots: limits.maxConcurrentPulls.
# TYPE wasmcsi_pull_slots gauge
wasmcsi_pull_slots 1
# HELP wasmcsi_pulls_in_flight Module downloads holding a pull slot.
# TYPE wasmcsi_pulls_in_flight gauge
wasmcsi_pulls_in_flight 1
# HELP wasmcsi_pulls_waiting Module downloads waiting for a pull slot (limits.maxConcurrentPulls).
# TYPE wasmcsi_pulls_waiting gauge
wasmcsi_pulls_waiting 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	rel()
	(<-ch)()
}

func TestOnIdle(t *testing.T) {
	s := New(2)
	calls := make(chan struct{}, 10)
	s.OnIdle(20*time.Millisecond, func() { calls <- struct{}{} })
	select {
	case <-calls:
		t.Fatal("OnIdle ran before any download")
	case <-time.After(100 * time.Millisecond):
	}
	r1 := mustAcquire(t, s, "a")
	r2 := mustAcquire(t, s, "b")
	r1()
	select {
	case <-calls:
		t.Fatal("OnIdle ran while a download was running")
	case <-time.After(100 * time.Millisecond):
	}
	r2()
	select {
	case <-calls:
	case <-time.After(10 * time.Second):
		t.Fatal("OnIdle did not run after the last download")
	}
	// A download that starts within the delay cancels the call.
	r3 := mustAcquire(t, s, "c")
	r3()
	r4 := mustAcquire(t, s, "d")
	select {
	case <-calls:
		t.Fatal("OnIdle ran although a download started within the delay")
	case <-time.After(100 * time.Millisecond):
	}
	r4()
	select {
	case <-calls:
	case <-time.After(10 * time.Second):
		t.Fatal("OnIdle did not run after the burst")
	}
	select {
	case <-calls:
		t.Fatal("OnIdle ran twice for one idle period")
	case <-time.After(100 * time.Millisecond):
	}
}

// TestResolveSlots: ResolvesPerSlot manifest requests per download slot at
// once, first come first served, bounded apart from the downloads (a
// manifest check never waits behind one), resized with the limit, and the
// slots are not idle while one runs.
func TestResolveSlots(t *testing.T) {
	s := New(1)
	calls := make(chan struct{}, 4)
	s.OnIdle(20*time.Millisecond, func() { calls <- struct{}{} })
	// Every download slot taken and one waiting: resolves still run.
	r := mustAcquire(t, s, "a")
	waiter := acquireAsync(context.Background(), s, "b")
	waitCounts(t, s, 1, 1)
	var held []func()
	for range ResolvesPerSlot {
		rel, err := s.Resolve(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, rel)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := s.Resolve(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("resolve past %d per slot: %v; want it to wait until its context ends", ResolvesPerSlot, err)
	}
	next := make(chan func(), 1)
	go func() {
		rel, err := s.Resolve(context.Background())
		if err != nil {
			rel = nil
		}
		next <- rel
	}()
	held[0]()
	held[0]() // a second release is a no-op
	var rel func()
	select {
	case rel = <-next:
	case <-time.After(10 * time.Second):
		t.Fatal("a released resolve slot was not handed on")
	}
	r()
	(<-waiter)()
	select {
	case <-calls:
		t.Fatal("OnIdle ran while manifest requests were running")
	case <-time.After(100 * time.Millisecond):
	}
	rel()
	for _, h := range held[1:] {
		h()
	}
	select {
	case <-calls:
	case <-time.After(10 * time.Second):
		t.Fatal("OnIdle did not run after the last manifest request")
	}
	// A larger limit gives more resolve slots.
	s.SetLimit(2)
	ctx2, cancel2 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel2()
	for range 2 * ResolvesPerSlot {
		if _, err := s.Resolve(ctx2); err != nil {
			t.Fatalf("with 2 slots, %d resolves: %v", 2*ResolvesPerSlot, err)
		}
	}
}

// TestPoke: work without a download (publishes served from the store after
// a burst) restarts the idle delay too, but never while a download runs.
func TestPoke(t *testing.T) {
	s := New(1)
	calls := make(chan struct{}, 4)
	s.OnIdle(50*time.Millisecond, func() { calls <- struct{}{} })
	r := mustAcquire(t, s, "a")
	s.Poke()
	select {
	case <-calls:
		t.Fatal("OnIdle ran after a Poke while a download was running")
	case <-time.After(200 * time.Millisecond):
	}
	r()
	select {
	case <-calls:
	case <-time.After(10 * time.Second):
		t.Fatal("OnIdle did not run after the download")
	}
	s.Poke()
	select {
	case <-calls:
	case <-time.After(10 * time.Second):
		t.Fatal("OnIdle did not run after a Poke with no download")
	}
	select {
	case <-calls:
		t.Fatal("OnIdle ran twice for one Poke")
	case <-time.After(200 * time.Millisecond):
	}
}
