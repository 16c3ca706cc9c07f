package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/wasm-csi/wasm-csi/node/config"
	"github.com/wasm-csi/wasm-csi/node/pullslots"
	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/errdefs"
)

// Unit tests of the publish path, in-process and without root: a real
// store in a temp dir, the fakes of fakes_test.go for the registry, the
// mounts and the API.

// TestPublishConcurrentJoinOnePull: 20 publishes of one image at once, each
// for its own volume, share one download.
func TestPublishConcurrentJoinOnePull(t *testing.T) {
	e := newUnitEnv(t, config.FileConfig{})
	img := e.reg.add("acme/filter", "")
	e.reg.release = make(chan struct{})
	const n = 20
	errs := make(chan error, n)
	reqs := make([]PublishRequest, n)
	var wg sync.WaitGroup
	for i := range n {
		reqs[i] = e.request(t, fmt.Sprintf("vol-%d", i), "reg.example/acme/filter:1", fmt.Sprintf("pod-%d", i), PullAlways)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- e.svc.Publish(context.Background(), reqs[i])
		}()
	}
	// Hold the download until every publish has asked for the pull.
	e.events.waitPulling(t, n)
	close(e.reg.release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Errorf("publish: %v", err)
		}
	}
	if got := e.reg.pullCount(); got != 1 {
		t.Errorf("%d downloads for %d concurrent publishes, want 1", got, n)
	}
	var module string
	for _, req := range reqs {
		d := e.published(t, req, img.body)
		if module == "" {
			module = string(d)
		} else if string(d) != module {
			t.Errorf("volume %s has module %s, another %s", req.VolumeID, d, module)
		}
	}
	if got := e.svc.uses.Count(e.published(t, reqs[0], img.body)); got != n {
		t.Errorf("module counted %d uses, want %d", got, n)
	}
}

// TestPullOutlivesItsCaller: a publish whose caller gives up returns
// ErrPullPending while its pull goes on; the retry joins that pull and
// gets its module, downloaded once.
func TestPullOutlivesItsCaller(t *testing.T) {
	e := newUnitEnv(t, config.FileConfig{})
	img := e.reg.add("acme/slow", "")
	e.reg.pulling = make(chan struct{}, 1)
	e.reg.release = make(chan struct{})
	req := e.request(t, "vol-1", "reg.example/acme/slow:1", "pod", PullIfNotPresent)

	ctx, cancel := context.WithCancel(context.Background())
	first := make(chan error, 1)
	go func() { first <- e.svc.Publish(ctx, req) }()
	<-e.reg.pulling // the download has started
	cancel()
	err := <-first
	if !isKind(err, errdefs.ErrPullPending) {
		t.Fatalf("publish whose caller gave up: %v, want ErrPullPending", err)
	}
	if _, ok, _ := e.svc.store.GetVolume(req.VolumeID, req.TargetPath); ok {
		t.Error("a publish that returned an error left a volume record")
	}

	retry := make(chan error, 1)
	go func() { retry <- e.svc.Publish(context.Background(), req) }()
	e.events.waitPulling(t, 2) // the retry has reached the pull
	close(e.reg.release)
	if err := <-retry; err != nil {
		t.Fatalf("retry: %v", err)
	}
	e.published(t, req, img.body)
	if got := e.reg.pullCount(); got != 1 {
		t.Errorf("%d downloads, want the first pull's only", got)
	}
}

