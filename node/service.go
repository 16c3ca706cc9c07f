package node

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sync/singleflight"

	"github.com/wasm-csi/wasm-csi/puller"
)

// PullPolicy says when a publish asks the registry.
type PullPolicy string

const (
	PullIfNotPresent PullPolicy = "IfNotPresent"
	PullAlways       PullPolicy = "Always"
	PullNever        PullPolicy = "Never"
)

// DefaultPullTimeout bounds one pull. It outlives kubelet's 2-minute call
// deadline on purpose: kubelet's retry joins the pull still in flight.
const DefaultPullTimeout = 10 * time.Minute

// DefaultFileName is the module's file name in the volume.
const DefaultFileName = "plugin.wasm"

// PodInfo identifies the pod a volume is for.
type PodInfo struct {
	Name, Namespace, UID, ServiceAccount string
}

// PublishRequest is a validated NodePublishVolume.
type PublishRequest struct {
	VolumeID   string
	TargetPath string
	Image      puller.Reference
	PullPolicy PullPolicy
	// SHA256 is the pinned sha256 of the module's bytes, or empty.
	SHA256   digest.Digest
	FileName string
	Pod      PodInfo
}

// Puller is what the service needs of a registry client.
type Puller interface {
	Attempts(ref puller.Reference, keyrings ...*puller.Keyring) ([]puller.Credential, error)
	ResolveWith(ctx context.Context, ref puller.Reference, attempts []puller.Credential) (ocispec.Descriptor, puller.Credential, error)
	Pull(ctx context.Context, ref puller.Reference, desc ocispec.Descriptor, sink puller.Sink, cred puller.Credential) (puller.Module, error)
	Sources(ref puller.Reference) []puller.Reference
}

// Credentials finds the registry credentials a pod may use: its
// imagePullSecrets, then its service account's.
type Credentials interface {
	Keyrings(ctx context.Context, pod PodInfo) ([]*puller.Keyring, error)
}

// Events tells a pod's owner what happened to its image, as kubelet's
// image events do. Implementations must never block a publish.
type Events interface {
	Pulling(pod PodInfo, image string)
	Pulled(pod PodInfo, image string, rec RefRecord, took time.Duration)
	AlreadyPresent(pod PodInfo, image string, rec RefRecord)
	Failed(pod PodInfo, image string, err error)
}

// Config configures a Service.
type Config struct {
	// PullTimeout bounds one pull (default DefaultPullTimeout).
	PullTimeout time.Duration
	// Puller holds the registry settings the flags fix; the config file
	// adds insecure registries, mirrors and limits to them.
	Puller puller.Config
	// NewPuller makes a registry client for settings (default puller.New).
	NewPuller func(puller.Config) Puller
	// Metrics records what the service does (nil: nothing).
	Metrics *Metrics
	// GCInterval is how often unused modules are collected (default 1m).
	GCInterval time.Duration
	// MaxConcurrentValidations bounds the memory validation takes (default 2).
	MaxConcurrentValidations int
	// Credentials gives pods' pull secrets (nil: node credentials only).
	Credentials Credentials
	// Events records image events on pods (nil: none).
	Events Events
}

// settings are what the config file can change while the daemon runs.
type settings struct {
	puller     Puller
	validation ValidationMode
	gc         GCPolicy
	prePull    []string
}

// Service publishes and unpublishes module volumes on this node.
type Service struct {
	cfg      Config
	store    *Store
	mounter  *Mounter
	log      *slog.Logger
	flight   singleflight.Group
	locks    *keyedLock
	uses     *Uses
	cur      atomic.Pointer[settings]
	validate chan struct{}
	damp     *damper

	bgMu          sync.Mutex
	bg            context.Context
	prePullCancel context.CancelFunc
}

// NewService returns a Service over an opened store, with default settings
// until Reconfigure. Module uses are counted from the volume records on disk.
func NewService(cfg Config, store *Store, m *Mounter, log *slog.Logger) (*Service, error) {
	if cfg.PullTimeout <= 0 {
		cfg.PullTimeout = DefaultPullTimeout
	}
	if cfg.NewPuller == nil {
		cfg.NewPuller = func(c puller.Config) Puller { return puller.New(c) }
	}
	if cfg.GCInterval <= 0 {
		cfg.GCInterval = time.Minute
	}
	if cfg.MaxConcurrentValidations <= 0 {
		cfg.MaxConcurrentValidations = 2
	}
	uses, err := NewUses(store)
	if err != nil {
		return nil, err
	}
	s := &Service{cfg: cfg, store: store, mounter: m, log: log, locks: newKeyedLock(), uses: uses,
		validate: make(chan struct{}, cfg.MaxConcurrentValidations), damp: newDamper(nil)}
	// Records of volumes kubelet cleaned up while the daemon was down.
	if _, err := s.reconcile(); err != nil {
		return nil, err
	}
	if err := s.Reconfigure(FileConfig{}); err != nil {
		return nil, err
	}
	return s, nil
}

