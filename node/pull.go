package node

import (
	"context"
	"errors"
	"strings"
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/wasm-csi/wasm-csi/node/pullslots"
	"github.com/wasm-csi/wasm-csi/node/store"
	"github.com/wasm-csi/wasm-csi/node/wasmcheck"
	"github.com/wasm-csi/wasm-csi/puller"
	"github.com/wasm-csi/wasm-csi/puller/errdefs"
	"github.com/wasm-csi/wasm-csi/puller/verify"
)

// access is who a publish pulls as: its pod's keyrings, and a key naming
// them so that two publishes with the same credentials can be told apart
// from two with different ones.
type access struct {
	keyrings []*puller.Keyring
	key      string
}

// accessFor reads the pod's pull secrets. Secrets that cannot be read are
// logged and skipped, as kubelet does: the pull goes on with the rest.
func (s *Service) accessFor(ctx context.Context, req PublishRequest) access {
	if s.cfg.Credentials == nil || req.Pod.Namespace == "" || req.Pod.Name == "" {
		return access{}
	}
	ks, err := s.cfg.Credentials.Keyrings(ctx, req.Pod)
	if err != nil {
		s.log.Warn("pull secrets not read; trying node credentials", "image", req.Image.Original,
			"pod", req.Pod.Namespace+"/"+req.Pod.Name, "err", err)
	}
	a := access{keyrings: ks}
	var names []string
	for _, k := range ks {
		names = append(names, k.Name)
	}
	a.key = strings.Join(names, ",")
	return a
}

// resolve finds the module for req under its pull policy, pulling if needed,
// and records image events on the pod. cached is true when no download was
// made.
func (s *Service) resolve(ctx context.Context, req PublishRequest) (store.RefRecord, bool, error) {
	start := time.Now()
	// The pod's pull secrets are read from the API only when a pull or an
	// access check needs them: a cached public module needs neither.
	var acc *access
	accessOf := func() access {
		if acc == nil {
			a := s.accessFor(ctx, req)
			acc = &a
		}
		return *acc
	}
	var rec store.RefRecord
	var cached bool
	var v verifyVerdict
	err := s.admit(req.Image)
	if err == nil {
		rec, cached, err = s.lookup(ctx, req, accessOf)
	}
	if err == nil {
		v, err = s.verification(ctx, req, rec, accessOf)
	}
	ev := s.cfg.Events
	switch {
	case ev == nil:
	case errors.Is(err, errdefs.ErrPullPending):
		// Not a failure: the pull goes on and the retry joins it; the
		// pod has its Pulling event (or the wait for a pull slot).
	case err != nil:
		ev.Failed(req.Pod, req.Image.Original, err)
	case cached:
		ev.AlreadyPresent(req.Pod, req.Image.Original, rec)
	default:
		ev.Pulled(req.Pod, req.Image.Original, rec, time.Since(start))
	}
	if err == nil {
		s.report(req, v)
	}
	return rec, cached, err
}

func (s *Service) lookup(ctx context.Context, req PublishRequest, accessOf func() access) (store.RefRecord, bool, error) {
	key := req.Image.String()
	switch req.PullPolicy {
	case PullNever:
		rec, ok := s.store.GetRef(key)
		if !ok {
			return store.RefRecord{}, false, errdefs.New(errdefs.ErrNotPresent, req.Image.Original, nil,
				"pullPolicy is Never and the module is not on this node; pre-pull it or use IfNotPresent")
		}
		return rec, true, s.checkAccess(ctx, req.Image, rec, accessOf)
	case PullIfNotPresent:
		if rec, ok := s.store.GetRef(key); ok {
			return rec, true, s.checkAccess(ctx, req.Image, rec, accessOf)
		}
	}
	acc := accessOf()
	// The pod hears of the pull's progress while it waits on it.
	done := s.waiting.add(key, req.Pod, acc.key)
	if ev := s.cfg.Events; ev != nil {
		if s.slots.WillWait(key) {
			running, _ := s.slots.Counts()
			ev.WaitingForPullSlot(req.Pod, req.Image.Original, running, s.slots.Limit())
		} else {
			ev.Pulling(req.Pod, req.Image.Original)
		}
	}
	rec, cached, leader, err := s.pull(ctx, req.Image, acc, true)
	done()
	if err != nil {
		return store.RefRecord{}, false, err
	}
	if leader != acc.key {
		// Another publish's pull, joined: its credentials proved nothing
		// about this pod's.
		if err := s.checkAccess(ctx, req.Image, rec, accessOf); err != nil {
			return store.RefRecord{}, false, err
		}
	}
	return rec, cached, nil
}