// TestAccessCheckForAnotherPodsSecret: a module pulled with pod A's secret
// is served to pod B only if B's own credentials get the manifest from the
// registry; nothing is downloaded again either way.
func TestAccessCheckForAnotherPodsSecret(t *testing.T) {
	e := newUnitEnv(t, config.FileConfig{})
	img := e.reg.add("acme/private", "alice")
	e.creds.keyrings["a"] = []*puller.Keyring{secret(t, "alice", "reg.example", "alice")}
	e.creds.keyrings["b"] = []*puller.Keyring{secret(t, "bob", "reg.example", "bob")}
	e.creds.keyrings["c"] = []*puller.Keyring{secret(t, "alice2", "reg.example", "alice")}
	const image = "reg.example/acme/private:1"

	if err := e.svc.Publish(context.Background(), e.request(t, "vol-a", image, "a", PullIfNotPresent)); err != nil {
		t.Fatalf("pod a (the secret the registry accepts): %v", err)
	}
	rec, ok := e.svc.store.GetRef(mustRef(t, image).String())
	if !ok || !rec.Private {
		t.Fatalf("tag record after a pull with a pod secret: %+v (found %v), want Private", rec, ok)
	}
	before := len(e.reg.resolveHosts())

	for _, pod := range []string{"b", "nobody"} {
		req := e.request(t, "vol-"+pod, image, pod, PullIfNotPresent)
		err := e.svc.Publish(context.Background(), req)
		if !isKind(err, errdefs.ErrUnauthorized) || !strings.Contains(err.Error(), "another pod's pull secret") {
			t.Errorf("pod %s (no accepted secret): %v, want ErrUnauthorized naming another pod's secret", pod, err)
		}
		if e.mnt.source(req.TargetPath) != "" {
			t.Errorf("pod %s got a mount", pod)
		}
	}
	// Never too: the module is on the node, the pod must still show access.
	if err := e.svc.Publish(context.Background(), e.request(t, "vol-never", image, "b", PullNever)); !isKind(err, errdefs.ErrUnauthorized) {
		t.Errorf("pod b with pullPolicy Never: %v, want ErrUnauthorized", err)
	}
	req := e.request(t, "vol-c", image, "c", PullIfNotPresent)
	if err := e.svc.Publish(context.Background(), req); err != nil {
		t.Fatalf("pod c (another secret the registry accepts): %v", err)
	}
	e.published(t, req, img.body)
	if got := e.reg.pullCount(); got != 1 {
		t.Errorf("%d downloads, want 1", got)
	}
	// Each check asked the registry (by digest), so every pod proved its access.
	if got := len(e.reg.resolveHosts()) - before; got != 4 {
		t.Errorf("%d access checks against the registry, want 4", got)
	}
}

