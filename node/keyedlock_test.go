package node

import (
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func (k *keyedLock) size() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.locks)
}

func (k *keyedLock) refs(key string) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	if e := k.locks[key]; e != nil {
		return e.refs
	}
	return 0
}

func TestKeyedLockMutualExclusion(t *testing.T) {
	k := newKeyedLock()
	const (
		keys       = 4
		goroutines = 16
		rounds     = 200
	)
	// counters are plain ints: the race detector sees any overlap, and the
	// inside flags catch it without -race.
	var counters [keys]int
	var inside [keys]atomic.Int32
	var overlaps atomic.Int32
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range rounds {
				i := (g + r) % keys
				unlock := k.Lock("volume-" + strconv.Itoa(i))
				if inside[i].Add(1) != 1 {
					overlaps.Add(1)
				}
				c := counters[i]
				if r%16 == 0 {
					time.Sleep(10 * time.Microsecond) // widen the window
				}
				counters[i] = c + 1
				inside[i].Add(-1)
				unlock()
			}
		}()
	}
	wg.Wait()
	if n := overlaps.Load(); n != 0 {
		t.Errorf("%d times two holders of one key overlapped", n)
	}
	total := 0
	for _, c := range counters {
		total += c
	}
	if total != goroutines*rounds {
		t.Errorf("counted %d increments, want %d: updates were lost", total, goroutines*rounds)
	}
	if n := k.size(); n != 0 {
		t.Errorf("%d keys left in the map after every unlock", n)
	}
}

func TestKeyedLockBlocksSameKey(t *testing.T) {
	k := newKeyedLock()
	unlock := k.Lock("a")
	got := make(chan func())
	go func() { got <- k.Lock("a") }()
	// The waiter registers itself, then blocks.
	deadline := time.Now().Add(5 * time.Second)
	for k.refs("a") != 2 {
		if time.Now().After(deadline) {
			t.Fatalf("refs of a = %d, want 2 with a holder and a waiter", k.refs("a"))
		}
		time.Sleep(time.Millisecond)
	}
	select {
	case <-got:
		t.Fatal("a second Lock of a held key returned")
	case <-time.After(20 * time.Millisecond):
	}
	unlock()
	var unlock2 func()
	select {
	case unlock2 = <-got:
	case <-time.After(5 * time.Second):
		t.Fatal("the waiter did not get the key after Unlock")
	}
	if n := k.refs("a"); n != 1 || k.size() != 1 {
		t.Errorf("refs %d, size %d with one holder; want 1, 1", n, k.size())
	}
	unlock2()
	if k.size() != 0 {
		t.Errorf("%d keys left after the last unlock", k.size())
	}
}

func TestKeyedLockIndependentKeys(t *testing.T) {
	k := newKeyedLock()
	unlockA := k.Lock("a")
	defer unlockA()
	done := make(chan struct{})
	go func() {
		for i := range 100 {
			k.Lock("b-" + strconv.Itoa(i))()
		}
		unlock := k.Lock("b")
		if n := k.size(); n != 2 {
			t.Errorf("size %d with a and b held, want 2", n)
		}
		unlock()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("locking other keys blocked while a was held")
	}
	if n := k.size(); n != 1 || k.refs("a") != 1 {
		t.Errorf("size %d, refs of a %d; want only a, once", n, k.refs("a"))
	}
}

func TestKeyedLockReuseAfterFree(t *testing.T) {
	// A key freed and locked again gets a fresh entry that still excludes.
	k := newKeyedLock()
	for range 3 {
		u := k.Lock("x")
		if k.size() != 1 || k.refs("x") != 1 {
			t.Fatalf("size %d refs %d", k.size(), k.refs("x"))
		}
		u()
		if k.size() != 0 {
			t.Fatalf("size %d after unlock", k.size())
		}
	}
}