// checkAccess refuses a module that is on the node only because another
// pod's pull secret fetched it, unless this pod's credentials (or the
// node's, or none) get the same manifest from the registry: Kubernetes'
// "ensure secret pulled images" rule. Public modules need no check.
func (s *Service) checkAccess(ctx context.Context, ref puller.Reference, rec store.RefRecord, accessOf func() access) error {
	if !rec.Private {
		return nil
	}
	acc := accessOf()
	st := s.cur.Load()
	pinned := ref.ByDigest(rec.Manifest)
	if _, _, err := s.resolveAt(ctx, st, pinned, acc); err != nil {
		if errors.Is(err, errdefs.ErrUnauthorized) {
			return &errdefs.Error{Kind: errdefs.ErrUnauthorized, Image: ref.Original, Cause: err,
				Msg: "the module is on this node, pulled with another pod's pull secret, and this pod's credentials do not give access to it; add an imagePullSecret the registry accepts"}
		}
		return err
	}
	return nil
}

// pull runs one pull per reference at a time. The pull runs on a context of
// its own, so it outlives a caller that gives up; the caller's retry joins
// it. leader names the credentials the pull ran with.
//
// A kubelet call (call true) may be turned away while the pull is queued
// (holdCaller); a background pull (pre-pull) always waits.
func (s *Service) pull(ctx context.Context, ref puller.Reference, acc access, call bool) (store.RefRecord, bool, string, error) {
	key := ref.String()
	c, leader, leave := s.flights.join(key)
	defer leave()
	if leader {
		s.startPull(context.WithoutCancel(ctx), c, key, ref, acc)
	}
	if call && !s.holdCaller(key) {
		select {
		case <-c.done:
			return c.result()
		default:
		}
		running, waiting := s.slots.Counts()
		return store.RefRecord{}, false, "", errdefs.New(errdefs.ErrPullPending, ref.Original, nil,
			"the pull is queued (%d downloads running, %d waiting for one of the %d pull slots) and goes on in the background; the retry will use it", running, waiting, s.slots.Limit())
	}
	if call {
		defer s.held.Add(-1)
	}
	select {
	case <-c.done:
		return c.result()
	case <-ctx.Done():
		return store.RefRecord{}, false, "", errdefs.New(errdefs.ErrPullPending, ref.Original, ctx.Err(),
			"the pull is still in progress and goes on in the background; the retry will use it")
	}
}

// startPull starts the pull c of ref and returns at once. The pull first
// waits for a resolve slot, then runs planPull holding it (what a tag
// names, and whether the module is on the node already), then waits for a
// download slot and downloads. Each slot bounds the manifest requests made
// while it is held: one at a time, on the pull's own goroutine. While it waits for a slot it is a record in
// that slot's queue (pullslots), not a goroutine: a burst of 1,000 pulls
// kept ~1,000 goroutines waiting before. Each wait ends with the pull
// timeout; the wait for a download slot also ends when nobody asks for the
// pull any more (abandon.go).
func (s *Service) startPull(ctx context.Context, c *pullCall, key string, ref puller.Reference, acc access) {
	// An image that keeps failing is not asked for again before its
	// damping window ends (damping.go).
	if err := s.damp.check(key, acc.key); err != nil {
		s.flights.end(key, c, pullResult{}, err)
		return
	}
	started := time.Now()
	ctx, cancel := context.WithTimeout(ctx, s.cfg.PullTimeout)
	end := func(rec store.RefRecord, cached bool, err error) {
		cancel()
		s.damp.done(key, acc.key, err)
		s.flights.end(key, c, pullResult{rec, cached, acc.key}, err)
	}
	queued(s.slots.WaitResolve, func(release func()) {
		p, rec, done, err := s.planPull(ctx, ref, acc, started)
		release()
		if done {
			end(rec, err == nil, err)
			return
		}
		s.queueDownload(ctx, key, c, p, end)
	}, func(leave func() bool) []func() {
		return []func(){s.afterTimeout(ctx, leave, end, func() error {
			return errdefs.New(errdefs.ErrUnavailable, ref.Original, ctx.Err(),
				"waiting to ask the registry for the manifest (%d requests at a time): the pull ran out of time", s.slots.Limit()*pullslots.ResolvesPerSlot)
		})}
	})
}