// TestMirrorFallbackOrder: mirrors are tried in the configured order, the
// registry itself last; the first that answers serves the module, which is
// recorded under the image's own registry name.
func TestMirrorFallbackOrder(t *testing.T) {
	e := newUnitEnv(t, config.FileConfig{Registries: config.RegistriesConfig{
		Mirrors: map[string][]string{"reg.example": {"m1.example", "m2.example", "m3.example"}},
	}})
	img := e.reg.add("acme/mirrored", "")
	e.reg.down["m1.example"] = true
	req := e.request(t, "vol-1", "reg.example/acme/mirrored:1", "pod", PullIfNotPresent)
	if err := e.svc.Publish(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	e.published(t, req, img.body)
	if got, want := strings.Join(e.reg.resolveHosts(), " "), "m1.example m2.example"; got != want {
		t.Errorf("sources asked: %s, want %s", got, want)
	}
	if !strings.Contains(e.log.String(), "mirror failed, trying the next source") {
		t.Errorf("the failed mirror is not logged:\n%s", e.log)
	}
	if _, ok := e.svc.store.GetRef("reg.example/acme/mirrored:1"); !ok {
		t.Error("no tag record under the image's own registry")
	}

	// Every source down: all are tried, in order, and the error is the last one's.
	e.reg.resolves = nil
	for _, h := range []string{"m2.example", "m3.example", "reg.example"} {
		e.reg.down[h] = true
	}
	err := e.svc.Publish(context.Background(), e.request(t, "vol-2", "reg.example/acme/other:1", "pod", PullIfNotPresent))
	if !isKind(err, errdefs.ErrUnavailable) || !strings.Contains(err.Error(), "reg.example is down") {
		t.Errorf("every source down: %v, want the registry's own Unavailable", err)
	}
	if got, want := strings.Join(e.reg.resolveHosts(), " "), "m1.example m2.example m3.example reg.example"; got != want {
		t.Errorf("sources asked: %s, want %s", got, want)
	}
}

// TestPublishDamping: an image that failed is not asked for again before
// its damping window ends; publishes in the window get the same error.
func TestPublishDamping(t *testing.T) {
	e := newUnitEnv(t, config.FileConfig{})
	clock := &fakeClock{t: time.Unix(1_000_000, 0)}
	e.svc.damp = newDamper(clock.now)
	const image = "reg.example/acme/missing:1"

	err := e.svc.Publish(context.Background(), e.request(t, "vol-1", image, "pod", PullIfNotPresent))
	if !isKind(err, errdefs.ErrNotFound) {
		t.Fatalf("first publish: %v, want ErrNotFound", err)
	}
	asked := len(e.reg.resolveHosts())
	for i := range 3 {
		clock.advance(100 * time.Millisecond)
		err := e.svc.Publish(context.Background(), e.request(t, fmt.Sprintf("vol-r%d", i), image, "pod", PullIfNotPresent))
		if !isKind(err, errdefs.ErrNotFound) {
			t.Errorf("publish in the damping window: %v, want the last error (ErrNotFound)", err)
		}
	}
	if got := len(e.reg.resolveHosts()); got != asked {
		t.Errorf("the registry was asked %d more times inside the damping window", got-asked)
	}
	// Past the window, the registry is asked again, and now has the image.
	img := e.reg.add("acme/missing", "")
	clock.advance(dampingMax + time.Second)
	req := e.request(t, "vol-later", image, "pod", PullIfNotPresent)
	if err := e.svc.Publish(context.Background(), req); err != nil {
		t.Fatalf("publish after the window: %v", err)
	}
	e.published(t, req, img.body)
}

// TestPublishRollbackOfFailedMount: a mount that fails leaves no record, no
// counted use and no target directory it created; the retry succeeds.
func TestPublishRollbackOfFailedMount(t *testing.T) {
	e := newUnitEnv(t, config.FileConfig{})
	img := e.reg.add("acme/filter", "")
	e.mnt.failBind = errors.New("operation not permitted")
	req := e.request(t, "vol-1", "reg.example/acme/filter:1", "pod", PullIfNotPresent)

	err := e.svc.Publish(context.Background(), req)
	if !isKind(err, errdefs.ErrInternal) || !strings.Contains(err.Error(), "mounting the module at") {
		t.Fatalf("publish with a failing mount: %v, want ErrInternal", err)
	}
	if _, ok, _ := e.svc.store.GetVolume(req.VolumeID, req.TargetPath); ok {
		t.Error("volume record kept after a failed mount")
	}
	rec, ok := e.svc.store.GetRef(mustRef(t, "reg.example/acme/filter:1").String())
	if !ok {
		t.Fatal("the pulled module's tag record is gone")
	}
	if got := e.svc.uses.Count(rec.Module); got != 0 {
		t.Errorf("module counted %d uses after a failed publish, want 0", got)
	}
	if _, err := os.Stat(req.TargetPath); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("target path created by the failed publish is still there: %v", err)
	}

	e.mnt.failBind = nil
	if err := e.svc.Publish(context.Background(), req); err != nil {
		t.Fatalf("retry: %v", err)
	}
	if got := e.svc.uses.Count(e.published(t, req, img.body)); got != 1 {
		t.Errorf("module counted %d uses after the retry, want 1", got)
	}
	if got := e.reg.pullCount(); got != 1 {
		t.Errorf("%d downloads, want 1 (the retry uses the stored module)", got)
	}
}