// Reconfigure applies a config file: registries, limits, validation and
// the pre-pull list take effect for the next pull; pulls in flight finish
// with the settings they started with.
func (s *Service) Reconfigure(fc FileConfig) error {
	if err := fc.Validate(); err != nil {
		return err
	}
	pc := s.cfg.Puller
	pc.InsecureRegistries = append(append([]string(nil), s.cfg.Puller.InsecureRegistries...), fc.Registries.Insecure...)
	pc.Mirrors = fc.Registries.Mirrors
	blocked, err := fc.Registries.BlockedNetworks()
	if err != nil {
		return err
	}
	pc.BlockedCIDRs = append(append([]netip.Prefix(nil), s.cfg.Puller.BlockedCIDRs...), blocked...)
	if q := fc.Limits.MaxModuleSize; q != nil {
		pc.MaxModuleSize = q.Value()
	}
	mode, err := ParseValidationMode(fc.Validation)
	if err != nil {
		return err
	}
	age, err := fc.UnusedModuleAge()
	if err != nil {
		return err
	}
	gc := GCPolicy{MaxAge: age}
	if q := fc.Limits.MaxStoreSize; q != nil {
		gc.MaxStoreBytes = q.Value()
	}
	var images []string
	for _, p := range fc.PrePull {
		images = append(images, p.Image)
	}
	s.cur.Store(&settings{puller: s.cfg.NewPuller(pc), validation: mode, gc: gc, prePull: images})
	s.damp.reset() // new registry settings may fix what failed
	s.startPrePull(images)
	return nil
}

// Start runs the background work (pre-pulls, garbage collection) until
// ctx ends.
func (s *Service) Start(ctx context.Context) {
	s.bgMu.Lock()
	s.bg = ctx
	s.bgMu.Unlock()
	s.startPrePull(s.cur.Load().prePull)
	go s.gcLoop(ctx)
}

func (s *Service) gcLoop(ctx context.Context) {
	t := time.NewTicker(s.cfg.GCInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.CollectGarbage()
		}
	}
}

// CollectGarbage removes unused modules under the configured limits.
func (s *Service) CollectGarbage() {
	policy := s.cur.Load().gc
	if policy.MaxAge == 0 && policy.MaxStoreBytes == 0 {
		return
	}
	res, err := CollectGarbage(s.store, s.uses, policy, time.Now(), s.log)
	if err != nil {
		s.log.Error("garbage collection failed", "err", err)
		return
	}
	if res.Removed > 0 {
		s.log.Info("garbage collected", "removed", res.Removed, "freedBytes", res.FreedBytes, "storeBytes", res.StoreBytes)
	}
}

// startPrePull pulls images in the background (IfNotPresent), replacing a
// pre-pull still running from an older config. Before Start it only records.
func (s *Service) startPrePull(images []string) {
	s.bgMu.Lock()
	defer s.bgMu.Unlock()
	if s.bg == nil {
		return
	}
	if s.prePullCancel != nil {
		s.prePullCancel()
	}
	ctx, cancel := context.WithCancel(s.bg)
	s.prePullCancel = cancel
	go func() {
		for _, img := range images {
			if ctx.Err() != nil {
				return
			}
			ref, err := puller.ParseReference(img)
			if err != nil {
				s.log.Error("pre-pull skipped", "image", img, "err", err)
				continue
			}
			if rec, ok := s.store.GetRef(ref.String()); ok {
				s.log.Debug("pre-pull: already present", "image", img, "digest", rec.Module)
				continue
			}
			rec, _, _, err := s.pull(ctx, ref, access{})
			if err != nil {
				s.log.Error("pre-pull failed", "image", img, "err", err)
				continue
			}
			s.log.Info("pre-pulled", "image", img, "digest", rec.Module)
		}
	}()
}