// queueDownload queues p's download for one of the limits.maxConcurrentPulls
// pull slots, first come first served, and returns at once: the download
// runs on a goroutine of its own when a slot frees, and calls end. A queued
// download leaves the queue, and end is called without it, when ctx (the
// pull timeout) ends or no publish has asked for it for s.abandonAfter;
// publishes that give up leave the pull queued, and their retries join it
// in its place.
func (s *Service) queueDownload(ctx context.Context, key string, c *pullCall, p *pullPlan, end func(store.RefRecord, bool, error)) {
	if s.slots.WillWait(key) {
		running, waiting := s.slots.Counts()
		s.log.Info("waiting for a pull slot", "image", p.ref.Original, "inFlight", running, "waiting", waiting, "slots", s.slots.Limit())
	}
	since := time.Now()
	wait := func(start func(func())) func() bool { return s.slots.Wait(key, start) }
	queued(wait, func(release func()) {
		rec, cached, err := s.downloadPlan(ctx, p)
		release()
		end(rec, cached, err)
	}, func(leave func() bool) []func() {
		idle := func(now time.Time) (time.Duration, bool) { return s.flights.idle(c, now) }
		abandoned := watchAbandon(idle, s.abandonAfter, func(error) {
			if leave() {
				// Not a failure (not damped, no Failed event): a pod
				// that asks again queues the pull again.
				end(store.RefRecord{}, false, errdefs.New(errdefs.ErrPullPending, p.ref.Original, errAbandoned,
					"the queued pull was dropped: no pod asked for it for %s; the next publish queues it again", s.abandonAfter))
			}
		})
		timedOut := s.afterTimeout(ctx, leave, end, func() error {
			return errdefs.New(errdefs.ErrUnavailable, p.ref.Original, ctx.Err(),
				"waited %s for one of the %d pull slots and the download never started; raise limits.maxConcurrentPulls or pre-pull the module", time.Since(since).Round(time.Second), s.slots.Limit())
		})
		return []func(){abandoned, timedOut}
	})
}

// queued puts start in a queue with wait (pullslots' Wait or WaitResolve)
// and calls watch, which sets up what takes it out of the queue (leave)
// before it starts and returns how to stop those watches. They are all
// stopped once start runs or one of them takes it out.
func queued(wait func(start func(release func())) (leave func() bool), start func(release func()), watch func(leave func() bool) (stops []func())) {
	var mu sync.Mutex
	started := false
	var stops []func()
	leave := wait(func(release func()) {
		mu.Lock()
		started = true
		for _, stop := range stops {
			stop()
		}
		mu.Unlock()
		start(release)
	})
	// A watch's callback runs on a goroutine of its own, after watch has
	// returned and stops is set (mu).
	leaveAndStop := func() bool {
		if !leave() {
			return false
		}
		mu.Lock()
		all := stops
		mu.Unlock()
		for _, stop := range all {
			stop()
		}
		return true
	}
	mu.Lock()
	defer mu.Unlock()
	if !started {
		stops = watch(leaveAndStop)
	}
}