// TestGCDuringPublish: a collection that runs in the middle of a publish,
// with limits that want every module gone, removes the unused ones but not
// the module being published; once unpublished, that one goes too.
func TestGCDuringPublish(t *testing.T) {
	e := newUnitEnv(t, config.FileConfig{})
	img := e.reg.add("acme/filter", "")
	e.reg.add("acme/unused", "")
	unused := e.request(t, "vol-unused", "reg.example/acme/unused:1", "pod", PullIfNotPresent)
	if err := e.svc.Publish(context.Background(), unused); err != nil {
		t.Fatal(err)
	}
	unusedModule := e.published(t, unused, bodyOf(e, unused))
	if err := e.svc.Unpublish(context.Background(), unused.VolumeID, unused.TargetPath); err != nil {
		t.Fatal(err)
	}

	policy := store.GCPolicy{MaxStoreBytes: 1, MinimumAge: time.Nanosecond}
	later := time.Now().Add(time.Hour)
	var during store.GCResult
	var gcErr error
	e.mnt.onView = func() {
		e.mnt.onView = nil
		during, gcErr = e.svc.store.Collect(e.svc.uses, policy, later, e.svc.log)
	}
	req := e.request(t, "vol-1", "reg.example/acme/filter:1", "pod", PullIfNotPresent)
	if err := e.svc.Publish(context.Background(), req); err != nil {
		t.Fatal(err)
	}
	if gcErr != nil {
		t.Fatal(gcErr)
	}
	module := e.published(t, req, img.body)
	if during.Removed != 1 || during.InUseModules != 1 {
		t.Errorf("collection during the publish: %+v, want the unused module removed and the published one kept", during)
	}
	if e.svc.store.HasBlob(unusedModule) {
		t.Error("the unused module survived the collection")
	}
	if !e.svc.store.HasBlob(module) {
		t.Fatal("the module being published was collected")
	}

	if err := e.svc.Unpublish(context.Background(), req.VolumeID, req.TargetPath); err != nil {
		t.Fatal(err)
	}
	after, err := e.svc.store.Collect(e.svc.uses, policy, later, e.svc.log)
	if err != nil {
		t.Fatal(err)
	}
	if after.Removed != 1 || e.svc.store.HasBlob(module) {
		t.Errorf("collection after the unpublish: %+v, want the module removed", after)
	}
}

// bodyOf is the body the fake registry serves for req's image.
func bodyOf(e *unitEnv, req PublishRequest) []byte {
	e.reg.mu.Lock()
	defer e.reg.mu.Unlock()
	return e.reg.images[req.Image.Repository].body
}

// TestValidationSlotsFollowThePullsContext: a pull waits for a validation
// slot only as long as its own context lives; with a slot free it goes on.
func TestValidationSlotsFollowThePullsContext(t *testing.T) {
	e := newUnitEnv(t, config.FileConfig{})
	img := e.reg.add("acme/filter", "")
	e.svc.cfg.PullTimeout = 50 * time.Millisecond
	e.svc.validate = semaphore.NewWeighted(1)
	if err := e.svc.validate.Acquire(context.Background(), 1); err != nil {
		t.Fatal(err)
	}
	req := e.request(t, "vol-1", "reg.example/acme/filter:1", "pod", PullIfNotPresent)
	err := e.svc.Publish(context.Background(), req)
	if !isKind(err, errdefs.ErrInternal) || !isKind(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "validation slot") {
		t.Fatalf("publish with every validation slot taken past the pull's timeout: %v", err)
	}
	if _, ok := e.svc.store.GetRef(req.Image.String()); ok {
		t.Error("a module that was never validated was recorded")
	}
	e.svc.validate.Release(1)
	e.svc.cfg.PullTimeout = DefaultPullTimeout
	if err := e.svc.Publish(context.Background(), req); err != nil {
		t.Fatalf("publish with a slot free: %v", err)
	}
	e.published(t, req, img.body)
}

// TestManifestRequestsBounded: a burst of publishes of distinct images asks
// the registry for at most pullslots.ResolvesPerSlot manifests per pull
// slot at once, the rest wait their turn; every publish is then served.
func TestManifestRequestsBounded(t *testing.T) {
	e := newUnitEnv(t, config.FileConfig{})
	bound := e.svc.slots.Limit() * pullslots.ResolvesPerSlot
	n := bound + 10
	gate := make(chan struct{})
	e.reg.mu.Lock()
	e.reg.resolveGate = gate
	e.reg.mu.Unlock()
	reqs := e.distinctImages(t, "m", n, PullAlways)
	errs := make(chan error, n)
	for _, req := range reqs {
		go func() { errs <- e.svc.Publish(context.Background(), req) }()
	}
	e.events.waitPulling(t, n)
	waitUntil(func() bool { return e.reg.resolvingNow() >= bound })
	// Give the others the time to (wrongly) reach the registry.
	time.Sleep(100 * time.Millisecond)
	if got := e.reg.resolvingNow(); got != bound {
		t.Errorf("%d manifest requests at once for %d publishes, want %d (%d pull slots x %d)", got, n, bound, e.svc.slots.Limit(), pullslots.ResolvesPerSlot)
	}
	close(gate)
	for range n {
		if err := <-errs; err != nil {
			t.Errorf("publish: %v", err)
		}
	}
	e.publishedAll(t, reqs)
}