// Publish makes the module of req.Image visible at req.TargetPath as
// req.FileName, read-only. It is idempotent and undoes partial work on failure.
func (s *Service) Publish(ctx context.Context, req PublishRequest) (err error) {
	start := time.Now()
	defer func() { s.cfg.Metrics.published(err, time.Since(start)) }()
	unlock := s.locks.Lock(req.VolumeID)
	defer unlock()
	image := req.Image.Original

	rec, exists, err := s.store.GetVolume(req.VolumeID, req.TargetPath)
	if err != nil {
		return withImage(err, image)
	}
	var module, manifest digest.Digest
	if exists {
		if rec.Image != image || rec.FileName != req.FileName || rec.SHA256 != string(req.SHA256) || rec.PullPolicy != string(req.PullPolicy) {
			return newError(ErrVolumeConflict, image, nil,
				"volume %s is already published at %s with image %s; unpublish it first or use a new volume", req.VolumeID, req.TargetPath, rec.Image)
		}
		mounted, err := s.mounter.IsMountPoint(req.TargetPath)
		if err != nil {
			return newError(ErrInternal, image, err, "checking the target path %s", req.TargetPath)
		}
		if mounted {
			return nil
		}
		// A record without a mount: a publish that failed half-way or a
		// crash. Redo the mount with the digest already chosen for this
		// volume, so the pod's file never changes.
		module, manifest = rec.Module, rec.Manifest
	} else {
		ref, cached, err := s.resolve(ctx, req)
		if err != nil {
			return err
		}
		module, manifest = ref.Module, ref.Manifest
		s.cfg.Metrics.cacheLookup(cached)
		s.log.Info("module resolved", "image", image, "digest", module, "manifest", manifest, "cached", cached, "policy", req.PullPolicy)
		// Count this volume's use before anything else, under the lock the
		// collector takes: from here on the module cannot be removed.
		if !s.uses.Acquire(s.store, module) {
			return newError(ErrNotPresent, image, nil, "module %s was removed from the node while this volume was being published; the retry pulls it again", module)
		}
		defer func() {
			if err != nil {
				s.uses.Release(module)
			}
		}()
	}
	if req.SHA256 != "" && req.SHA256 != module {
		return newError(ErrDigestMismatch, image, nil,
			"the module's sha256 is %s but the volume pins %s; fix the sha256 attribute or the image", module.Encoded(), req.SHA256.Encoded())
	}
	if !s.store.HasBlob(module) {
		return newError(ErrNotPresent, image, nil, "module %s of this volume is no longer on the node; delete and recreate the pod", module)
	}
	view, err := s.store.ViewDir(module, req.FileName)
	if err != nil {
		return withImage(err, image)
	}
	rec = VolumeRecord{
		VolumeID: req.VolumeID, TargetPath: req.TargetPath, Image: image,
		PullPolicy: string(req.PullPolicy), SHA256: string(req.SHA256), FileName: req.FileName,
		Module: module, Manifest: manifest,
		PodName: req.Pod.Name, PodNS: req.Pod.Namespace, PodUID: req.Pod.UID,
		PublishedAt: time.Now().UTC(),
	}
	if !exists {
		if err := s.store.PutVolume(rec); err != nil {
			return withImage(err, image)
		}
	}
	if err := s.mountTarget(view, req.TargetPath); err != nil {
		// A new volume is forgotten again; an existing record (a crash
		// before its mount) stays, for kubelet's retry or unpublish.
		if !exists {
			if derr := s.store.DeleteVolume(req.VolumeID, req.TargetPath); derr != nil {
				s.log.Error("undoing volume record", "volume", req.VolumeID, "err", derr)
			}
		}
		return newError(ErrInternal, image, err, "mounting the module at %s", req.TargetPath)
	}
	s.store.Touch(module)
	s.log.Info("volume published", "volume", req.VolumeID, "target", req.TargetPath, "image", image,
		"digest", module, "file", req.FileName, "pod", req.Pod.Namespace+"/"+req.Pod.Name, "duration", time.Since(start))
	return nil
}

// mountTarget creates target and bind-mounts view on it read-only. On
// failure it removes what it created.
func (s *Service) mountTarget(view, target string) error {
	created := false
	if _, err := os.Stat(target); errors.Is(err, os.ErrNotExist) {
		if err := os.Mkdir(target, 0o750); err != nil {
			return err
		}
		created = true
	} else if err != nil {
		return err
	}
	if err := s.mounter.BindReadOnly(view, target); err != nil {
		if created {
			os.Remove(target)
		}
		return err
	}
	return nil
}

