package node

import (
	"context"
	"sync"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/wasm-csi/wasm-csi/node/config"
	"github.com/wasm-csi/wasm-csi/node/progress"
	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

func (e *countingEvents) progressOf() []progressEvent {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]progressEvent(nil), e.progress...)
}

// waitProgress waits until n progress events were recorded.
func (e *countingEvents) waitProgress(t *testing.T, n int) []progressEvent {
	t.Helper()
	var got []progressEvent
	e.waitFor(t, n, "progress events", func() int {
		got = e.progressOf()
		return len(got)
	})
	return got
}

// progressClock makes the service report progress under p, paced by a
// fake clock, which it returns.
func (e *unitEnv) progressClock(p progress.Policy) *clocktesting.FakeClock {
	clk := clocktesting.NewFakeClock(time.Now())
	e.svc.cfg.Clock = clk
	e.svc.cfg.Progress = p
	return clk
}

// holdHalfway makes each download send on r.halfway once it is halfway,
// then wait there until r.resume is closed.
func (r *fakeRegistry) holdHalfway() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.halfway, r.resume = make(chan struct{}, 1), make(chan struct{})
}

func waitTimer(t *testing.T, clk *clocktesting.FakeClock) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !clk.HasWaiters() {
		if time.Now().After(deadline) {
			t.Fatal("no progress report scheduled")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestPullProgress: while a download is held halfway, the store lists it
// in flight and each pod waiting on it (two, sharing one pull) hears its
// bytes so far after the interval; once it ends, nothing more is sent and
// the store lists nothing.
func TestPullProgress(t *testing.T) {
	e := newUnitEnv(t, config.FileConfig{})
	clk := e.progressClock(progress.Policy{MinSize: 100, Interval: 10 * time.Second})
	img := e.reg.add("acme/big", "")
	e.reg.holdHalfway()
	total := int64(len(img.body))
	if total < 100 {
		t.Fatalf("module of %d bytes is under the test's threshold", total)
	}

	reqs := []PublishRequest{
		e.request(t, "vol-a", "reg.example/acme/big:1", "pod-a", PullIfNotPresent),
		e.request(t, "vol-b", "reg.example/acme/big:1", "pod-b", PullIfNotPresent),
	}
	errs := make(chan error, len(reqs))
	var wg sync.WaitGroup
	for _, req := range reqs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- e.svc.Publish(context.Background(), req)
		}()
	}
	e.events.waitPulling(t, len(reqs))
	<-e.reg.halfway

	pulls, err := e.svc.store.Pulls()
	if err != nil {
		t.Fatal(err)
	}
	if len(pulls) != 1 || pulls[0].Image != "reg.example/acme/big:1" || pulls[0].Total != total || pulls[0].Manifest != img.manifest {
		t.Fatalf("pulls in flight %+v, want one of %s, %d bytes", pulls, "reg.example/acme/big:1", total)
	}

	waitTimer(t, clk)
	if got := e.events.progressOf(); len(got) != 0 {
		t.Fatalf("progress %v before the interval", got)
	}
	clk.Step(10 * time.Second)
	got := e.events.waitProgress(t, 2)
	pods := map[string]bool{}
	for _, p := range got {
		pods[p.pod] = true
		if p.done != total/2 || p.total != total {
			t.Errorf("progress %+v, want %d of %d", p, total/2, total)
		}
	}
	if !pods["pod-a"] || !pods["pod-b"] {
		t.Errorf("progress went to %v, want pod-a and pod-b", pods)
	}

	close(e.reg.resume)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("publish: %v", err)
		}
	}
	if clk.HasWaiters() {
		t.Error("a progress report is still scheduled after the pull")
	}
	clk.Step(time.Hour)
	if got := e.events.progressOf(); len(got) != 2 {
		t.Errorf("%d progress events, want the 2 sent while it was held", len(got))
	}
	if pulls, err := e.svc.store.Pulls(); err != nil || len(pulls) != 0 {
		t.Errorf("pulls in flight after the pull: %+v, %v", pulls, err)
	}
	for _, req := range reqs {
		e.published(t, req, img.body)
	}
	if n := e.reg.pullCount(); n != 1 {
		t.Errorf("%d downloads, want 1", n)
	}
}

// TestSmallPullNoProgress: a module under the threshold sends no progress.
func TestSmallPullNoProgress(t *testing.T) {
	e := newUnitEnv(t, config.FileConfig{})
	img := e.reg.add("acme/small", "")
	clk := e.progressClock(progress.Policy{MinSize: int64(len(img.body)) + 1, Interval: time.Second})
	e.reg.holdHalfway()
	req := e.request(t, "vol-s", "reg.example/acme/small:1", "pod-s", PullIfNotPresent)
	errc := make(chan error, 1)
	go func() { errc <- e.svc.Publish(context.Background(), req) }()
	<-e.reg.halfway
	if clk.HasWaiters() {
		t.Error("a progress report is scheduled for a module under the threshold")
	}
	close(e.reg.resume)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	clk.Step(time.Hour)
	if got := e.events.progressOf(); len(got) != 0 {
		t.Errorf("progress %v for a module under the threshold", got)
	}
}

// TestPrivatePullProgress: a pull made with a pod's pull secret reports
// its progress to that pod only; a pod without credentials that joined it
// learns nothing of the module (and is refused after the pull).
func TestPrivatePullProgress(t *testing.T) {
	e := newUnitEnv(t, config.FileConfig{})
	clk := e.progressClock(progress.Policy{MinSize: 1, Interval: 10 * time.Second})
	e.reg.add("acme/private", "alice")
	e.creds.keyrings["pod-owner"] = []*puller.Keyring{secret(t, "regcred", "reg.example", "alice")}
	e.reg.holdHalfway()

	owner := e.request(t, "vol-owner", "reg.example/acme/private:1", "pod-owner", PullIfNotPresent)
	thief := e.request(t, "vol-thief", "reg.example/acme/private:1", "pod-thief", PullIfNotPresent)
	ownerErr, thiefErr := make(chan error, 1), make(chan error, 1)
	go func() { ownerErr <- e.svc.Publish(context.Background(), owner) }()
	<-e.reg.halfway // the owner's pull, with its secret
	go func() { thiefErr <- e.svc.Publish(context.Background(), thief) }()
	e.events.waitPulling(t, 2)

	waitTimer(t, clk)
	clk.Step(10 * time.Second)
	got := e.events.waitProgress(t, 1)
	close(e.reg.resume)
	if err := <-ownerErr; err != nil {
		t.Fatalf("owner: %v", err)
	}
	if err := <-thiefErr; !isKind(err, errdefs.ErrUnauthorized) {
		t.Errorf("pod without credentials: %v, want Unauthorized", err)
	}
	got = e.events.progressOf()
	if len(got) != 1 || got[0].pod != "pod-owner" {
		t.Errorf("progress events %+v, want one, to pod-owner", got)
	}
}