// TestQueuedCallersBounded: with every pull slot downloading and
// MaxHeldCallers publishes waiting in their calls for queued pulls, a
// further publish returns ErrPullPending at once instead of holding its
// call (and kubelet's connection); its pull stays queued, and the retry
// joins it: every module is downloaded once.
func TestQueuedCallersBounded(t *testing.T) {
	e := newUnitEnv(t, config.FileConfig{})
	e.reg.release = make(chan struct{})
	slots := e.svc.slots.Limit()
	const extra = 5
	n := MaxHeldCallers + slots + extra
	reqs := e.distinctImages(t, "q", n, PullIfNotPresent)
	type result struct {
		i   int
		err error
	}
	results := make(chan result, n)
	for i, req := range reqs {
		go func() { results <- result{i, e.svc.Publish(context.Background(), req)} }()
	}
	// The downloads are held at the registry: whatever returns now was
	// turned away without waiting for its pull. Callers whose pull was
	// already downloading are always held, so at least `extra` and at most
	// `extra + slots` are turned away.
	var turnedAway []int
	for len(turnedAway) < extra {
		select {
		case r := <-results:
			if !isKind(r.err, errdefs.ErrPullPending) || !strings.Contains(r.err.Error(), "queued") {
				t.Fatalf("publish %d returned while downloads were held: %v, want ErrPullPending saying it is queued", r.i, r.err)
			}
			turnedAway = append(turnedAway, r.i)
		case <-time.After(time.Minute):
			t.Fatalf("%d publishes turned away; want %d past the %d held", len(turnedAway), extra, MaxHeldCallers)
		}
	}
	if held := e.svc.held.Load(); held > int64(MaxHeldCallers+slots) {
		t.Errorf("%d publishes held in their calls, want at most %d + %d downloading", held, MaxHeldCallers, slots)
	}
	close(e.reg.release)
	for range n - extra {
		r := <-results
		if r.err != nil {
			if !isKind(r.err, errdefs.ErrPullPending) {
				t.Fatalf("publish %d: %v", r.i, r.err)
			}
			turnedAway = append(turnedAway, r.i)
		}
	}
	if len(turnedAway) > extra+slots {
		t.Errorf("%d publishes turned away, want at most %d", len(turnedAway), extra+slots)
	}
	for _, i := range turnedAway {
		if err := e.svc.Publish(context.Background(), reqs[i]); err != nil {
			t.Fatalf("retry of publish %d: %v", i, err)
		}
	}
	e.publishedAll(t, reqs)
	if got := e.reg.pullCount(); got != n {
		t.Errorf("%d downloads for %d modules: a retry queued its pull again", got, n)
	}
	if held := e.svc.held.Load(); held != 0 {
		t.Errorf("%d publishes still counted as held", held)
	}
	e.events.mu.Lock()
	defer e.events.mu.Unlock()
	if e.events.failed != 0 {
		t.Errorf("%d Failed events for publishes whose pulls went on", e.events.failed)
	}
}