// afterTimeout ends a queued pull with why() when ctx ends before it leaves
// the queue; the returned stop ends the watch.
func (s *Service) afterTimeout(ctx context.Context, leave func() bool, end func(store.RefRecord, bool, error), why func() error) (stop func()) {
	stopAfter := context.AfterFunc(ctx, func() {
		if leave() {
			end(store.RefRecord{}, false, why())
		}
	})
	return func() { stopAfter() }
}

// MaxHeldCallers is how many publishes may wait in their call for a pull
// that is not downloading yet (csi.MaxConnections is twice it).
const MaxHeldCallers = 64

// holdCaller says whether a publish may wait in its call for the pull of
// key, and counts it in s.held if so (the caller subtracts it). A caller
// whose pull is downloading is always held; one whose pull is queued only
// while no more than MaxHeldCallers are held.
// Each call held is a kubelet connection (kubelet dials one per call) with
// its server-side goroutines and buffers: 1,000 of them held for queued
// pulls cost more memory than the pulls themselves. A publish turned away
// gets ErrPullPending at once; its pull stays queued and kubelet's retry,
// after its backoff, joins it.
func (s *Service) holdCaller(key string) bool {
	n := s.held.Add(1)
	if n <= MaxHeldCallers || s.slots.Downloading(key) {
		return true
	}
	s.held.Add(-1)
	return false
}

// pullPlan is a pull on its way to a download: the sources to try, in the
// order configured (registries.mirrors, the runtime's mirrors, then the
// registry), what the tag resolved to, and the source to download from
// next. A source that fails in any way (refused, 5xx, 404, bytes that do
// not match their digest) passes the pull to the next; digests are
// verified whoever answers. As in containerd, a tag is resolved only by
// sources that may resolve, and the manifest and module are then fetched by
// digest from the sources that may pull, pull-only mirrors included.
type pullPlan struct {
	st    *settings
	ref   puller.Reference
	acc   access
	srcs  []puller.Reference
	start time.Time
	// desc is the manifest the tag named at srcs[resolvedAt], with the
	// credential that worked there; resolvedAt is -1 for a digest.
	desc       ocispec.Descriptor
	used       puller.Credential
	resolvedAt int
	// down: sources that failed to resolve the tag are not asked again
	// for its digest in the same pull.
	down    map[int]bool
	lastErr error
	// next is the source to download from, src the reference to ask it
	// for, d its manifest and cred the credential it took.
	next int
	src  puller.Reference
	d    ocispec.Descriptor
	cred puller.Credential
}

// planPull resolves ref's tag and finds the first source to download from,
// without a pull slot: a module already on the node, under a tag or a
// digest asked for with pullPolicy Always, is never queued behind
// downloads. Its caller holds a resolve slot; start is when the pull
// started. done is true when the pull ends here: the module is on the node
// (rec) or no source serves it (err).
func (s *Service) planPull(ctx context.Context, ref puller.Reference, acc access, start time.Time) (p *pullPlan, rec store.RefRecord, done bool, err error) {
	p = &pullPlan{st: s.cur.Load(), ref: ref, acc: acc, start: start, resolvedAt: -1, down: map[int]bool{}}
	if p.srcs, err = p.st.puller.Sources(ref); err != nil {
		return nil, store.RefRecord{}, true, err
	}
	if ref.Digest == "" {
		for i, src := range p.srcs {
			if !src.CanResolve() {
				continue
			}
			if p.desc, p.used, err = s.resolveHeld(ctx, p.st, src, p.acc); err == nil {
				p.resolvedAt = i
				break
			}
			p.down[i] = true
			if s.failed(ctx, p, src, err) {
				return nil, store.RefRecord{}, true, p.lastErr
			}
		}
		if p.resolvedAt < 0 {
			if p.lastErr == nil {
				p.lastErr = errdefs.New(errdefs.ErrInvalidArgument, ref.Original, nil, "no configured source may resolve tags (hosts.toml capabilities); name the image by digest")
			}
			return nil, store.RefRecord{}, true, p.lastErr
		}
		if rec, ok, err := s.known(ref, p.desc.Digest); ok || err != nil {
			return nil, rec, true, err
		}
	}
	rec, done, err = s.sourceFrom(ctx, p, 0)
	return p, rec, done, err
}