// Unpublish unmounts target and forgets the volume. It is idempotent: a
// target that is not there, or not mounted, is success.
func (s *Service) Unpublish(ctx context.Context, volumeID, target string) error {
	unlock := s.locks.Lock(volumeID)
	defer unlock()
	if err := s.mounter.Unmount(target); err != nil {
		return newError(ErrInternal, "", err, "unmounting volume %s at %s", volumeID, target)
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return newError(ErrInternal, "", err, "removing target path %s of volume %s", target, volumeID)
	}
	rec, known, err := s.store.GetVolume(volumeID, target)
	if err != nil {
		return err
	}
	if err := s.store.DeleteVolume(volumeID, target); err != nil {
		return err
	}
	if known {
		s.uses.Release(rec.Module)
		s.store.Touch(rec.Module)
	}
	s.log.Info("volume unpublished", "volume", volumeID, "target", target, "known", known)
	return nil
}

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
func (s *Service) resolve(ctx context.Context, req PublishRequest) (RefRecord, bool, error) {
	start := time.Now()
	acc := s.accessFor(ctx, req)
	rec, cached, err := s.lookup(ctx, req, acc)
	ev := s.cfg.Events
	switch {
	case ev == nil:
	case err != nil:
		ev.Failed(req.Pod, req.Image.Original, err)
	case cached:
		ev.AlreadyPresent(req.Pod, req.Image.Original, rec)
	default:
		ev.Pulled(req.Pod, req.Image.Original, rec, time.Since(start))
	}
	return rec, cached, err
}

func (s *Service) lookup(ctx context.Context, req PublishRequest, acc access) (RefRecord, bool, error) {
	key := req.Image.String()
	switch req.PullPolicy {
	case PullNever:
		rec, ok := s.store.GetRef(key)
		if !ok {
			return RefRecord{}, false, newError(ErrNotPresent, req.Image.Original, nil,
				"pullPolicy is Never and the module is not on this node; pre-pull it or use IfNotPresent")
		}
		return rec, true, s.checkAccess(ctx, req.Image, rec, acc)
	case PullIfNotPresent:
		if rec, ok := s.store.GetRef(key); ok {
			return rec, true, s.checkAccess(ctx, req.Image, rec, acc)
		}
	}
	if s.cfg.Events != nil {
		s.cfg.Events.Pulling(req.Pod, req.Image.Original)
	}
	rec, cached, leader, err := s.pull(ctx, req.Image, acc)
	if err != nil {
		return RefRecord{}, false, err
	}
	if leader != acc.key {
		// Another publish's pull, joined: its credentials proved nothing
		// about this pod's.
		if err := s.checkAccess(ctx, req.Image, rec, acc); err != nil {
			return RefRecord{}, false, err
		}
	}
	return rec, cached, nil
}

// checkAccess refuses a module that is on the node only because another
// pod's pull secret fetched it, unless this pod's credentials (or the
// node's, or none) get the same manifest from the registry: Kubernetes'
// "ensure secret pulled images" rule. Public modules need no check.
func (s *Service) checkAccess(ctx context.Context, ref puller.Reference, rec RefRecord, acc access) error {
	if !rec.Private {
		return nil
	}
	st := s.cur.Load()
	pinned := ref.ByDigest(rec.Manifest)
	attempts, err := st.puller.Attempts(pinned, acc.keyrings...)
	if err != nil {
		return err
	}
	if _, _, err := st.puller.ResolveWith(ctx, pinned, attempts); err != nil {
		if errors.Is(err, puller.ErrUnauthorized) {
			return &puller.Error{Kind: puller.ErrUnauthorized, Image: ref.Original, Cause: err,
				Msg: "the module is on this node, pulled with another pod's pull secret, and this pod's credentials do not give access to it; add an imagePullSecret the registry accepts"}
		}
		return err
	}
	return nil
}

type pullResult struct {
	rec    RefRecord
	cached bool
	leader string
}

// pull runs one pull per reference at a time. The pull runs on a context of
// its own, so it outlives a caller that gives up; the caller's retry joins
// it. leader names the credentials the pull ran with.
func (s *Service) pull(ctx context.Context, ref puller.Reference, acc access) (RefRecord, bool, string, error) {
	ch := s.flight.DoChan(ref.String(), func() (any, error) {
		// An image that keeps failing is not asked for again before its
		// damping window ends (damping.go).
		if err := s.damp.check(ref.String(), acc.key); err != nil {
			return pullResult{}, err
		}
		pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.PullTimeout)
		defer cancel()
		rec, cached, err := s.doPull(pctx, ref, acc)
		s.damp.done(ref.String(), acc.key, err)
		return pullResult{rec, cached, acc.key}, err
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return RefRecord{}, false, "", r.Err
		}
		pr := r.Val.(pullResult)
		return pr.rec, pr.cached, pr.leader, nil
	case <-ctx.Done():
		return RefRecord{}, false, "", newError(ErrPullPending, ref.Original, ctx.Err(),
			"the pull is still in progress and goes on in the background; the retry will use it")
	}
}