// TestQueuedPullAbandoned: a queued pull that no publish waits on or asks
// for within abandonAfter leaves the queue without downloading; one whose
// pod asks again within it keeps its place and is downloaded once.
func TestQueuedPullAbandoned(t *testing.T) {
	one := 1
	e := newUnitEnv(t, config.FileConfig{Limits: config.LimitsConfig{MaxConcurrentPulls: &one}})
	e.svc.abandonAfter = 300 * time.Millisecond
	e.reg.pulling = make(chan struct{}, 10)
	e.reg.release = make(chan struct{})
	for _, r := range []string{"acme/first", "acme/gone", "acme/kept"} {
		e.reg.add(r, "")
	}
	first := e.request(t, "vol-first", "reg.example/acme/first:1", "first", PullIfNotPresent)
	firstDone := make(chan error, 1)
	go func() { firstDone <- e.svc.Publish(context.Background(), first) }()
	<-e.reg.pulling // the one slot is taken
	// Two pods ask for queued pulls and give up at once.
	gone := e.request(t, "vol-gone", "reg.example/acme/gone:1", "gone", PullIfNotPresent)
	kept := e.request(t, "vol-kept", "reg.example/acme/kept:1", "kept", PullIfNotPresent)
	for _, req := range []PublishRequest{gone, kept} {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		if err := e.svc.Publish(ctx, req); !isKind(err, errdefs.ErrPullPending) {
			t.Fatalf("publish of %s while its pull is queued: %v, want ErrPullPending", req.Image.Original, err)
		}
		cancel()
	}
	// The kept pod's retries come within abandonAfter; the gone pod's never.
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		err := e.svc.Publish(ctx, kept)
		cancel()
		if !isKind(err, errdefs.ErrPullPending) {
			t.Fatalf("retry of the kept pod: %v, want ErrPullPending while the slot is held", err)
		}
		if _, waiting := e.svc.slots.Counts(); waiting == 1 {
			break // the gone pod's pull left the queue
		}
		if time.Now().After(deadline) {
			t.Fatal("the pull nobody asked for stayed queued")
		}
	}
	if _, waiting := e.svc.slots.Counts(); waiting != 1 {
		t.Errorf("%d pulls waiting, want the kept pod's only (not queued twice)", waiting)
	}
	close(e.reg.release)
	if err := <-firstDone; err != nil {
		t.Fatal(err)
	}
	if err := e.svc.Publish(context.Background(), kept); err != nil {
		t.Fatalf("the kept pod: %v", err)
	}
	e.published(t, kept, e.reg.images["acme/kept"].body)
	if got := e.reg.pullCount(); got != 2 {
		t.Errorf("%d downloads, want 2: the first pod's and the kept pod's, none for the pull nobody asked for", got)
	}
	// The gone pod's image is queued again if a pod asks for it.
	if err := e.svc.Publish(context.Background(), gone); err != nil {
		t.Fatalf("a new publish of the dropped pull: %v", err)
	}
	e.published(t, gone, e.reg.images["acme/gone"].body)
}

// TestQueuedPullsHoldNoGoroutine: a pull waiting for a download slot is a
// record in the queue, not a goroutine: 200 of them, whose publishes gave
// up, leave the daemon's goroutine count where it was; each is downloaded
// once when the slot frees, and the retries are served from it.
func TestQueuedPullsHoldNoGoroutine(t *testing.T) {
	one := 1
	e := newUnitEnv(t, config.FileConfig{Limits: config.LimitsConfig{MaxConcurrentPulls: &one}})
	const n = 200
	e.reg.pulling = make(chan struct{}, n+1)
	e.reg.release = make(chan struct{})
	reqs := e.distinctImages(t, "g", n+1, PullIfNotPresent)
	firstDone := make(chan error, 1)
	go func() { firstDone <- e.svc.Publish(context.Background(), reqs[0]) }()
	<-e.reg.pulling // the one slot is taken
	before := runtime.NumGoroutine()
	e.publishAndGiveUp(t, "while the slot is held", reqs[1:]...)
	waitUntil(func() bool { _, waiting := e.svc.slots.Counts(); return waiting == n })
	if _, waiting := e.svc.slots.Counts(); waiting != n {
		t.Fatalf("%d pulls waiting for the slot, want %d", waiting, n)
	}
	// Allow for the runtime's and the test's own; a goroutine per queued
	// pull would be n more.
	if g := runtime.NumGoroutine() - before; g > n/10 {
		t.Errorf("%d queued pulls hold %d goroutines", n, g)
	}
	close(e.reg.release)
	if err := <-firstDone; err != nil {
		t.Fatal(err)
	}
	for _, req := range reqs[1:] {
		if err := e.svc.Publish(context.Background(), req); err != nil {
			t.Fatalf("retry of %s: %v", req.Image.Original, err)
		}
	}
	e.publishedAll(t, reqs)
	if got := e.reg.pullCount(); got != n+1 {
		t.Errorf("%d downloads for %d modules", got, n+1)
	}
}