// sourceFrom sets p.next (and src, d, cred) to the first source from index
// i on that may serve the download, asking it for the manifest by digest
// unless it resolved the tag. done is true when the pull ends there: the
// module is on the node (rec), or no source is left or a failure stops the
// pull (err).
func (s *Service) sourceFrom(ctx context.Context, p *pullPlan, i int) (rec store.RefRecord, done bool, err error) {
	for ; i < len(p.srcs); i++ {
		src := p.srcs[i]
		if !src.CanPull() || p.down[i] {
			continue
		}
		d, cred := p.desc, p.used
		if i != p.resolvedAt {
			if p.ref.Digest == "" {
				src.Tag, src.Digest = "", p.desc.Digest
			}
			if d, cred, err = s.resolveHeld(ctx, p.st, src, p.acc); err != nil {
				if s.failed(ctx, p, src, err) {
					return store.RefRecord{}, true, p.lastErr
				}
				continue
			}
			if rec, ok, err := s.known(p.ref, d.Digest); ok || err != nil {
				return rec, true, err
			}
		}
		p.next, p.src, p.d, p.cred = i, src, d, cred
		return store.RefRecord{}, false, nil
	}
	if p.lastErr == nil {
		p.lastErr = errdefs.New(errdefs.ErrInvalidArgument, p.ref.Original, nil, "no configured source may pull the module (hosts.toml capabilities)")
	}
	return store.RefRecord{}, true, p.lastErr
}

// failed records a source's failure and says whether to stop the pull.
func (s *Service) failed(ctx context.Context, p *pullPlan, src puller.Reference, err error) bool {
	p.lastErr = err
	if src.IsMirror(p.ref) {
		s.log.Warn("mirror failed, trying the next source", "image", p.ref.Original, "mirror", src.Registry, "err", err)
	}
	return errors.Is(err, errdefs.ErrNoSpace) || ctx.Err() != nil
}

// downloadPlan downloads p's module from p.next, holding a pull slot, and
// from the sources after it while they fail. cached is true when a source
// after a failed one names a module that is on the node.
func (s *Service) downloadPlan(ctx context.Context, p *pullPlan) (store.RefRecord, bool, error) {
	for {
		s.log.Info("pulling module", "image", p.ref.Original, "source", p.src.Registry, "manifest", p.d.Digest)
		rec, err := s.download(ctx, p.st, p.ref, p.src, p.d, p.cred, p.acc.key)
		s.cfg.Metrics.Pulled(err, rec.Size, time.Since(p.start))
		if err == nil {
			s.log.Info("module pulled", "image", p.ref.Original, "source", p.src.Registry, "digest", rec.Module, "manifest", p.d.Digest,
				"layout", rec.Layout, "bytes", rec.Size, "duration", time.Since(p.start))
			return rec, false, nil
		}
		if s.failed(ctx, p, p.src, err) {
			return store.RefRecord{}, false, p.lastErr
		}
		if rec, done, err := s.sourceFrom(ctx, p, p.next+1); done {
			return rec, err == nil, err
		}
	}
}

// resolveAt asks src which manifest it names, trying the pod's and the
// node's credentials for src's host. It holds one of the resolve slots
// meanwhile: a burst of publishes asks the registry a few manifests at a
// time rather than all at once.
func (s *Service) resolveAt(ctx context.Context, st *settings, src puller.Reference, acc access) (ocispec.Descriptor, puller.Credential, error) {
	release, err := s.slots.Resolve(ctx)
	if err != nil {
		return ocispec.Descriptor{}, puller.Credential{}, errdefs.New(errdefs.ErrUnavailable, src.Original, err,
			"waiting to ask the registry for the manifest (%d requests at a time): the pull ran out of time", s.slots.Limit()*pullslots.ResolvesPerSlot)
	}
	defer release()
	return s.resolveHeld(ctx, st, src, acc)
}