func (s *Service) doPull(ctx context.Context, ref puller.Reference, acc access) (RefRecord, bool, error) {
	st := s.cur.Load()
	var lastErr error
	for _, src := range st.puller.Sources(ref) {
		rec, cached, err := s.pullFrom(ctx, st, ref, src, acc)
		if err == nil {
			return rec, cached, nil
		}
		lastErr = err
		if src.Registry != ref.Registry {
			s.log.Warn("mirror failed, trying the next source", "image", ref.Original, "mirror", src.Registry, "err", err)
		}
		if errors.Is(err, ErrNoSpace) || ctx.Err() != nil {
			break
		}
	}
	return RefRecord{}, false, lastErr
}

// pullFrom resolves and, unless its manifest is already stored, downloads
// ref from src (the registry or one of its mirrors). Records are kept under
// ref's own registry name, wherever the bytes came from.
func (s *Service) pullFrom(ctx context.Context, st *settings, ref, src puller.Reference, acc access) (RefRecord, bool, error) {
	start := time.Now()
	attempts, err := st.puller.Attempts(src, acc.keyrings...)
	if err != nil {
		return RefRecord{}, false, err
	}
	desc, used, err := st.puller.ResolveWith(ctx, src, attempts)
	if err != nil {
		return RefRecord{}, false, err
	}
	byDigest := ref.ByDigest(desc.Digest).String()
	if rec, ok := s.store.GetRef(byDigest); ok {
		// The manifest is known: the module is on the node already.
		rec.Ref = ref.String()
		if ref.Digest == "" {
			if err := s.store.PutRef(rec); err != nil {
				return RefRecord{}, false, withImage(err, ref.Original)
			}
		}
		return rec, true, nil
	}
	s.log.Info("pulling module", "image", ref.Original, "source", src.Registry, "manifest", desc.Digest)
	rec, err := s.download(ctx, st, ref, src, desc, used)
	s.cfg.Metrics.pulled(err, rec.Size, time.Since(start))
	if err != nil {
		return RefRecord{}, false, err
	}
	s.log.Info("module pulled", "image", ref.Original, "source", src.Registry, "digest", rec.Module, "manifest", desc.Digest,
		"layout", rec.Layout, "bytes", rec.Size, "duration", time.Since(start))
	return rec, false, nil
}

// download streams the module into the store, validates it and records
// which module the reference resolved to.
func (s *Service) download(ctx context.Context, st *settings, ref, src puller.Reference, desc ocispec.Descriptor, used puller.Credential) (RefRecord, error) {
	w, err := s.store.NewBlobWriter()
	if err != nil {
		return RefRecord{}, withImage(err, ref.Original)
	}
	defer w.Abort()
	mod, err := st.puller.Pull(ctx, src, desc, w, used)
	if err != nil {
		var ne *Error
		if errors.As(err, &ne) { // the store failed, e.g. a full disk
			return RefRecord{}, withImage(ne, ref.Original)
		}
		return RefRecord{}, err
	}
	d, err := w.Commit(func(path string) error {
		s.validate <- struct{}{}
		defer func() { <-s.validate }()
		return ValidateModuleFile(path, st.validation)
	})
	if err != nil {
		return RefRecord{}, withImage(err, ref.Original)
	}
	rec := RefRecord{Ref: ref.ByDigest(desc.Digest).String(), Manifest: desc.Digest, Module: d, Size: mod.Size, Layout: string(mod.Layout), PulledAt: time.Now().UTC(),
		// Pulled with a pod's secret: other pods must prove their access.
		Private: used.FromPodSecret()}
	if err := s.store.PutRef(rec); err != nil {
		return RefRecord{}, withImage(err, ref.Original)
	}
	if ref.Digest == "" {
		rec.Ref = ref.String()
		if err := s.store.PutRef(rec); err != nil {
			return RefRecord{}, withImage(err, ref.Original)
		}
	}
	return rec, nil
}

// withImage names the image in a node error that has none.
func withImage(err error, image string) error {
	var ne *Error
	if errors.As(err, &ne) && ne.Image == "" {
		cp := *ne
		cp.Image = image
		return &cp
	}
	if ne == nil {
		return newError(ErrInternal, image, err, "%s", "internal error")
	}
	return err
}