// TestPullsWaitingToResolveHoldNoGoroutine: pulls waiting for one of the
// resolve slots (the manifest requests are held at the registry) are
// records in that queue, not goroutines; once the registry answers, each
// is downloaded once and its publish's retry is served.
func TestPullsWaitingToResolveHoldNoGoroutine(t *testing.T) {
	e := newUnitEnv(t, config.FileConfig{})
	bound := e.svc.slots.Limit() * pullslots.ResolvesPerSlot
	gate := make(chan struct{})
	e.reg.mu.Lock()
	e.reg.resolveGate = gate
	e.reg.mu.Unlock()
	const waiting = 200
	reqs := e.distinctImages(t, "r", bound+waiting, PullIfNotPresent)
	before := runtime.NumGoroutine()
	e.publishAndGiveUp(t, "while manifest requests are held", reqs...)
	waitUntil(func() bool { return e.reg.resolvingNow() >= bound })
	if got := e.reg.resolvingNow(); got != bound {
		t.Fatalf("%d manifest requests held, want %d", got, bound)
	}
	// The held requests' goroutines, and some for the runtime and the
	// test; a goroutine per waiting pull would be 200 more.
	if g := runtime.NumGoroutine() - before; g > bound+waiting/10 {
		t.Errorf("%d pulls waiting to resolve (%d resolving) hold %d goroutines", waiting, bound, g)
	}
	close(gate)
	for _, req := range reqs {
		if err := e.svc.Publish(context.Background(), req); err != nil {
			t.Fatalf("retry of %s: %v", req.Image.Original, err)
		}
	}
	e.publishedAll(t, reqs)
	if got := e.reg.pullCount(); got != len(reqs) {
		t.Errorf("%d downloads for %d modules", got, len(reqs))
	}
}

// TestQueuedPullTimesOut: a pull that waits for a download slot past the
// pull timeout leaves the queue and fails with Unavailable, saying so,
// without downloading; the pull holding the slot is not disturbed.
func TestQueuedPullTimesOut(t *testing.T) {
	one := 1
	e := newUnitEnv(t, config.FileConfig{Limits: config.LimitsConfig{MaxConcurrentPulls: &one}})
	e.reg.pulling = make(chan struct{}, 2)
	e.reg.release = make(chan struct{})
	reqs := e.distinctImages(t, "t", 2, PullIfNotPresent)
	firstDone := make(chan error, 1)
	go func() { firstDone <- e.svc.Publish(context.Background(), reqs[0]) }()
	<-e.reg.pulling // the one slot is taken
	e.svc.cfg.PullTimeout = 200 * time.Millisecond
	err := e.svc.Publish(context.Background(), reqs[1])
	if !isKind(err, errdefs.ErrUnavailable) || !isKind(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "download never started") {
		t.Fatalf("publish whose pull waited past its timeout: %v, want Unavailable saying the download never started", err)
	}
	if running, waiting := e.svc.slots.Counts(); running != 1 || waiting != 0 {
		t.Errorf("after the timeout: %d running, %d waiting; want the first pull's only", running, waiting)
	}
	close(e.reg.release)
	if err := <-firstDone; err != nil {
		t.Fatal(err)
	}
	if got := e.reg.pullCount(); got != 1 {
		t.Errorf("%d downloads, want 1: the pull that timed out in the queue downloaded", got)
	}
}

// publishAndGiveUp publishes each of reqs with a deadline its pull cannot
// meet, as kubelet's call that runs out of time, and fails unless each
// returns ErrPullPending (the pull goes on; while says why it cannot end).
func (e *unitEnv) publishAndGiveUp(t *testing.T, while string, reqs ...PublishRequest) {
	t.Helper()
	for _, req := range reqs {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		err := e.svc.Publish(ctx, req)
		cancel()
		if !isKind(err, errdefs.ErrPullPending) {
			t.Fatalf("publish of %s %s: %v, want ErrPullPending", req.Image.Original, while, err)
		}
	}
}