// resolveHeld is resolveAt for a caller holding a slot: a resolve slot, or
// a pull's download slot (a mirror fallback's request).
func (s *Service) resolveHeld(ctx context.Context, st *settings, src puller.Reference, acc access) (ocispec.Descriptor, puller.Credential, error) {
	attempts, err := st.puller.Attempts(ctx, src, acc.keyrings...)
	if err != nil {
		return ocispec.Descriptor{}, puller.Credential{}, err
	}
	return st.puller.ResolveWith(ctx, src, attempts)
}

// known returns the record of manifest m when its module is on the node
// already, recording ref (a tag) as naming it. Records are kept under ref's
// own registry name, wherever the bytes came from.
func (s *Service) known(ref puller.Reference, m digest.Digest) (store.RefRecord, bool, error) {
	rec, ok := s.store.GetRef(ref.ByDigest(m).String())
	if !ok {
		return store.RefRecord{}, false, nil
	}
	rec.Ref = ref.String()
	if ref.Digest == "" {
		if err := s.store.PutRef(rec); err != nil {
			return store.RefRecord{}, false, withImage(err, ref.Original)
		}
	}
	return rec, true, nil
}

// download streams the module into the store, validates it and records
// which module the reference resolved to.
// leader names the credentials of the publish whose pull this is
// (access.key).
func (s *Service) download(ctx context.Context, st *settings, ref, src puller.Reference, desc ocispec.Descriptor, used puller.Credential, leader string) (store.RefRecord, error) {
	w, err := s.store.NewBlobWriter(s.cfg.Puller.Buffers)
	if err != nil {
		return store.RefRecord{}, withImage(err, ref.Original)
	}
	defer w.Abort()
	sink := s.newProgressSink(w, ref, desc, used.FromPodSecret(), leader)
	mod, err := st.puller.Pull(ctx, src, desc, sink, used)
	sink.stop()
	if err != nil {
		var ne *errdefs.Error
		if errors.As(err, &ne) { // the store failed, e.g. a full disk
			return store.RefRecord{}, withImage(ne, ref.Original)
		}
		return store.RefRecord{}, err
	}
	// Signatures are checked while the bytes are still a temp file: a
	// refused module never reaches a path a pod can mount.
	subjects := mod.Subjects
	if len(subjects) == 0 {
		subjects = []ocispec.Descriptor{desc}
	}
	if err := s.verifyPulled(ctx, st, ref, desc.Digest, subjects, func() (verify.Repository, error) {
		return st.puller.SignatureRepository(src, used)
	}); err != nil {
		return store.RefRecord{}, err
	}
	d, err := w.Commit(func(path string) error {
		// The pull's context: a pull that runs out of time waiting for
		// a slot gives up instead of queueing on.
		if err := s.validate.Acquire(ctx, 1); err != nil {
			return errdefs.New(errdefs.ErrInternal, "", err, "waiting for a validation slot (%d at a time): the pull ran out of time", s.cfg.MaxConcurrentValidations)
		}
		defer s.validate.Release(1)
		return wasmcheck.CheckFile(path, st.validation)
	})
	if err != nil {
		return store.RefRecord{}, withImage(err, ref.Original)
	}
	rec := store.RefRecord{Ref: ref.ByDigest(desc.Digest).String(), Manifest: desc.Digest, Module: d, Size: mod.Size, Layout: string(mod.Layout), PulledAt: time.Now().UTC(),
		// Pulled with a pod's secret: other pods must prove their access.
		Private: used.FromPodSecret()}
	if err := s.store.PutRef(rec); err != nil {
		return store.RefRecord{}, withImage(err, ref.Original)
	}
	if ref.Digest == "" {
		rec.Ref = ref.String()
		if err := s.store.PutRef(rec); err != nil {
			return store.RefRecord{}, withImage(err, ref.Original)
		}
	}
	return rec, nil
}
